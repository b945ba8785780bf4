"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright) against a real broker with an auth token. Each test does what a person would,
and checks the outcome through the wire client, not only on the page.

``make test`` installs Chromium when it is missing (as root, with apt-get); without it
these tests fail, they do not skip. The overview's screenshot is written to
``docs/dashboard.png`` when that file is missing or ``SLUICE_UPDATE_SCREENSHOT=1``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from client import Client
from tests.conftest import KEEP, BrokerProcess, start_broker, stop_broker

TOKEN = "dashboard-token"
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "dashboard.png"
WAIT_MS = 10_000  # a page shows what it should within this long (it refreshes every second)
expect.set_options(timeout=WAIT_MS)


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    assert found, (
        "Chromium is missing: `make test` installs Debian's chromium package when it runs "
        "as root; or apt-get install chromium"
    )
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def web_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    log = tmp_path_factory.mktemp("dashboard") / "broker.log"
    running = start_broker(log, "--auth-token", TOKEN, http=True)
    yield running
    stop_broker(running)


@pytest.fixture
def client(web_broker: BrokerProcess) -> Iterator[Client]:
    with web_broker.client(auth_token=TOKEN, client_name="dashboard-test") as connected:
        yield connected


@pytest.fixture
def page(browser: Browser, web_broker: BrokerProcess) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(web_broker.http + "/")
    yield opened
    context.close()
    assert errors == [], f"the page raised: {errors}"


def cell(page: Page, queue: str, state: str) -> object:
    return page.locator(f'[data-testid="queues"] tr[data-queue="{queue}"] td[data-state="{state}"]')


def give_token(page: Page) -> None:
    """Answer the token dialog, which comes with the first change of a session."""
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    page.fill("#token-input", TOKEN)
    page.click("#token-ok")
    expect(dialog).to_be_hidden()


def test_overview_shows_the_queues_with_their_counts(page: Page, client: Client) -> None:
    client.put_many("web.emails", [b"a", b"b", b"c"])
    client.put("web.emails", b"later", delay=3600)
    client.put_many("web.thumbs", [b"1", b"2", b"3"])
    client.reserve("web.thumbs")
    expect(cell(page, "web.emails", "ready")).to_have_text("3")  # type: ignore[arg-type]
    expect(cell(page, "web.emails", "delayed")).to_have_text("1")  # type: ignore[arg-type]
    expect(cell(page, "web.thumbs", "ready")).to_have_text("2")  # type: ignore[arg-type]
    expect(cell(page, "web.thumbs", "reserved")).to_have_text("1")  # type: ignore[arg-type]
    client.put("web.emails", b"d")  # the page follows on its own
    expect(cell(page, "web.emails", "ready")).to_have_text("4")  # type: ignore[arg-type]


def test_pause_from_the_queue_page_asks_the_token_once(page: Page, client: Client) -> None:
    client.put("web.pause", b"x")
    page.click('[data-testid="queues"] tr[data-queue="web.pause"] a')
    page.click('[data-testid="pause"]')
    give_token(page)
    expect(page.locator('[data-testid="paused"]')).to_be_visible()
    assert client.stats("web.pause")["paused"] is True
    page.click('[data-testid="resume"]')  # the token is kept: no dialog this time
    expect(page.locator('[data-testid="pause"]')).to_be_visible()
    expect(page.locator("#token-dialog")).to_be_hidden()
    assert client.stats("web.pause")["paused"] is False


def test_a_destructive_action_waits_for_confirmation(page: Page, client: Client) -> None:
    client.configure("web.purge", **KEEP)  # so that the emptied queue stays to be shown
    client.put_many("web.purge", [b"1", b"2"])
    page.goto(page.url.split("#")[0] + "#/queue/web.purge/ready")
    page.click('[data-testid="purge"]')
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-dialog button[value=cancel]")
    assert client.stats("web.purge")["ready"] == 2  # nothing was asked of the broker
    page.click('[data-testid="purge"]')
    page.click("#confirm-ok")
    give_token(page)
    expect(page.locator('[data-testid="no-messages"]')).to_be_visible()
    assert client.stats("web.purge")["ready"] == 0


def test_find_a_job_by_id(page: Page, client: Client) -> None:
    client.put_many("web.find", [b"ahead 1", b"ahead 2"])
    message_id = client.put("web.find", b"booking for seat 12A", headers={"user": "ada"})
    page.fill("#search-id", str(message_id))
    page.press("#search-id", "Enter")
    expect(page.locator('[data-testid="job-state"]')).to_have_text("ready")
    expect(page.locator('[data-testid="job-body"]')).to_have_text("booking for seat 12A")
    expect(page.locator('[data-testid="job-position"]')).to_contain_text("2 ahead of it")
    page.fill("#search-id", "999999")
    page.press("#search-id", "Enter")
    expect(page.locator('[data-testid="job-error"]')).to_contain_text("NOT_FOUND")


def test_replay_a_dead_letter_from_the_dead_page(page: Page, client: Client) -> None:
    client.put_many("web.dead", [b"first", b"second"])
    messages = client.reserve("web.dead", max_messages=2)
    for message in messages:
        client.bury(message, reason="bad address")
    page.click('nav a[data-page="dead"]')
    page.click('[data-testid="dead-queues"] tr[data-queue="web.dead"] a')
    replayed = messages[0].id
    page.click(f'[data-testid="replay-{replayed}"]')
    give_token(page)
    expect(page.locator(f'[data-testid="replay-{replayed}"]')).to_have_count(0)
    stats = client.stats("web.dead")
    assert stats["dead"] == 1 and stats["ready"] == 1
    assert client.status(replayed)["state"] == "ready"


def test_put_rate_moves_while_a_producer_runs_and_a_screenshot_is_kept(
    page: Page, web_broker: BrokerProcess
) -> None:
    rate = page.locator('[data-testid="put-rate"]')
    expect(rate).to_have_text(re.compile(r"^(—|\d+\.\d)$"))
    before = rate.inner_text()  # a few puts of the tests before, or none yet
    assert before == "—" or float(before) < 20
    stop = threading.Event()

    def produce() -> None:
        with web_broker.client(auth_token=TOKEN) as producer:
            while not stop.wait(0.01):
                producer.put_many("web.load", [b"job"] * 5)
                for message in producer.reserve("web.load", max_messages=5):
                    producer.ack(message)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        # The producer puts far more than 20/s; each refresh re-reads the rate. (Matched
        # from here: the page's CSP forbids the eval a predicate run in the page needs.)
        expect(rate).to_have_text(re.compile(r"^([2-9]\d|\d{3,})\.\d$"))
        put_line = page.locator(".chart polyline").first
        expect(put_line).to_have_attribute("points", re.compile(r"^\S+( \S+){2,}$"))
        shot = page.screenshot(full_page=True)
    finally:
        stop.set()
        producer.join(10)
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
    if not SCREENSHOT.exists() or os.environ.get("SLUICE_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(shot)


def test_connections_page_lists_the_test_client(page: Page, client: Client) -> None:
    client.ping()
    page.click('nav a[data-page="connections"]')
    expect(page.locator('[data-testid="connections"]')).to_contain_text("dashboard-test")


def test_dashboard_files_are_served_from_the_package(web_broker: BrokerProcess) -> None:
    import urllib.request

    with urllib.request.urlopen(web_broker.http + "/dashboard/app.js", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/javascript")
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    try:
        urllib.request.urlopen(web_broker.http + "/dashboard/../_core.py", timeout=5)
    except urllib.error.HTTPError as error:
        assert error.code == 404
    else:
        raise AssertionError("a file outside the dashboard was served")


def test_with_an_auth_file_the_dashboard_asks_the_token_for_reads(
    browser: Browser, tmp_path: Path
) -> None:
    digest = hashlib.sha256(b"watcher-token").hexdigest()
    auth = tmp_path / "auth.toml"
    auth.write_text(
        f'[[principal]]\nname = "watcher"\ntoken_sha256 = "{digest}"\n'
        'grants = [{ queues = "*", allow = ["read"] }]\n'
    )
    running = start_broker(
        tmp_path / "broker.log", "--auth-file", str(auth), "--auth-token", TOKEN, http=True
    )
    context = browser.new_context()
    try:
        with running.client(auth_token=TOKEN) as producer:
            producer.put_many("guarded.jobs", [b"a", b"b"])
        opened = context.new_page()
        opened.set_default_timeout(WAIT_MS)
        opened.goto(running.http + "/")
        dialog = opened.locator("#token-dialog")
        expect(dialog).to_be_visible()
        opened.fill("#token-input", "watcher-token")
        opened.click("#token-ok")
        expect(cell(opened, "guarded.jobs", "ready")).to_have_text("2")  # type: ignore[arg-type]
    finally:
        context.close()
        stop_broker(running)
