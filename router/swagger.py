"""Swagger UI at /docs over the OpenAPI document at /api-doc/openapi.json (LoRAX's paths): the page
and its assets come from the swagger-ui-py package, so a browser needs nothing but this server."""

from __future__ import annotations

import functools
import mimetypes
from pathlib import Path

from aiohttp import web

from loraxpy.router.errors import NotFoundError

DOCUMENT_PATH = "/api-doc/openapi.json"
PAGE_PATH = "/docs"
ASSETS_PATH = "/docs/static/{name}"
# The files the page loads (the package also ships Swagger Editor and source maps: not served).
ASSETS = (
    "swagger-ui.css",
    "index.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "favicon-16x16.png",
    "favicon-32x32.png",
)
ASSET_TYPES = ("text/css", "text/javascript", "image/png")


@functools.cache
def page_html(title: str) -> str:
    from swagger_ui.core import ApplicationDocument

    doc = ApplicationDocument(None, config_rel_url=DOCUMENT_PATH, url_prefix=PAGE_PATH, title=title)
    doc.parameters["url"] = f'"{DOCUMENT_PATH}"'  # the package would put it under the page's prefix
    return str(doc.doc_html)


def _assets_dir() -> Path:
    import swagger_ui

    return Path(swagger_ui.__path__[0]) / "static"


async def page(request: web.Request) -> web.StreamResponse:
    return web.Response(text=page_html("loraxpy"), content_type="text/html")


async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:  # an allow-list: no path from the request ever reaches the filesystem
        raise NotFoundError(f"no such Swagger UI file: {name!r}")
    content_type = "text/javascript" if name.endswith(".js") else mimetypes.guess_type(name)[0]
    body = (_assets_dir() / name).read_bytes()
    return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "max-age=86400"})
