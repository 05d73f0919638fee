"""The playground with two served models, the shipped UNet and the shipped small DiT: a column's step cache follows
the model chosen (each model's kinds and default, from GET /v1/models), and a DiT-only kind runs on the DiT."""

import httpx
import pytest
from playwright.sync_api import expect

from tests.ui.test_playground import FAST, column, control, set_shared, wait_done

pytestmark = pytest.mark.browser


def test_the_cache_choices_follow_the_model_and_first_block_runs_on_the_dit(browser, launch_server):
    server = launch_server("app.serve", CFG_MODELS="fashion-mnist-cfg,fashion-mnist-dit", CFG_WARMUP="false")
    server.wait_ready()
    info = {m["id"]: m["cache"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert "first_block" in info["fashion-mnist-dit"]["kinds"] and "deepcache" in info["fashion-mnist-cfg"]["kinds"]
    context = browser.new_context(base_url=server.url)
    page = context.new_page()
    try:
        page.goto("/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        col = column(page, "A")
        options = control(col, "cache").locator("option")
        expect(options).to_have_count(len(info["fashion-mnist-cfg"]["kinds"]))
        assert options.evaluate_all("os => os.map(o => o.value)") == info["fashion-mnist-cfg"]["kinds"]
        page.select_option("#model", "fashion-mnist-dit")
        expect(options).to_have_count(len(info["fashion-mnist-dit"]["kinds"]))
        assert options.evaluate_all("os => os.map(o => o.value)") == info["fashion-mnist-dit"]["kinds"]
        control(col, "cache").select_option("first_block")
        threshold = control(col, "first_block-threshold")  # built from the DiT's cache.fields
        expect(threshold).to_be_visible()
        threshold.fill("0.3")
        set_shared(page, **FAST)
        page.click("#generate")
        wait_done(col)
        job = httpx.get(f"{server.url}/v1/jobs/{col.get_attribute('data-job-id')}").json()
        assert job["result"]["model"] == "fashion-mnist-dit"
        assert job["result"]["cache"]["kind"] == "first_block" and job["result"]["cache"]["threshold"] == 0.3
    finally:
        context.close()
