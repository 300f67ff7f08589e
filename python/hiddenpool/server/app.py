"""The ASGI app of ``hiddenpool serve`` (Starlette): the OpenAI embeddings route, the
routes of hiddenpool's own (strategy per request, token vectors, late chunking), health,
info, models and metrics. The event loop only reads, checks and answers; texts are
computed by the batcher's worker (``server.batcher``) through the service
(``server.service``); the handlers are ``server.routes``. Here: access, errors as
responses, metrics per route, and the app's start (warm-up) and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hiddenpool.server.memory import serving_collector
from hiddenpool.server.requests import RequestError
from hiddenpool.server.routes import Routes, json_response
from hiddenpool.server.service import SWITCH_INTERVAL, ClientGone, ServerSettings, Service

__all__ = ["ServerSettings", "create_app"]


def create_app(encoder: Any, settings: ServerSettings, announce: str | None = None) -> Starlette:
    """The Starlette app serving ``encoder``; its lifespan starts the worker and makes the
    warm-up pass (then prints ``announce``), and stops the worker after the last request."""
    service = Service(encoder, settings)
    handlers = Routes(service)

    def route(
        name: str, handler: Callable[[Request], Awaitable[Response]], openai: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if name != "/health":
                    _authorize(request, settings.api_key)
                if service.draining and request.method == "POST":
                    raise RequestError(
                        503, "server shutting down; retry on another instance", code="draining"
                    )
                response = await handler(request)
            except RequestError as error:
                response = json_response(error.body(), error.status, error.headers)
            except ClientGone:
                response = Response(status_code=499)
            except Exception as error:
                print(f"hiddenpool serve: {name}: {type(error).__name__}: {error}", file=sys.stderr)
                response = json_response(
                    RequestError(500, f"internal error ({type(error).__name__})").body(), 500
                )
            service.metrics.requests.inc(1, name, str(response.status_code))
            return response

        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The event loop and the worker take turns at the GIL: at Python's default switch
        # interval (5 ms) a thread waiting for it waited up to 5 ms at every hand-over,
        # which cost the worker more time than small batches' forward passes.
        sys.setswitchinterval(SWITCH_INTERVAL)
        service.batcher.start()
        await asyncio.to_thread(service.warm_up)
        with serving_collector(service.metrics.collector_pause_seconds):
            if announce is not None:
                print(announce, flush=True)
            try:
                yield
            finally:
                service.draining = True
                service.batcher.stop()

    routes = [
        Route(
            "/v1/embeddings", route("/v1/embeddings", handlers.openai_embeddings), methods=["POST"]
        ),
        Route("/embeddings", route("/v1/embeddings", handlers.openai_embeddings), methods=["POST"]),
        Route("/embed", route("/embed", handlers.embed), methods=["POST"]),
        Route("/embed_tokens", route("/embed_tokens", handlers.embed_tokens), methods=["POST"]),
        Route("/embed_chunks", route("/embed_chunks", handlers.embed_chunks), methods=["POST"]),
        Route("/health", route("/health", handlers.health), methods=["GET"]),
        Route("/info", route("/info", handlers.info), methods=["GET"]),
        Route("/v1/models", route("/v1/models", handlers.models), methods=["GET"]),
        Route("/metrics", route("/metrics", handlers.metrics), methods=["GET"]),
        Route("/openapi.json", route("/openapi.json", handlers.openapi), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _routing_error}
    )
    app.state.service = service
    return app


async def _routing_error(request: Request, error: Exception) -> Response:
    """An unknown route (404) or a method a route does not take (405), in the same JSON
    envelope as every other error, instead of Starlette's plain text."""
    status = getattr(error, "status_code", 500)
    headers = dict(getattr(error, "headers", None) or {})
    path = request.url.path
    if status == 404:
        message = f"route: {path} does not exist here (the routes: GET /openapi.json)"
        param = "route"
    elif status == 405:
        allowed = headers.get("allow") or headers.get("Allow") or "another method"
        message = f"method: {request.method} is not allowed on {path}; use {allowed}"
        param = "method"
    else:
        message = f"{path}: {getattr(error, 'detail', '') or 'the request failed'}"
        param = None
    return json_response(RequestError(status, message, param).body(), status, headers)


def _authorize(request: Request, api_key: str | None) -> None:
    """``Authorization: Bearer KEY`` exactly, compared in constant time."""
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    expected = f"Bearer {api_key}"
    if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
        raise RequestError(
            401,
            "authorization: missing or wrong API key (Authorization: Bearer KEY)",
            code="invalid_api_key",
        )
