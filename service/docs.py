"""The API's own documentation, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), working with no other host in
reach: their scripts and styles are the copies that the ``fastapi-offline`` package ships (Swagger UI under
Apache-2.0, ReDoc under MIT), served from ``/static/docs/``, instead of FastAPI's default links to a CDN."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/static/docs"  # under /static/: open without the API key, like the search page's own files
DOCS_URL, OAUTH2_REDIRECT_URL, REDOC_URL = "/docs", "/docs/oauth2-redirect", "/redoc"
# The pages may load from this server only: ReDoc's footer links its logo from its makers' CDN, and the browser
# now never asks for it (the image hides itself). Inline: the pages' own start-up script and the UIs' styles.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


def _own_only(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = CSP
    return response


def assets_folder() -> Path:
    """The folder holding ``swagger-ui-bundle.js``, ``swagger-ui.css``, ``redoc.standalone.js``, ``favicon.png``."""
    return Path(str(files("fastapi_offline") / "static"))


def install(app: FastAPI) -> None:
    """Serve the docs pages and their assets from ``app``, which was made with ``docs_url=None`` and
    ``redoc_url=None``. Call it before ``/static`` is mounted: the first mount that matches a path serves it."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_folder()), name="docs-assets")

    def urls(request: Request) -> tuple[str, str, str]:
        root = request.scope.get("root_path", "")  # behind a proxy that serves the app under a prefix
        return f"{root}{app.openapi_url}", f"{root}{ASSETS_URL}", f"{root}{OAUTH2_REDIRECT_URL}"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi, assets, redirect = urls(request)
        # validatorUrl None: Swagger UI would otherwise send the schema's address to validator.swagger.io
        parameters = {"validatorUrl": None, **(app.swagger_ui_parameters or {})}
        return _own_only(get_swagger_ui_html(
            openapi_url=openapi, title=f"{app.title} API", oauth2_redirect_url=redirect,
            swagger_js_url=f"{assets}/swagger-ui-bundle.js", swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png", swagger_ui_parameters=parameters))

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        openapi, assets, _ = urls(request)
        return _own_only(get_redoc_html(openapi_url=openapi, title=f"{app.title} API",
                                        redoc_js_url=f"{assets}/redoc.standalone.js",
                                        redoc_favicon_url=f"{assets}/favicon.png", with_google_fonts=False))
