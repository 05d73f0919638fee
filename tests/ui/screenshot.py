"""The README's picture of the playground after a compare run: python -m tests.ui.screenshot [out.png]

Starts the service on the shipped checkpoint, compares the default request with plain CFG and APG on four
Sneakers at one seed, and saves the whole page (docs/img/playground.png by default)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.conftest import REPO, LiveServer
from tests.ui.conftest import CHROMIUM, TIMEOUT_MS

OUT = REPO / "docs" / "img" / "playground.png"


def main(out: Path = OUT) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = LiveServer({}, Path(tmp) / "server.log")
        try:
            server.wait_ready()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
                page = browser.new_page(base_url=server.url, viewport={"width": 1340, "height": 900})
                page.set_default_timeout(TIMEOUT_MS)
                expect.set_options(timeout=TIMEOUT_MS)
                compare(page)
                page.screenshot(path=str(out), full_page=True)
                browser.close()
        finally:
            server.stop()
    print(f"wrote {out}")


def compare(page) -> None:
    page.goto("/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.select_option("#class_label", "Sneaker")
    page.fill("#seed", "11")
    page.fill("#num_images", "4")
    page.check("#return_trace")
    # A: the default request; B: plain CFG at the same scale; C: APG at s = 5 (README, the guidance table).
    page.get_by_role("button", name="Duplicate setting A").click()
    page.get_by_role("button", name="Duplicate setting B").click()
    b, c = page.locator('.column[data-letter="B"]'), page.locator('.column[data-letter="C"]')
    b.locator('[data-id="schedule"]').select_option("constant")
    c.locator('[data-id="schedule"]').select_option("constant")
    c.locator('[data-id="method"]').select_option("apg")
    c.locator('[data-id="guidance_scale"]').fill("5")
    page.wait_for_timeout(600)  # the curves' debounce
    page.click("#generate")
    for letter in "ABC":
        expect(page.locator(f'.column[data-letter="{letter}"]')).to_have_attribute("data-status", "succeeded")
    page.evaluate("document.activeElement.blur()")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
