"""The state every route shares: the model, its batcher, the settings, the permits of
the concurrent-request limit, and the steps of an embedding request that are not HTTP
(resolving strategies, tokenizing, waiting on the worker with the client and the deadline
watched)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from hiddenpool.runners.base import needed_states
from hiddenpool.runners.tokens import Tokenized
from hiddenpool.server.batcher import Batcher, CallJob, JobFailed, PoolJob
from hiddenpool.server.metrics import Metrics
from hiddenpool.server.requests import EmbedRequest, RequestError
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
FAIL_TEXT_VARIABLE = "HIDDENPOOL_TEST_FAIL_TEXT"  # the reliability tests' tokenizer fault


def characters(request: EmbedRequest) -> int:
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
        # Ray Serve replicas: turns this replica's metrics text into what /metrics answers
        # (every replica's, labelled); None: this process's own.
        self.metrics_view: Callable[[str], Awaitable[str]] | None = None
        runner = encoder.runner
        if hasattr(runner, "spin"):
            runner.spin = False  # the event loop needs the cores between batches
        if hasattr(runner, "memory_arena"):
            # Buffers from the system, handed back between batches (server/memory.py):
            # the arena grew in steps over a soak and held them.
            runner.memory_arena = False
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
        # Test hook, off unless set: a text holding this string fails its tokenizing.
        self._fail_text = os.environ.get(FAIL_TEXT_VARIABLE) or None
        self._plans: dict[tuple[Any, ...], Plan] = {}
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

    def resolve(self, request: EmbedRequest) -> Plan:
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

    def _resolve(self, request: EmbedRequest) -> Plan:
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
        return Plan(outputs, keys, states, prompt_tokens, mix)

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
        try:
            if self._fail_text is not None and any(self._fail_text in text for text in texts):
                raise RuntimeError("the tokenizer failed by the test hook")
            tokenized = self.tokenizer.tokenize(texts)
        except Exception as error:
            # This request fails alone (its texts never reach the queue), in one line; the
            # log says why, as for any other unexpected error.
            print(f"hiddenpool serve: tokenizing: {type(error).__name__}: {error}", file=sys.stderr)
            raise RequestError(
                500, f"tokenizing the input failed ({type(error).__name__})"
            ) from None
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
        """``job``'s rows through the batcher; its failure as the RequestError that fits."""
        await self._submit(job, request)
        if job.error is not None:
            status = job.error.status if isinstance(job.error, JobFailed) else 500
            raise RequestError(status, str(job.error), "input" if status == 422 else None)
        return job

    async def run_call(
        self, function: Callable[[], Any], request: Request, fields: Sequence[str] = ()
    ) -> CallJob:
        """``function`` on the worker thread (token vectors, late chunking). Its ValueError
        or TypeError is a 422 whose ``param`` is the request field the message starts with
        (one of ``fields``: ``spans[2] = ...`` names ``spans``)."""
        job = CallJob(function, lambda finished: None)
        await self._submit(job, request)
        if job.error is not None:
            if isinstance(job.error, (ValueError, TypeError)):
                message = str(job.error).splitlines()[0]
                head = re.split(r"[\[ :=]", message, maxsplit=1)[0]
                raise RequestError(422, message, head if head in fields else None)
            raise RequestError(500, f"the computation failed ({type(job.error).__name__})")
        return job

    async def _submit(self, job: PoolJob | CallJob, request: Request) -> None:
        """Queues ``job`` and waits for the worker to finish it (the worker's callback
        wakes this loop)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        # The future's result is None, not the job: job -> on_done -> done -> job would be a
        # reference cycle per request, left for Python's cyclic collector. Under overload
        # those cycles (19 objects a request, promoted while the request waits in the
        # queue) made full collections of 50-100 ms on the event loop every few seconds,
        # the p99 of the 429s.
        def finished(finished_job: Any) -> None:
            loop.call_soon_threadsafe(_resolve, done)

        job.on_done = finished
        try:
            self.batcher.submit(job)
        except JobFailed as error:
            raise RequestError(error.status, str(error)) from None
        await self._wait(done, request, lambda: self.batcher.cancel(job))

    async def _wait(
        self, done: asyncio.Future[None], request: Request, cancel: Callable[[], None]
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
            raise ClientGone
        raise RequestError(
            504,
            f"request timed out after {self.settings.request_timeout:g} s "
            "(--request-timeout); its texts were dropped",
        )


class ClientGone(Exception):
    """The client disconnected; nothing is sent."""


@dataclass
class Plan:
    outputs: list[tuple[str, str, bool]]  # (name as given, pooled key, is "model")
    keys: list[str]
    states: frozenset[int]
    prompt_tokens: int
    mix: tuple[list[float], float] | None = None  # the model pipeline's learned layer mix


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _disconnected(request: Request) -> None:
    """Returns when the client has disconnected (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
