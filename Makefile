# Everything installs from nothing: `make test` and `make run` create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck pytest slow soak clean chromium

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m broker --host 127.0.0.1 --port 7700 --data-dir ./sluice-data

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Two processes, a test file each at a time (module-scoped brokers stay per process):
# 400 s -> 222 s on a 2-core machine.
pytest: $(STAMP) chromium
	$(BIN)/pytest -q -n 2 --dist loadfile

# The dashboard's browser tests need Chromium: Debian's package, installed when missing
# and this runs as root (as CI does). Playwright drives it; it downloads no browser.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "chromium is missing: install Debian's chromium package (apt-get install chromium)" \
	      "to run the browser tests" >&2; exit 1; \
	  fi; }

# The README's test command: lint, types, then the whole suite (slow soaks included).
test: lint typecheck pytest

# Only the long soak runs.
slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# The long campaigns, one table of figures at the end (`make test` runs a short form of
# each). The crash campaign runs both fsync modes side by side: 100 rounds of each took
# 214 s here (2 cores), so the 1,000 below take about 40 minutes.
ROUNDS ?= 1000
soak: $(STAMP)
	$(BIN)/python -m tests.soak all --rounds $(ROUNDS) --frames 1000000 --connections 5000

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache sluice-data
