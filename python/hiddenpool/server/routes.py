"""The routes' handlers: each reads and checks its body, hands the work to the service,
and writes the answer (OpenAI's shapes on /v1/embeddings, hiddenpool's on its own routes).
Errors are raised as RequestError; ``app`` turns them into responses."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from hiddenpool._version import __version__
from hiddenpool.pipelines import normalize_rows, truncate_dimensions
from hiddenpool.server import openapi
from hiddenpool.server.batcher import PoolJob
from hiddenpool.server.requests import (
    CHUNK_FIELDS,
    EmbedRequest,
    RequestError,
    chunks_request,
    embed_request,
    openai_request,
    parse_json,
    tokens_request,
)
from hiddenpool.server.service import (
    INLINE_TOKENIZE_CHARACTERS,
    ClientGone,
    Service,
    characters,
)
from hiddenpool.strategy import Strategy


def json_response(
    document: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
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


class Routes:
    """The handlers of every route, over one ``Service``."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self.encoder = service.encoder

    async def read_json(self, request: Request) -> Any:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(
                415, f"content-type: expected application/json, got {content_type or 'none'!r}"
            )
        declared = request.headers.get("content-length")
        limit = self.settings.payload_limit
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(
                413, f"body: {declared} bytes is more than --payload-limit {limit}", "body"
            )
        chunks = []
        size = 0
        deadline = time.perf_counter() + self.settings.read_timeout
        while True:
            remaining = deadline - time.perf_counter()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(request.receive(), remaining)
            except TimeoutError:
                raise RequestError(
                    408,
                    f"body: not received whole within {self.settings.read_timeout:g} s "
                    "(--read-timeout)",
                    "body",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body: more than --payload-limit {limit} bytes", "body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return parse_json(b"".join(chunks))

    async def pooled(
        self, request: Request, parsed: EmbedRequest
    ) -> tuple[dict[str, np.ndarray], Any, list[int], float]:
        started = time.perf_counter()
        plan = self.service.resolve(parsed)
        if characters(parsed) <= INLINE_TOKENIZE_CHARACTERS:
            tokenized, cut = self.service.tokenize(parsed)
        else:
            tokenized, cut = await asyncio.to_thread(self.service.tokenize, parsed)
        if cut and not parsed.truncate:
            raise RequestError(
                422,
                f"inputs[{cut[0]}]: longer than the model's {self.service.tokenizer.max_length} "
                "tokens, and truncate is false",
                "inputs",
            )
        self.service.metrics.truncated_texts.inc(len(cut))
        job = PoolJob(
            tokenized,
            plan.keys,
            plan.states,
            prompt_tokens=plan.prompt_tokens,
            layer_weights=None if plan.mix is None else tuple(plan.mix[0]),
            layer_scale=1.0 if plan.mix is None else plan.mix[1],
        )
        await self.service.run_pool(job, request)
        results: dict[str, np.ndarray] = {}
        pipeline = self.encoder.pipeline
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

    async def openai_embeddings(self, request: Request) -> Response:
        with self.service.permit():
            parsed = openai_request(
                await self.read_json(request),
                self.settings.max_client_batch_size,
                self.settings.served_model_name,
            )
            if parsed.model not in self.service.names:
                raise RequestError(
                    404,
                    f"model: {parsed.model!r} is not served here; this server serves "
                    f"{self.settings.served_model_name!r}",
                    "model",
                    code="model_not_found",
                )
            results, job, cut, started = await self.pooled(request, parsed)
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
                "model": self.settings.served_model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return json_response(document, headers=_timing_headers(job, started, len(cut)))

    async def embed(self, request: Request) -> Response:
        with self.service.permit():
            parsed = embed_request(
                await self.read_json(request), self.settings.max_client_batch_size
            )
            results, job, cut, started = await self.pooled(request, parsed)
            tokens = sum(len(ids) for ids in job.tokenized.ids)

            def rows_of(rows: np.ndarray) -> list[Any]:
                return [_vector(row, parsed.encoding_format) for row in rows]

            document: dict[str, Any] = {
                "model": self.settings.served_model_name,
                "strategy": list(results) if parsed.several else next(iter(results)),
                "embeddings": {name: rows_of(rows) for name, rows in results.items()}
                if parsed.several
                else rows_of(next(iter(results.values()))),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "truncated": cut,
            }
            return json_response(document, headers=_timing_headers(job, started, len(cut)))

    async def embed_tokens(self, request: Request) -> Response:
        with self.service.permit():
            parsed = tokens_request(
                await self.read_json(request), self.settings.max_client_batch_size
            )
            started = time.perf_counter()
            try:
                self.encoder._layer_strategy("first", parsed.layers)
            except ValueError as error:
                raise RequestError(422, str(error), "layers") from None
            tokenized = await asyncio.to_thread(self.service.tokenizer.tokenize, parsed.inputs)
            job = await self.service.run_call(
                lambda: self.service.batcher.call_encoder.encode_tokens(
                    parsed.inputs, parsed.layers, max_batch_tokens=self.settings.max_batch_tokens
                ),
                request,
                ("inputs", "layers"),
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
            document = {
                "model": self.settings.served_model_name,
                "layers": parsed.layers,
                "data": data,
            }
            return json_response(
                document, headers=_timing_headers(job, started, tokenized.truncated)
            )

    async def embed_chunks(self, request: Request) -> Response:
        with self.service.permit():
            parsed = chunks_request(
                await self.read_json(request), self.settings.max_client_batch_size
            )
            started = time.perf_counter()
            strategy = parsed.strategy or self.settings.strategy  # --strategy's default
            job = await self.service.run_call(
                lambda: self.service.batcher.call_encoder.encode_chunks(
                    parsed.input,
                    parsed.spans,
                    chunk_tokens=parsed.chunk_tokens,
                    strategy=strategy,
                    normalize=parsed.normalize,
                    return_spans=True,
                    max_batch_tokens=self.settings.max_batch_tokens,
                ),
                request,
                CHUNK_FIELDS,
            )
            vectors, spans = job.result
            document = {
                "model": self.settings.served_model_name,
                "strategy": strategy,
                "data": [
                    {"index": i, "span": [int(s), int(e)], "embedding": row.tolist()}
                    for i, (row, (s, e)) in enumerate(zip(vectors, spans, strict=True))
                ],
            }
            return json_response(document, headers=_timing_headers(job, started, 0))

    async def health(self, request: Request) -> Response:
        if self.service.draining:
            return json_response({"status": "draining"}, 503)
        if not self.service.ready:
            return json_response({"status": "starting"}, 503)
        if not self.service.batcher.alive:
            return json_response({"status": "worker stopped"}, 503)
        return json_response({"status": "ok"})

    async def info(self, request: Request) -> Response:
        document = {
            "model": self.settings.served_model_name,
            "model_path": self.settings.model_path if self.settings.expose_paths else None,
            "backend": self.encoder.backend,
            "precision": self.encoder.precision,
            "quantization": self.encoder.quantization,
            "family": self.encoder.family,
            "max_length": self.encoder.max_length,
            "width": self.service.width,
            "strategy": self.settings.strategy,
            "strategy_resolved": self.encoder.describe_model_strategy()
            if self.settings.strategy.strip() == "model"
            else str(Strategy.parse(self.settings.strategy)),
            "limits": {
                "max_batch_tokens": self.settings.max_batch_tokens,
                "max_concurrent_requests": self.settings.max_concurrent_requests,
                "max_client_batch_size": self.settings.max_client_batch_size,
                "payload_limit": self.settings.payload_limit,
                "request_timeout": self.settings.request_timeout,
                "read_timeout": self.settings.read_timeout,
            },
            "version": __version__,
        }
        return json_response(document)

    async def models(self, request: Request) -> Response:
        entry = {
            "id": self.settings.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "hiddenpool",
        }
        return json_response({"object": "list", "data": [entry]})

    async def openapi(self, request: Request) -> Response:
        return json_response(openapi.document())

    async def metrics(self, request: Request) -> Response:
        self.service.metrics.queue_texts.set(self.service.batcher.queued_texts())
        self.service.metrics.requests_in_flight.set(self.service.in_flight)
        text = self.service.metrics.render()
        if self.service.metrics_view is not None:  # a Ray Serve replica: every replica's
            text = await self.service.metrics_view(text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
