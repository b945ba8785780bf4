# Everything installs from nothing: `make test` and `make run` create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck pytest slow soak clean debian-packages

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m broker --host 127.0.0.1 --port 7700 --data-dir ./sluice-data

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Two processes, a test file each at a time (module-scoped brokers stay per process):
# 400 s -> 222 s on a 2-core machine. Then the suites of the wire, job events and full
# disks again with every sync of the log in the background (about 20 s more), as a busy
# broker does them: "auto" takes that path only with many connections at once.
BACKGROUND_SUITES := tests/test_integration.py tests/test_events.py tests/test_full_disk.py
# SLUICE_TEST_PEERS=required: the bench's peer tests fail instead of skipping a peer,
# since this installs them all.
pytest: $(STAMP) debian-packages
	SLUICE_TEST_PEERS=required $(BIN)/pytest -q -n 2 --dist loadfile
	SLUICE_TEST_BROKER_FLAGS="--background-sync on" $(BIN)/pytest -q -n 2 --dist loadfile \
	  $(BACKGROUND_SUITES)

# Debian packages the suite runs for real, installed when missing and this runs as root
# (as CI does): chromium for the dashboard's browser tests (Playwright drives it; it
# downloads no browser), beanstalkd and redis-server for the bench harness's peer tests
# (their Python clients come with the bench extra).
DEBIAN_PACKAGES := chromium beanstalkd redis-server
debian-packages:
	@missing=""; for package in $(DEBIAN_PACKAGES); do \
	  command -v $$package >/dev/null 2>&1 || missing="$$missing $$package"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "missing Debian packages:$$missing (apt-get install$$missing)" \
	      "to run the browser and bench peer tests" >&2; exit 1; \
	  fi; \
	fi

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
