"""The interactive API docs, /docs (Swagger UI) and /redoc (ReDoc), served whole by the service itself.

FastAPI's own pages load their JavaScript, CSS, favicon and (ReDoc) fonts from CDNs, which a machine
without Internet access never reaches: the pages stay blank. These pages take them from the
fastapi-offline package (a PyPI wheel that ships swagger-ui-dist's bundle and ReDoc's standalone build),
mounted under /docs/assets, and ask nothing of any other host.
"""

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/docs/assets"

# Swagger UI's default validatorUrl sends the spec's address to validator.swagger.io for a badge.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
# The browser loads nothing for these pages from any other host. ReDoc's side menu shows Redocly's logo
# from cdn.redoc.ly whatever its options say; blocked here, the image hides itself (its onError).
# Inline: the page's own start-up script and the styles both UIs set; blob: ReDoc's search worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:"
)


def own_assets_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


def install_docs(app: FastAPI) -> None:
    """/docs and /redoc on this app's OpenAPI schema (create it with docs_url=None, redoc_url=None)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def assets(request: Request) -> str:
        return request.scope.get("root_path", "") + ASSETS_URL  # behind a proxy that mounts the app on a prefix

    def openapi_url(request: Request) -> str:
        return request.scope.get("root_path", "") + (app.openapi_url or "/openapi.json")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return own_assets_only(
            get_swagger_ui_html(
                openapi_url=openapi_url(request),
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{assets(request)}/swagger-ui-bundle.js",
                swagger_css_url=f"{assets(request)}/swagger-ui.css",
                swagger_favicon_url=f"{assets(request)}/favicon.png",
                swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
            )
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return own_assets_only(
            get_redoc_html(
                openapi_url=openapi_url(request),
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{assets(request)}/redoc.standalone.js",
                redoc_favicon_url=f"{assets(request)}/favicon.png",
                with_google_fonts=False,
            )
        )
