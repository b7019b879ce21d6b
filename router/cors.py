"""Cross-origin access for browsers (--cors-allow-origin), by aiohttp-cors: each route answers its
preflight and carries the CORS headers for the allowed origins only."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import aiohttp_cors
from aiohttp import web

logger = logging.getLogger(__name__)

# What a browser page may send and read: JSON bodies, the API key, and the retry hint on 429/503.
ALLOW_HEADERS = ("Content-Type", "Authorization")
EXPOSE_HEADERS = ("Retry-After",)


def allow_origins(app: web.Application, origins: Sequence[str]) -> None:
    """Adds CORS to every route of `app` for `origins` (`*`: any); without origins, adds nothing."""
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=False,  # the API key travels in a header, never in cookies
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
        allow_methods=("GET", "POST"),
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)
    if "*" not in origins:  # the answer's Access-Control-Allow-Origin depends on the request's Origin
        app.on_response_prepare.append(_vary_on_origin)
    logger.info("CORS: origins %s may call the API from browsers", ", ".join(origins))


async def _vary_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    """`Vary: Origin` on every answer, so a shared cache never hands one origin's CORS headers (or
    their absence) to another."""
    vary = [v.strip() for v in response.headers.get("Vary", "").split(",") if v.strip()]
    if not any(v.lower() in ("origin", "*") for v in vary):
        response.headers["Vary"] = ", ".join([*vary, "Origin"])
