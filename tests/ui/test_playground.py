"""The playground page, operated as a user would in a real browser, against the real service and checkpoint."""

import base64
import json
import re
import shlex
import subprocess
from typing import TypedDict

import httpx
import pytest
from playwright.sync_api import Locator, Page, Request, expect

from tests.pngs import level_diff

pytestmark = pytest.mark.browser


class Shared(TypedDict):
    steps: int
    num_images: int


FAST: Shared = {"steps": 4, "num_images": 2}  # a few seconds a job on 2 CPU cores


def open_page(page: Page) -> None:
    page.goto("/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#c1-curve path.line.scale")).to_have_count(1)  # the first curve has come back


def column(page: Page, letter: str) -> Locator:
    return page.locator(f'.column[data-letter="{letter}"]')


def control(col: Locator, data_id: str) -> Locator:
    return col.locator(f'[data-id="{data_id}"]')


def set_shared(page: Page, *, num_images: int, steps: int, steps_col: Locator | None = None) -> None:
    page.fill("#num_images", str(num_images))
    control(steps_col or column(page, "A"), "steps").fill(str(steps))


def set_constant(col: Locator, scale: float) -> None:
    """Constant schedule: every step guided (the default interval leaves most of 4 steps at s = 1)."""
    control(col, "schedule").select_option("constant")
    control(col, "guidance_scale").fill(str(scale))


def wait_done(col: Locator, status: str = "succeeded") -> None:
    expect(col).to_have_attribute("data-status", status)


def image_sources(col: Locator) -> list[str]:
    return col.locator(".images:not(.preview) img").evaluate_all("imgs => imgs.map(i => i.src)")


def test_page_loads_from_the_app_alone(page: Page, server):
    outside = []

    def on_request(request: Request) -> None:
        if not request.url.startswith((server.url, "data:")):
            outside.append(request.url)

    page.on("request", on_request)
    open_page(page)
    expect(page).to_have_title("cfg-serve playground")
    expect(page.locator("#class_label option")).to_have_count(11)  # 10 classes and unconditional
    expect(page.locator("#model")).to_have_value("fashion-mnist-cfg")
    # Defaults from /v1/models' default_guidance: s = 2.5 on the sigma interval (0.25, 5], span-weighted.
    col = column(page, "A")
    expect(control(col, "guidance_scale")).to_have_value("2.5")
    expect(control(col, "schedule")).to_have_value("interval")
    expect(control(col, "interval-sigma_min")).to_have_value("0.25")
    expect(control(col, "interval-sigma_max")).to_have_value("5")
    expect(control(col, "interval-weighting")).to_have_value("span")
    expect(control(col, "curve")).to_have_attribute("aria-label", re.compile(r"over 20 steps.*7 steps with s ≠ 1"))
    assert outside == []


def test_curve_follows_the_controls(page: Page, server):
    open_page(page)
    col = column(page, "A")
    set_constant(col, 5)
    control(col, "steps").fill("8")
    expect(control(col, "curve")).to_have_attribute("aria-label", re.compile(r"over 8 steps: from 5 to 5"))
    control(col, "schedule").select_option("linear")
    expect(control(col, "linear-start")).to_be_visible()
    expect(control(col, "interval-sigma_min")).to_be_hidden()
    control(col, "linear-start").fill("0")
    control(col, "linear-end").fill("1")
    expect(control(col, "curve")).to_have_attribute("aria-label", re.compile(r"over 8 steps: from 0 to 5"))
    # The table under the plot holds the server's numbers.
    body = {"steps": 8, "guidance_scale": 5, "schedule": {"kind": "linear", "start": 0, "end": 1}}
    expected = httpx.post(f"{server.url}/v1/guidance/curve", json=body).json()["steps"]
    rows = control(col, "curve-table").locator("tbody tr")
    expect(rows).to_have_count(8)
    timesteps = rows.evaluate_all("rows => rows.map(r => Number(r.cells[1].textContent))")
    assert timesteps == [s["timestep"] for s in expected]


def test_generate_shows_progress_images_and_timings(page: Page):
    open_page(page)
    col = column(page, "A")
    set_shared(page, num_images=3, steps=4)
    page.click("#generate")
    wait_done(col)
    progress = control(col, "progress")
    assert progress.evaluate("p => [p.value, p.max]") == [4, 4]
    sources = image_sources(col)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    expect(col.locator(".images img").first).to_have_css("image-rendering", "pixelated")
    expect(control(col, "timings")).to_have_text(re.compile(r"queue .* compute .* total "))
    expect(col.locator("a[download]")).to_have_count(3)
    expect(page.locator("#status")).to_have_text("Done: 1 succeeded.")


def test_download_link_holds_the_image(page: Page):
    open_page(page)
    col = column(page, "A")
    set_shared(page, num_images=1, steps=2)
    page.fill("#seed", "42")
    page.click("#generate")
    wait_done(col)
    with page.expect_download() as download:
        col.locator("a[download]").first.click()
    assert download.value.suggested_filename == "t-shirt-top-seed42-setting-a.png"
    src = image_sources(col)[0]
    assert open(download.value.path(), "rb").read() == base64.b64decode(src.split(",", 1)[1])


def test_compare_runs_settings_side_by_side_at_one_seed(page: Page):
    open_page(page)
    a = column(page, "A")
    set_shared(page, num_images=2, steps=4)
    set_constant(a, 1)
    a.get_by_role("button", name="Duplicate setting A").click()
    column(page, "B").get_by_role("button", name="Duplicate setting B").click()
    c = column(page, "C")
    control(c, "guidance_scale").fill("6")
    page.click("#generate")
    for letter in "ABC":
        wait_done(column(page, letter))
    seeds = {control(column(page, x), "run-status").inner_text().split("seeds ")[1] for x in "ABC"}
    assert len(seeds) == 1  # the same seeds in every column
    images = {x: image_sources(column(page, x)) for x in "ABC"}
    # The same settings: the same images, to one grey level (A and B may run at different rows; tests/pngs.py).
    assert all(level_diff(ia, ib) <= 1 for ia, ib in zip(images["A"], images["B"], strict=True))
    assert all(ia != ic for ia, ic in zip(images["A"], images["C"], strict=True))  # s = 1 against s = 6
    # Each column has its own job.
    job_ids = {column(page, x).get_attribute("data-job-id") for x in "ABC"}
    assert len(job_ids) == 3
    # Remove renames the rest; the last column cannot be removed.
    c.get_by_role("button", name="Remove setting C").click()
    expect(page.locator(".column")).to_have_count(2)
    column(page, "B").get_by_role("button", name="Remove setting B").click()
    expect(column(page, "A").get_by_role("button", name="Remove setting A")).to_be_disabled()


def test_cancel_stops_the_job(page: Page, server):
    open_page(page)
    col = column(page, "A")
    set_shared(page, num_images=1, steps=200)
    page.click("#generate")
    expect(col).to_have_attribute("data-status", "running")
    expect(col.locator(".images.preview img")).to_have_count(1)  # a live preview (every 20 steps)
    page.get_by_role("button", name="Cancel", exact=True).click()
    wait_done(col, "cancelled")
    expect(control(col, "run-status")).to_have_text(re.compile(r"^Cancelled at step \d+ of 200$"))
    job = httpx.get(f"{server.url}/v1/jobs/{col.get_attribute('data-job-id')}").json()
    assert job["status"] == "cancelled" and job["step"] < 200
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_disabled()


def test_api_errors_show_next_to_their_fields(page: Page, console):
    console.allow("status of 422")  # the browser logs each 422 the test provokes as a failed load
    open_page(page)
    col = column(page, "A")
    sigma_min = control(col, "interval-sigma_min")
    sigma_min.fill("6")  # sigma_max is 5: the server's 422 names schedule.interval, the message sigma_min
    error = page.locator("#c1-interval-sigma_min-error")
    expect(error).to_have_text("schedule.sigma_min (6) must be below sigma_max (5)")
    expect(sigma_min).to_have_attribute("aria-invalid", "true")
    expect(sigma_min).to_have_attribute("aria-describedby", re.compile(r"\bc1-interval-sigma_min-error\b"))
    expect(control(col, "interval-sigma_max")).not_to_have_attribute("aria-invalid", "true")

    scale = control(col, "guidance_scale")
    scale.fill("99")
    expect(page.locator("#c1-guidance_scale-error")).to_have_text("Input should be less than or equal to 30")
    expect(scale).to_have_attribute("aria-invalid", "true")

    control(col, "method").select_option("apg")
    control(col, "apg-eta").fill("5")  # loc ["body", "method", "apg", "eta"]
    expect(page.locator("#c1-apg-eta-error")).to_have_text("Input should be less than or equal to 1")

    page.click("#generate")  # the job's own 422 says the same
    wait_done(col, "invalid")
    expect(error).to_be_visible()

    sigma_min.fill("0.25")
    scale.fill("3.5")
    control(col, "apg-eta").fill("0")
    expect(page.locator("[aria-invalid=true]")).to_have_count(0)
    expect(error).to_be_hidden()
    expect(control(col, "curve")).to_have_attribute("aria-label", re.compile(r"^Guidance scale over 20 steps"))


def test_trace_plot(page: Page):
    open_page(page)
    col = column(page, "A")
    set_shared(page, num_images=2, steps=5)
    set_constant(col, 4)
    control(col, "cache").select_option("none")  # the default cache would skip a step, computing nothing there
    page.check("#return_trace")
    page.click("#generate")
    wait_done(col)
    expect(control(col, "trace-figure")).to_be_visible()
    trace = control(col, "trace")
    expect(trace.locator("path.line.diff")).to_have_count(2)  # one line per image
    expect(trace.locator("path.line.scale")).to_have_count(1)
    expect(trace).to_have_attribute("aria-label", re.compile(r"^Trace of 5 steps: 5 steps computed"))


def test_copy_curl_gives_the_same_images(page: Page):
    open_page(page)
    col = column(page, "A")
    set_shared(page, **FAST)
    set_constant(col, 2.5)
    page.click("#generate")
    wait_done(col)
    col.get_by_role("button", name="Copy the curl command of setting A").click()
    expect(control(col, "run-status")).to_have_text("Copied the curl command.")
    command = page.evaluate("navigator.clipboard.readText()")
    assert command.startswith("curl -s 'http://127.0.0.1:") and "/generate'" in command
    body = json.loads(shlex.split(command)[-1])
    assert body["guidance_scale"] == 2.5 and body["schedule"] == {"kind": "constant"} and body["steps"] == 4
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, check=True)
    response = json.loads(out.stdout)
    page_images = [s.split(",", 1)[1] for s in image_sources(col)]
    assert response["images"] == page_images


def test_api_key_goes_with_every_api_request(page: Page):
    sent = []

    def on_request(request: Request) -> None:
        if "/v1/" in request.url:
            sent.append((request.url, request.headers.get("x-api-key")))

    page.on("request", on_request)
    open_page(page)
    page.fill("#api_key", "k-123")
    set_shared(page, **FAST)
    sent.clear()
    page.click("#generate")
    wait_done(column(page, "A"))
    urls = [u for u, _ in sent]
    assert any(u.endswith("/v1/jobs") for u in urls) and any(u.endswith("/events") for u in urls)
    assert {key for _, key in sent} == {"k-123"}
    column(page, "A").get_by_role("button", name="Copy the curl command of setting A").click()
    command = page.evaluate("navigator.clipboard.readText()")
    assert '-H "X-API-Key: $CFG_API_KEY"' in command and "k-123" not in command


def test_every_control_has_a_label(page: Page):
    open_page(page)
    column(page, "A").get_by_role("button", name="Duplicate setting A").click()
    control(column(page, "B"), "method").select_option("apg")
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll("input, select, button, textarea")].filter((el) => {
            const labelled = [...(el.labels ?? [])].some((l) => l.textContent.trim());
            const aria = (el.getAttribute("aria-label") ?? "").trim();
            const text = el.tagName === "BUTTON" ? el.textContent.trim() : "";
            return !labelled && !aria && !text;
        }).map((el) => el.outerHTML)"""
    )
    assert unlabelled == []
    # The browser's own accessible-name computation agrees for every visible control.
    controls = page.locator("input, select, button").filter(visible=True)
    assert controls.count() > 25
    for i in range(controls.count()):
        expect(controls.nth(i)).to_have_accessible_name(re.compile(r"\S"))


def test_keyboard_reaches_and_activates_generate(page: Page):
    open_page(page)
    set_shared(page, **FAST)
    page.locator("body").focus()
    page.evaluate("document.activeElement.blur()")
    stops = page.locator("a[href], button, input, select, textarea, [tabindex]").count()  # the page's, at most
    for _ in range(stops + 1):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "generate":
            break
    else:
        raise AssertionError("Tab never reached Generate")
    col = column(page, "A")
    page.keyboard.press("Enter")
    wait_done(col)
    first = col.get_attribute("data-job-id")
    expect(page.locator("#generate")).to_be_focused()
    page.keyboard.press("Space")
    expect(col).not_to_have_attribute("data-job-id", first)
    wait_done(col)
    assert col.get_attribute("data-job-id") not in (None, first)


def test_a_gateway_that_asks_for_a_key(page: Page, console):
    # A stand-in for the nginx gateway's key check (the real one is tested in tests/deploy): /v1/ answers
    # 401 without X-API-Key, as the gateway does, and passes requests with it on to the real service.
    console.allow("status of 401")

    def gateway(route):
        if route.request.headers.get("x-api-key") != "k-123":
            return route.fulfill(status=401, json={"detail": "missing API key"})
        return route.continue_()

    page.route("**/v1/**", gateway)
    page.goto("/")
    api_key = page.locator("#api_key")
    expect(page.locator("#api_key-error")).to_have_text("The gateway asks for an API key (401).")
    expect(api_key).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#status")).to_contain_text("401")
    api_key.fill("k-123")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#api_key-error")).to_be_hidden()
    expect(api_key).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator("#c1-curve path.line.scale")).to_have_count(1)


def test_every_method_s_inputs_come_from_its_settings_model_and_each_method_runs(page: Page, server):
    """One column per guidance method the model lists; each method's inputs are built from its settings model
    (/v1/models' guidance_method_fields: bounds and defaults), and a Generate runs every column's method."""
    info = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    kinds, fields = info["guidance_methods"], info["guidance_method_fields"]
    assert set(fields) == set(kinds) and any(fields.values())
    open_page(page)
    set_shared(page, **FAST)
    for i in range(len(kinds) - 1):
        letter = chr(ord("A") + i)
        column(page, letter).get_by_role("button", name=f"Duplicate setting {letter}").click()
    letters = [chr(ord("A") + i) for i in range(len(kinds))]
    for letter, kind in zip(letters, kinds, strict=True):
        col = column(page, letter)
        control(col, "method").select_option(kind)
        for field in fields[kind]:
            el = control(col, f"{kind}-{field['name']}")
            expect(el).to_be_visible()
            if field["type"] in ("number", "integer"):
                if field["default"] is None:  # nullable, null by default: an empty box sends null
                    assert field.get("nullable") and el.input_value() == "", (kind, field)
                else:
                    assert float(el.input_value()) == field["default"], (kind, field)
                for bound in ("minimum", "maximum"):
                    if bound in field:
                        assert float(el.get_attribute(bound[:3]) or "nan") == field[bound], (kind, field)
            elif field["type"] == "boolean":
                assert el.is_checked() == bool(field["default"]), (kind, field)
        others = [k for k in kinds if k != kind and fields[k]]
        for other in others:  # another method's inputs are hidden
            expect(control(col, f"{other}-{fields[other][0]['name']}")).to_be_hidden()
    page.click("#generate")
    for letter, kind in zip(letters, kinds, strict=True):
        col = column(page, letter)
        wait_done(col)
        job = httpx.get(f"{server.url}/v1/jobs/{col.get_attribute('data-job-id')}").json()
        assert job["result"]["guidance"]["method"]["kind"] == kind


def test_each_setting_chooses_its_step_cache_and_draws_what_the_api_draws_with_it(page: Page, server):
    """The cache select lists the model's kinds with its default chosen (/v1/models' cache.default), each kind's
    inputs come from cache.fields (deepcache's branch bounded by the model's deepest), and each column's job runs
    its own cache: the images the API draws for the same body."""
    info = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    cache = info["cache"]
    default = cache["default"]
    open_page(page)
    a = column(page, "A")
    options = control(a, "cache").locator("option").evaluate_all("os => os.map(o => o.value)")
    assert options == cache["kinds"] and "uncond" in options and "deepcache" in options
    expect(control(a, "cache")).to_have_value(default["kind"])
    for name, value in default.items():
        if name != "kind":
            expect(control(a, f"{default['kind']}-{name}")).to_have_value(str(value))
    set_shared(page, **FAST)
    set_constant(a, 3)  # every step guided: the uncond cache reuses the unconditional rows of every other one
    a.get_by_role("button", name="Duplicate setting A").click()
    column(page, "B").get_by_role("button", name="Duplicate setting B").click()
    control(a, "cache").select_option("none")
    expect(control(a, "uncond-every")).to_be_hidden()
    c = column(page, "C")
    control(c, "cache").select_option("deepcache")
    branch = control(c, "deepcache-branch")
    expect(branch).to_be_visible()
    assert branch.get_attribute("max") == str(cache["deepcache"]["max_branch"])
    control(c, "deepcache-interval").fill("2")
    page.click("#generate")
    chosen = {}
    for letter in "ABC":
        col = column(page, letter)
        wait_done(col)
        job = httpx.get(f"{server.url}/v1/jobs/{col.get_attribute('data-job-id')}").json()
        chosen[letter] = job["result"]["cache"]
        result = job["result"]
        body = {**FAST, "class_label": result["class_label"], "seed": result["seeds"][0], "cache": chosen[letter]}
        body |= {"guidance_scale": 3, "schedule": {"kind": "constant"}}
        api = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()["images"]
        page_images = [s.split(",", 1)[1] for s in image_sources(col)]
        assert all(level_diff(x, y) <= 1 for x, y in zip(page_images, api, strict=True)), letter
    assert chosen["A"]["kind"] == "none" and default.items() <= chosen["B"].items()  # echoed with every field
    assert chosen["C"]["kind"] == "deepcache" and chosen["C"]["interval"] == 2
    assert image_sources(a) != image_sources(column(page, "B"))  # the cache changed the images (a little)


def test_a_cache_setting_out_of_range_shows_its_error_at_its_input(page: Page, console):
    console.allow("status of 422")
    open_page(page)
    col = column(page, "A")
    control(col, "cache").select_option("uncond")
    every = control(col, "uncond-every")
    every.fill("11")  # loc ["body", "cache", "uncond", "every"]
    expect(page.locator("#c1-uncond-every-error")).to_have_text("Input should be less than or equal to 10")
    expect(every).to_have_attribute("aria-invalid", "true")
    every.fill("2")
    expect(page.locator("[aria-invalid=true]")).to_have_count(0)
