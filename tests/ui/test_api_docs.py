"""The interactive API docs (/docs, /redoc) in a real browser, with no network beyond 127.0.0.1: they render
the API from the service's own files, and ask no other host for anything (a CDN, fonts, a validator)."""

from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, Request, expect

pytestmark = pytest.mark.browser


def record_other_hosts(page: Page) -> dict[str, str | None]:
    """The URLs the page asks of any host but 127.0.0.1 (data: and blob: URLs are the page's own), each with
    why it failed: "csp" for a request the page's Content-Security-Policy stopped in the browser."""
    outside: dict[str, str | None] = {}

    def elsewhere(request) -> bool:
        url = urlsplit(request.url)
        return url.scheme not in ("data", "blob") and url.hostname != "127.0.0.1"

    def on_request(request: Request) -> None:
        if elsewhere(request):
            outside.setdefault(request.url, None)

    def on_failed(request: Request) -> None:
        if elsewhere(request):
            outside[request.url] = request.failure

    page.on("request", on_request)
    page.on("requestfailed", on_failed)
    return outside


def test_swagger_ui_shows_generate_and_its_fields_from_the_service_alone(page: Page):
    outside = record_other_hosts(page)
    page.goto("/docs")
    operation = page.locator(".opblock-post", has=page.locator('[data-path="/generate"]'))
    expect(operation.locator(".opblock-summary-path")).to_have_text("/generate")
    operation.locator(".opblock-summary").click()  # expand it, as a reader would
    request_body = operation.locator(".opblock-section-request-body")
    request_body.get_by_role("tab", name="Schema").click()  # the fields, each with its description
    expect(request_body).to_contain_text("class_label")
    expect(request_body).to_contain_text("guidance_scale")
    page.wait_for_load_state("networkidle")
    assert outside == {}


def test_redoc_renders_generate_and_its_fields_from_the_service_alone(page: Page, console):
    # ReDoc's side menu always asks cdn.redoc.ly for Redocly's logo: the page's Content-Security-Policy
    # stops it in the browser (which logs that as an error), before any request leaves.
    logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
    console.allow(logo)
    outside = record_other_hosts(page)
    page.goto("/redoc")
    summary = "Draw images of a class with classifier-free guidance"
    expect(page.locator("h2", has_text=summary)).to_be_visible()
    section = page.locator('[id="operation/generate_generate_post"]').first  # ReDoc gives two the id
    expect(section).to_contain_text("/generate")
    expect(section).to_contain_text("class_label")
    expect(section).to_contain_text("guidance_scale")
    page.wait_for_load_state("networkidle")
    assert outside == {logo: "csp"}
