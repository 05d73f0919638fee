"""The playground in a real browser (Debian's chromium, driven by Playwright) against a real
`python -m app.serve` on 127.0.0.1. Every test fails on a console error or an uncaught page error,
except the ones it names (a 422 that a test provokes is logged by the browser as a failed load)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage

from tests.conftest import LiveServer

CHROMIUM = Path("/usr/bin/chromium")

# Short timeouts would fail on the 2-core machine while other work shares it; a hang still ends here.
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server per test module: the page only talks HTTP to it, and each test starts its own jobs."""
    live = LiveServer({"CFG_WARMUP": "false"}, tmp_path_factory.mktemp("ui") / "server.log")
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM} (scripts/install.sh --system installs it)")
    sync_api.expect.set_options(timeout=TIMEOUT_MS)  # expect() has its own default (5 s), apart from the page's
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


class ConsoleErrors:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.allowed: list[str] = []

    def allow(self, fragment: str) -> None:
        """Errors containing this text are expected by the test (e.g. the browser's log line for a 422)."""
        self.allowed.append(fragment)

    def unexpected(self) -> list[str]:
        return [e for e in self.seen if not any(a in e for a in self.allowed)]


@pytest.fixture
def console() -> ConsoleErrors:
    return ConsoleErrors()


@pytest.fixture
def page(browser, server: LiveServer, console: ConsoleErrors):
    context = browser.new_context(
        base_url=server.url,
        viewport={"width": 1400, "height": 1000},
        permissions=["clipboard-read", "clipboard-write"],
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            console.seen.append(f"console: {message.text} ({message.location})")

    page.on("console", on_console)
    page.on("pageerror", lambda e: console.seen.append(f"pageerror: {e}"))
    yield page
    context.close()
    assert console.unexpected() == []
