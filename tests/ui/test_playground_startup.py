"""The playground opened while the service is still starting: it says so, and loads once the service is ready."""

from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, expect

from tests.ui.conftest import TIMEOUT_MS

pytestmark = pytest.mark.browser


def test_the_page_opened_during_startup_says_so_and_loads_once_ready(browser, launch_server, tmp_path: Path):
    # Held at its load until the test lets it go on (tests/held_serve.py); four rows keep the real warmup short.
    server = launch_server(
        "tests.held_serve", HOLD_DIR=str(tmp_path), CFG_RETRY_AFTER_S="1", CFG_MAX_BATCH_ROWS="4", CFG_MAX_IMAGES="2"
    )
    server.wait_listening()
    context = browser.new_context(base_url=server.url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and "503" not in message.text:
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto("/")
        expect(page.locator("#status")).to_contain_text("loading its models: trying again in 1 s")
        (tmp_path / "load").touch()
        expect(page.locator("#status")).to_contain_text("warming up its models")
        (tmp_path / "warmup").touch()
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#model")).to_have_value("fashion-mnist-cfg")
        expect(page.locator("#status")).to_have_text("")
    finally:
        context.close()
    assert errors == []  # the browser logs each 503 as a failed load: those are expected
