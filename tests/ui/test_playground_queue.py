"""The playground while a job waits: a server whose batch holds one guided image (CFG_MAX_BATCH_ROWS=2), so a
second setting queues behind the first."""

import re
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import LiveServer
from tests.ui.test_playground import column, control, open_page, wait_done

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {"CFG_WARMUP": "false", "CFG_MAX_BATCH_ROWS": "2", "CFG_MAX_IMAGES": "1"}
    live = LiveServer(env, tmp_path_factory.mktemp("ui-queue") / "server.log")
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


def test_a_queued_setting_shows_its_place_and_can_be_cancelled(page: Page, server):
    open_page(page)
    expect(page.locator("#num_images")).to_have_value("1")  # the page's default of 4, held to the limit
    a = column(page, "A")
    control(a, "steps").fill("200")
    control(a, "schedule").select_option("constant")  # two rows at every step: the batch is full throughout
    a.get_by_role("button", name="Duplicate setting A").click()
    b = column(page, "B")
    page.click("#generate")
    expect(a).to_have_attribute("data-status", "running")
    expect(b).to_have_attribute("data-status", "queued")
    expect(control(b, "run-status")).to_have_text("Queued (position 1)")
    b.get_by_role("button", name="Cancel setting B").click()
    wait_done(b, "cancelled")
    expect(control(b, "run-status")).to_have_text("Cancelled at step 0 of 200")
    assert httpx.get(f"{server.url}/v1/jobs/{b.get_attribute('data-job-id')}").json()["status"] == "cancelled"
    expect(a).to_have_attribute("data-status", "running")  # the other setting runs on
    a.get_by_role("button", name="Cancel setting A").click()
    wait_done(a, "cancelled")
    expect(control(a, "run-status")).to_have_text(re.compile(r"^Cancelled at step \d+ of 200$"))
