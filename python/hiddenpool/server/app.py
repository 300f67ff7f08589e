"""The ASGI app of ``hiddenpool serve`` (Starlette): the OpenAI embeddings route, the
routes of hiddenpool's own (strategy per request, token vectors, late chunking), health,
info, models and metrics. The event loop only reads, checks and answers; texts are
tokenized in a thread and computed by the batcher's worker (``server.batcher``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from hiddenpool._version import __version__
from hiddenpool.encoder import truncate_dimensions
from hiddenpool.pipelines import normalize_rows
from hiddenpool.runners.base import needed_states
from hiddenpool.runners.tokens import Tokenized
from hiddenpool.server.batcher import Batcher, CallJob, JobFailed, PoolJob
from hiddenpool.server.metrics import Metrics
from hiddenpool.server.requests import (
    EmbedRequest,
    RequestError,
    chunks_request,
    embed_request,
    openai_request,
    parse_json,
    tokens_request,
)
from hiddenpool.strategy import Strategy


@dataclass(frozen=True)
class ServerSettings:
    """What ``hiddenpool serve`` was started with (``cli.serve`` fills it)."""

    model_path: str
    served_model_name: str
    strategy: str = "model"
    max_batch_tokens: int = 1024
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 2048
    payload_limit: int = 2_000_000
    api_key: str | None = None
    request_timeout: float = 60.0
    read_timeout: float = 10.0
    expose_paths: bool = False


SWITCH_INTERVAL = 0.0002  # seconds; see the lifespan below
# Requests up to this many characters are tokenized on the event loop (tens of
# microseconds, less than the hand-over to a thread and back); longer ones in a thread, so
# the loop never stalls on a large request.
INLINE_TOKENIZE_CHARACTERS = 4096
PLAN_CACHE = 1024  # distinct (strategies, prompt) plans kept


def _characters(request: EmbedRequest) -> int:
    return sum(len(item) for item in request.inputs) + len(request.prompt or "")


class Service:
    """The model, its batcher and the settings, shared by every route."""

    def __init__(self, encoder: Any, settings: ServerSettings) -> None:
        self.encoder = encoder
        self.settings = settings
        self.metrics = Metrics()
        self.batcher = Batcher(encoder, settings.max_batch_tokens, self.metrics)
        self.in_flight = 0
        self.ready = False
        self.draining = False
        runner = encoder.runner
        if hasattr(runner, "spin"):
            runner.spin = False  # the event loop needs the cores between batches
        self.tokenizer = runner.tokenizer
        self.state_count = runner.state_count()
        lead, tail = self.tokenizer.special_frame()
        self.special_lead, self.special_tail = list(lead), list(tail)
        self.vocab_size = int(self.tokenizer.vocab_size)
        self.wants_type_ids = bool(getattr(self.tokenizer, "wants_type_ids", False))
        self.names = {
            settings.served_model_name,
            os.path.basename(os.path.normpath(settings.model_path)),
        }
        self.default_strategies = [settings.strategy]
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self.width = self._width(self.default_strategies)

    def _width(self, strategies: list[str]) -> int:
        rows = self.encoder.encode([], strategies[0])
        return int(rows.shape[1])

    def warm_up(self) -> None:
        """One forward pass (of a short text) before the server says it is ready."""
        self.encoder.encode(["warm-up"], self.settings.strategy)
        self.ready = True

    # Requests: permits, tokenizing, the batcher.

    @contextlib.contextmanager
    def permit(self) -> Any:
        if self.in_flight >= self.settings.max_concurrent_requests:
            raise RequestError(
                429,
                f"server busy: {self.settings.max_concurrent_requests} requests in flight "
                "(--max-concurrent-requests); retry shortly",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def resolve(self, request: EmbedRequest) -> _Plan:
        """The request's strategies as pooled keys (``model`` resolved), checked on the
        model; errors name ``strategy``. Plans are remembered (parsing and checking cost
        more than a one-text request's own work), up to PLAN_CACHE of them."""
        key = (tuple(request.strategies or ()), request.prompt, request.include_prompt)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._resolve(request)
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _resolve(self, request: EmbedRequest) -> _Plan:
        given = request.strategies or self.default_strategies
        outputs: list[tuple[str, str, bool]] = []
        for item in given:
            if item.strip() == "model":
                outputs.append(("model", self.encoder.model_strategy(), True))
                continue
            try:
                canonical = str(Strategy.parse(item))
            except ValueError as error:
                raise RequestError(422, str(error), "strategy") from None
            outputs.append((item, canonical, False))
        keys = list(dict.fromkeys(inner for _, inner, _ in outputs))
        mix = self.encoder.model_mix() if any(m for _, _, m in outputs) else None
        if mix is not None and any(
            Strategy.parse(inner).combine == "weighted" for _, inner, m in outputs if not m
        ):
            raise RequestError(
                422,
                "strategy: a ':weighted' strategy needs layer weights, which requests do not "
                "carry (the model's own learned mix is 'model')",
                "strategy",
            )
        try:
            self.encoder.check(keys, layer_weights=None if mix is None else mix[0])
        except ValueError as error:
            raise RequestError(422, str(error), "strategy") from None
        parsed = [Strategy.parse(key) for key in keys]
        states = needed_states(parsed, self.state_count)
        include = request.include_prompt
        pipeline = self.encoder.pipeline
        uses_model = any(is_model for _, _, is_model in outputs)
        if include is None and pipeline is not None and request.prompt is not None and uses_model:
            include = pipeline.include_prompt
        prompt_tokens = 0
        if request.prompt is not None and include is False:
            prompt_tokens = self.tokenizer.prompt_tokens(request.prompt)
        return _Plan(outputs, keys, states, prompt_tokens, mix)

    def tokenize(self, request: EmbedRequest) -> tuple[Tokenized, list[int]]:
        """The inputs' token ids (texts tokenized with the prompt before them; token-id
        inputs framed with the special tokens, as text is), and the indices of the inputs
        cut to the model's length."""
        inputs = request.inputs
        limit = self.tokenizer.max_length
        if inputs and isinstance(inputs[0], list):
            ids_list: list[list[int]] = []
            cut: list[int] = []
            room = limit - len(self.special_lead) - len(self.special_tail)
            for index, ids in enumerate(inputs):
                assert isinstance(ids, list)
                bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
                if bad is not None:
                    raise RequestError(
                        422,
                        f"input[{index}]: token id {bad} is outside the vocabulary "
                        f"(0..{self.vocab_size - 1})",
                        "input",
                    )
                if len(ids) > room:
                    ids = ids[:room]
                    cut.append(index)
                ids_list.append(self.special_lead + ids + self.special_tail)
            type_ids = [[0] * len(ids) for ids in ids_list] if self.wants_type_ids else None
            return Tokenized(ids_list, type_ids, len(cut)), cut  # type: ignore[arg-type]
        texts = [str(text) for text in inputs]
        if request.prompt is not None:
            texts = [request.prompt + text for text in texts]
        tokenized = self.tokenizer.tokenize(texts)
        cut = []
        if tokenized.truncated:
            if tokenized.encodings is not None:
                cut = [i for i, encoding in enumerate(tokenized.encodings) if encoding.overflowing]
            else:
                full = self.tokenizer.plain_ids(texts)
                extra = len(self.special_lead) + len(self.special_tail)
                cut = [i for i, ids in enumerate(full) if len(ids) + extra > limit]
        return tokenized, cut

    async def run_pool(self, job: PoolJob, request: Request) -> PoolJob:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[PoolJob] = loop.create_future()

        def finished(finished_job: PoolJob) -> None:
            loop.call_soon_threadsafe(_resolve, done, finished_job)

        job.on_done = finished
        try:
            self.batcher.submit(job)
        except JobFailed as error:
            raise RequestError(error.status, str(error)) from None
        await self._wait(done, request, lambda: self.batcher.cancel(job))
        if job.error is not None:
            status = job.error.status if isinstance(job.error, JobFailed) else 500
            raise RequestError(status, str(job.error), "input" if status == 422 else None)
        return job

    async def run_call(self, function: Callable[[], Any], request: Request) -> CallJob:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[CallJob] = loop.create_future()

        def finished(finished_job: CallJob) -> None:
            loop.call_soon_threadsafe(_resolve, done, finished_job)

        job = CallJob(function, finished)
        try:
            self.batcher.submit(job)
        except JobFailed as error:
            raise RequestError(error.status, str(error)) from None
        await self._wait(done, request, lambda: self.batcher.cancel(job))
        if job.error is not None:
            if isinstance(job.error, (ValueError, TypeError)):
                raise RequestError(422, str(job.error).splitlines()[0])
            raise RequestError(500, f"the computation failed ({type(job.error).__name__})")
        return job

    async def _wait(
        self, done: asyncio.Future[Any], request: Request, cancel: Callable[[], None]
    ) -> None:
        """Until ``done``; a client that leaves, or the deadline, cancels the work."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            finished, _ = await asyncio.wait(
                {done, gone},
                timeout=self.settings.request_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
        if done in finished:
            return
        cancel()
        if gone in finished:
            raise _ClientGone
        raise RequestError(
            504,
            f"request timed out after {self.settings.request_timeout:g} s "
            "(--request-timeout); its texts were dropped",
        )


class _ClientGone(Exception):
    """The client disconnected; nothing is sent."""


@dataclass
class _Plan:
    outputs: list[tuple[str, str, bool]]  # (name as given, pooled key, is "model")
    keys: list[str]
    states: frozenset[int]
    prompt_tokens: int
    mix: tuple[list[float], float] | None = None  # the model pipeline's learned layer mix


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


async def _disconnected(request: Request) -> None:
    """Returns when the client has disconnected (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# Responses.


def _json(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _vector(row: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


def _timing_headers(job: Any, started: float, truncated: int) -> dict[str, str]:
    now = time.perf_counter()
    queue = ((job.started_at or now) - job.queued_at) * 1000
    return {
        "x-queue-time": f"{queue:.2f}",
        "x-inference-time": f"{job.inference_seconds * 1000:.2f}",
        "x-total-time": f"{(now - started) * 1000:.2f}",
        "x-truncated-inputs": str(truncated),
    }


# The app.


def create_app(encoder: Any, settings: ServerSettings, announce: str | None = None) -> Starlette:
    """The Starlette app serving ``encoder``; its lifespan starts the worker and makes the
    warm-up pass (then prints ``announce``), and stops the worker after the last request."""
    service = Service(encoder, settings)

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
                response = _json(error.body(), error.status, error.headers)
            except _ClientGone:
                response = Response(status_code=499)
            except Exception as error:
                print(f"hiddenpool serve: {name}: {type(error).__name__}: {error}", file=sys.stderr)
                response = _json(
                    RequestError(500, f"internal error ({type(error).__name__})").body(), 500
                )
            service.metrics.requests.inc(1, name, str(response.status_code))
            return response

        return endpoint

    async def read_json(request: Request) -> Any:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(
                415, f"content-type: expected application/json, got {content_type or 'none'!r}"
            )
        declared = request.headers.get("content-length")
        limit = settings.payload_limit
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(
                413, f"body: {declared} bytes is more than --payload-limit {limit}", "body"
            )
        chunks = []
        size = 0
        deadline = time.perf_counter() + settings.read_timeout
        while True:
            remaining = deadline - time.perf_counter()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(request.receive(), remaining)
            except TimeoutError:
                raise RequestError(
                    408,
                    f"body: not received whole within {settings.read_timeout:g} s (--read-timeout)",
                    "body",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body: more than --payload-limit {limit} bytes", "body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return parse_json(b"".join(chunks))

    async def pooled(
        request: Request, parsed: EmbedRequest
    ) -> tuple[dict[str, np.ndarray], Any, list[int], float]:
        started = time.perf_counter()
        plan = service.resolve(parsed)
        if _characters(parsed) <= INLINE_TOKENIZE_CHARACTERS:
            tokenized, cut = service.tokenize(parsed)
        else:
            tokenized, cut = await asyncio.to_thread(service.tokenize, parsed)
        if cut and not parsed.truncate:
            raise RequestError(
                422,
                f"inputs[{cut[0]}]: longer than the model's {service.tokenizer.max_length} "
                "tokens, and truncate is false",
                "inputs",
            )
        service.metrics.truncated_texts.inc(len(cut))
        job = PoolJob(
            tokenized,
            plan.keys,
            plan.states,
            prompt_tokens=plan.prompt_tokens,
            layer_weights=None if plan.mix is None else tuple(plan.mix[0]),
            layer_scale=1.0 if plan.mix is None else plan.mix[1],
        )
        await service.run_pool(job, request)
        results: dict[str, np.ndarray] = {}
        pipeline = encoder.pipeline
        for name, key, is_model in plan.outputs:
            rows = job.results[key]
            renormalize = parsed.normalize
            if is_model and pipeline is not None:
                rows = pipeline.apply(rows)
                renormalize = renormalize or pipeline.normalize
            if parsed.normalize:
                rows = normalize_rows(rows)
            if parsed.dimensions is not None:
                try:
                    rows = truncate_dimensions(rows, parsed.dimensions, renormalize)
                except ValueError as error:
                    raise RequestError(422, str(error), "dimensions") from None
            results[name] = rows
        return results, job, cut, started

    async def openai_embeddings(request: Request) -> Response:
        with service.permit():
            parsed = openai_request(await read_json(request), settings.max_client_batch_size)
            if parsed.model is not None and parsed.model not in service.names:
                raise RequestError(
                    404,
                    f"model: {parsed.model!r} is not served here; this server serves "
                    f"{settings.served_model_name!r}",
                    "model",
                    code="model_not_found",
                )
            results, job, cut, started = await pooled(request, parsed)
            rows = next(iter(results.values()))
            tokens = sum(len(ids) for ids in job.tokenized.ids)
            document = {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": index,
                        "embedding": _vector(row, parsed.encoding_format),
                    }
                    for index, row in enumerate(rows)
                ],
                "model": settings.served_model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return _json(document, headers=_timing_headers(job, started, len(cut)))

    async def embed(request: Request) -> Response:
        with service.permit():
            parsed = embed_request(await read_json(request), settings.max_client_batch_size)
            results, job, cut, started = await pooled(request, parsed)
            tokens = sum(len(ids) for ids in job.tokenized.ids)

            def rows_of(rows: np.ndarray) -> list[Any]:
                return [_vector(row, parsed.encoding_format) for row in rows]

            document: dict[str, Any] = {
                "model": settings.served_model_name,
                "strategy": list(results) if parsed.several else next(iter(results)),
                "embeddings": {name: rows_of(rows) for name, rows in results.items()}
                if parsed.several
                else rows_of(next(iter(results.values()))),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "truncated": cut,
            }
            return _json(document, headers=_timing_headers(job, started, len(cut)))

    async def embed_tokens(request: Request) -> Response:
        with service.permit():
            parsed = tokens_request(await read_json(request), settings.max_client_batch_size)
            started = time.perf_counter()
            try:
                encoder._layer_strategy("first", parsed.layers)
            except ValueError as error:
                raise RequestError(422, str(error), "layers") from None
            tokenized = await asyncio.to_thread(service.tokenizer.tokenize, parsed.inputs)
            job = await service.run_call(
                lambda: encoder.encode_tokens(
                    parsed.inputs, parsed.layers, max_batch_tokens=settings.max_batch_tokens
                ),
                request,
            )
            data = []
            for index, vectors in enumerate(job.result):
                entry: dict[str, Any] = {
                    "index": index,
                    "tokens": list(tokenized.ids[index]),
                    "embeddings": vectors.tolist(),
                }
                if tokenized.encodings is not None:
                    entry["offsets"] = [list(pair) for pair in tokenized.encodings[index].offsets]
                data.append(entry)
            document = {"model": settings.served_model_name, "layers": parsed.layers, "data": data}
            return _json(document, headers=_timing_headers(job, started, tokenized.truncated))

    async def embed_chunks(request: Request) -> Response:
        with service.permit():
            parsed = chunks_request(await read_json(request), settings.max_client_batch_size)
            started = time.perf_counter()
            job = await service.run_call(
                lambda: encoder.encode_chunks(
                    parsed.input,
                    parsed.spans,
                    chunk_tokens=parsed.chunk_tokens,
                    strategy=parsed.strategy,
                    normalize=parsed.normalize,
                    return_spans=True,
                    max_batch_tokens=settings.max_batch_tokens,
                ),
                request,
            )
            vectors, spans = job.result
            document = {
                "model": settings.served_model_name,
                "strategy": parsed.strategy,
                "data": [
                    {"index": i, "span": [int(s), int(e)], "embedding": row.tolist()}
                    for i, (row, (s, e)) in enumerate(zip(vectors, spans, strict=True))
                ],
            }
            return _json(document, headers=_timing_headers(job, started, 0))

    async def health(request: Request) -> Response:
        if service.draining:
            return _json({"status": "draining"}, 503)
        if not service.ready:
            return _json({"status": "starting"}, 503)
        if not service.batcher.alive:
            return _json({"status": "worker stopped"}, 503)
        return _json({"status": "ok"})

    async def info(request: Request) -> Response:
        document = {
            "model": settings.served_model_name,
            "model_path": settings.model_path if settings.expose_paths else None,
            "backend": encoder.backend,
            "family": encoder.family,
            "max_length": encoder.max_length,
            "width": service.width,
            "strategy": settings.strategy,
            "strategy_resolved": encoder.describe_model_strategy()
            if settings.strategy.strip() == "model"
            else str(Strategy.parse(settings.strategy)),
            "limits": {
                "max_batch_tokens": settings.max_batch_tokens,
                "max_concurrent_requests": settings.max_concurrent_requests,
                "max_client_batch_size": settings.max_client_batch_size,
                "payload_limit": settings.payload_limit,
                "request_timeout": settings.request_timeout,
                "read_timeout": settings.read_timeout,
            },
            "version": __version__,
        }
        return _json(document)

    async def models(request: Request) -> Response:
        entry = {
            "id": settings.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "hiddenpool",
        }
        return _json({"object": "list", "data": [entry]})

    async def metrics(request: Request) -> Response:
        service.metrics.queue_texts.set(service.batcher.queued_texts())
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The event loop and the worker take turns at the GIL: at Python's default switch
        # interval (5 ms) a thread waiting for it waited up to 5 ms at every hand-over,
        # which cost the worker more time than small batches' forward passes.
        sys.setswitchinterval(SWITCH_INTERVAL)
        service.batcher.start()
        await asyncio.to_thread(service.warm_up)
        if announce is not None:
            print(announce, flush=True)
        try:
            yield
        finally:
            service.draining = True
            service.batcher.stop()

    routes = [
        Route("/v1/embeddings", route("/v1/embeddings", openai_embeddings), methods=["POST"]),
        Route("/embeddings", route("/v1/embeddings", openai_embeddings), methods=["POST"]),
        Route("/embed", route("/embed", embed), methods=["POST"]),
        Route("/embed_tokens", route("/embed_tokens", embed_tokens), methods=["POST"]),
        Route("/embed_chunks", route("/embed_chunks", embed_chunks), methods=["POST"]),
        Route("/health", route("/health", health), methods=["GET"]),
        Route("/info", route("/info", info), methods=["GET"]),
        Route("/v1/models", route("/v1/models", models), methods=["GET"]),
        Route("/metrics", route("/metrics", metrics), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


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
