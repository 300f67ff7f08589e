"""The cross-request batcher: one worker thread owns the runner; requests queue their
tokenized texts, and the worker takes everything that queued during its previous forward
pass, sorts it by token count, fills batches up to the token budget (no timer: a batch of
one when idle, full batches under load, any number of requests per batch), runs each batch
once for the union of the hidden states its requests need, and pools each request's rows
with the request's own strategies. A request is answered when its last row is pooled.

Rows of a request that was cancelled (its client left, its deadline passed) before their
batch starts are dropped without a forward pass; ``forward_texts`` counts the texts that
did go through the model.

Other work that needs the runner (token vectors, late chunking) is queued as a call and
run by the same thread between batches, so the runner is never used by two threads.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hiddenpool.ops import keep_prompt_weights, pool, state_list
from hiddenpool.runners.tokens import (
    TokenBatch,
    Tokenized,
    pad_batch,
    plan_batches_by_cost,
)
from hiddenpool.server.memory import Trimmer
from hiddenpool.server.metrics import Metrics


class JobFailed(Exception):
    """A request's rows could not be computed: the message (one line, no traceback) is
    safe to show the client, with the HTTP status that fits (422: the request's own input,
    500: the forward pass, 503: the worker is gone)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class PoolJob:
    """One request's texts, tokenized, and how to pool them."""

    tokenized: Tokenized
    keys: list[str]  # strategies as canonical text; "model" already resolved
    states: frozenset[int]
    prompt_tokens: int = 0
    missing_eos: str = "raise"
    layer_weights: tuple[float, ...] | None = None
    layer_scale: float = 1.0
    on_done: Callable[[PoolJob], None] = lambda job: None
    results: dict[str, np.ndarray] = field(default_factory=dict)
    remaining: int = 0
    error: BaseException | None = None
    cancelled: bool = False
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    inference_seconds: float = 0.0
    _finished: bool = False

    def __post_init__(self) -> None:
        self.remaining = len(self.tokenized.ids)

    @property
    def signature(self) -> tuple[Any, ...]:
        """Jobs with the same signature are pooled in one call."""
        return (tuple(self.keys), self.missing_eos, self.layer_weights, self.layer_scale)


@dataclass(eq=False)
class CallJob:
    """A function to run on the worker thread (it alone uses the runner)."""

    function: Callable[[], Any]
    on_done: Callable[[CallJob], None]
    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    inference_seconds: float = 0.0


class MeteredRunner:
    """The encoder's runner, each forward pass counted in ``/metrics`` as the batcher counts
    its own (texts, batch sizes, inference seconds): for call jobs (token vectors, late
    chunking), which batch inside the Encoder. Everything else is the runner's."""

    def __init__(self, runner: Any, observe: Callable[[TokenBatch, float], None]) -> None:
        self._runner = runner
        self._observe = observe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def run(self, batch: TokenBatch, states: frozenset[int]) -> Any:
        started = time.perf_counter()
        hidden = self._runner.run(batch, states)
        self._observe(batch, time.perf_counter() - started)
        return hidden


@dataclass
class _Row:
    job: PoolJob
    index: int  # the row's index in its job
    length: int


# The worker takes at most this many queued rows at a time (oldest first), and splits them
# into batches by padded-token cost (``plan_batches_by_cost``, quadratic in the rows).
TAKE_ROWS = 256
# A forward pass's fixed cost in padded tokens, for that split. Measured on all-MiniLM-L6-v2
# ONNX fp32, 2 threads, random groups of 22 and 64 STS-B sentences: 16 tokens gave
# 285 and 301 sentences/s, 48 gave 277 and 313, 96 gave 266 and 344; one padded batch per
# group gave 209 and 187.
BATCH_COST_TOKENS = 64


class WorkerKilled(BaseException):
    """Raised by the test hook that kills the worker thread (not an Exception, so nothing
    on the way catches it)."""


FAIL_TOKEN_VARIABLE = "HIDDENPOOL_TEST_FAIL_TOKEN"
KILL_TOKEN_VARIABLE = "HIDDENPOOL_TEST_KILL_TOKEN"


def _fault_hook_from_environment() -> Callable[[TokenBatch], None] | None:
    """Test hooks, off unless set: a batch holding token id ``$HIDDENPOOL_TEST_FAIL_TOKEN``
    fails its forward pass (RuntimeError); one holding ``$HIDDENPOOL_TEST_KILL_TOKEN``
    kills the worker thread. The reliability tests use them to fault a running server."""
    fail = os.environ.get(FAIL_TOKEN_VARIABLE)
    kill = os.environ.get(KILL_TOKEN_VARIABLE)
    if fail is None and kill is None:
        return None

    def hook(batch: TokenBatch) -> None:
        ids = batch.ids[batch.mask != 0]
        if kill is not None and (ids == int(kill)).any():
            raise WorkerKilled("the worker was killed by the test hook")
        if fail is not None and (ids == int(fail)).any():
            raise RuntimeError("the forward pass failed by the test hook")

    return hook


class Batcher:
    """The worker thread and its queue. ``submit`` and ``cancel`` may be called from any
    thread; ``on_done`` callbacks run on the worker thread."""

    def __init__(self, encoder: Any, max_batch_tokens: int, metrics: Metrics) -> None:
        self.encoder = encoder
        # What call jobs run on: the same runner and pipeline, its passes counted.
        self.call_encoder = type(encoder).from_runner(
            MeteredRunner(encoder.runner, self._observe_batch), encoder.pipeline
        )
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self._rows: list[_Row] = []
        self._calls: list[CallJob] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="hiddenpool-worker", daemon=True)
        self.alive = True  # False once the worker died and cannot recover
        # Forward passes failed since the last that succeeded (Ray Serve's health check).
        self.failures_in_a_row = 0
        self._taken: list[_Row] = []  # the rows the worker took and has not finished
        self.fault_hook: Callable[[TokenBatch], None] | None = _fault_hook_from_environment()
        self._trimmer = Trimmer()  # freed memory back to the system, once a second at most

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def queued_texts(self) -> int:
        with self._condition:
            return len(self._rows)

    def submit(self, job: PoolJob | CallJob) -> None:
        with self._condition:
            if not self.alive:
                raise JobFailed("the model worker stopped; the server cannot compute", 503)
            if isinstance(job, CallJob):
                self._calls.append(job)
            else:
                if job.remaining == 0:
                    job._finished = True
                    job.on_done(job)
                    return
                self._rows.extend(
                    _Row(job, index, max(len(ids), 1))
                    for index, ids in enumerate(job.tokenized.ids)
                )
                self.metrics.queue_texts.set(len(self._rows))
            self._condition.notify()

    def cancel(self, job: PoolJob | CallJob) -> None:
        """Rows of ``job`` not yet in a running batch are dropped."""
        with self._condition:
            job.cancelled = True
            if isinstance(job, PoolJob):
                before = len(self._rows)
                self._rows = [row for row in self._rows if row.job is not job]
                self.metrics.cancelled_texts.inc(before - len(self._rows))
                self.metrics.queue_texts.set(len(self._rows))
            elif job in self._calls:
                self._calls.remove(job)

    # The worker thread.

    def _work(self) -> None:
        try:
            while True:
                with self._condition:
                    while not self._rows and not self._calls and not self._stopping:
                        if self._trimmer.pending:
                            # Idle after work: trim once the interval is up, not at the
                            # next request (a burst's memory would stay until then).
                            self._condition.wait(self._trimmer.interval)
                            self._trimmer.maybe_trim()
                        else:
                            self._condition.wait()
                    if self._stopping and not self._rows and not self._calls:
                        return
                    calls, self._calls = self._calls, []
                    # The oldest rows, up to TAKE_ROWS: requests finish in the order they came
                    # and their clients send the next while these run (taking a whole queue
                    # of 1,000 rows finished every request at its end, then left the worker
                    # with a near-empty queue: 0.68x offline at 64 clients x 16 texts).
                    rows, self._rows = self._rows[:TAKE_ROWS], self._rows[TAKE_ROWS:]
                    self._taken = rows
                    self.metrics.queue_texts.set(len(self._rows))
                for call in calls:
                    self._run_call(call)
                if rows:
                    self._run_rows(rows)
                self._trimmer.worked()
                self._trimmer.maybe_trim()
        except BaseException as error:
            # The worker must not die silently: say why, and fail what waits on it.
            print(
                f"hiddenpool serve: the model worker stopped: {type(error).__name__}: {error}",
                file=sys.stderr,
            )
            self._die(error)

    def _die(self, error: BaseException) -> None:
        """The worker cannot go on: every queued request fails and new ones are refused."""
        with self._condition:
            self.alive = False
            rows, self._rows = self._rows, []
            calls, self._calls = self._calls, []
        failure = JobFailed(f"the model worker stopped ({type(error).__name__})", 503)
        jobs = {id(row.job): row.job for row in [*self._taken, *rows]}
        for job in jobs.values():
            self._fail(job, failure)
        for call in calls:
            call.error = failure
            call.on_done(call)

    def _run_call(self, call: CallJob) -> None:
        if call.cancelled:
            return
        call.started_at = time.perf_counter()
        try:
            call.result = call.function()
        except Exception as error:
            call.error = error
        call.inference_seconds = time.perf_counter() - call.started_at
        call.on_done(call)

    def _run_rows(self, rows: list[_Row]) -> None:
        """Every row taken from the queue, in batches sorted by length; rows of a job
        cancelled meanwhile are skipped before their batch runs."""
        lengths = [row.length for row in rows]
        plan = plan_batches_by_cost(lengths, self.max_batch_tokens, BATCH_COST_TOKENS)
        for indices in plan:
            batch_rows = [rows[index] for index in indices if not rows[index].job.cancelled]
            batch_rows = [row for row in batch_rows if row.job.error is None]
            skipped = len(indices) - len(batch_rows)
            if skipped:
                self.metrics.cancelled_texts.inc(skipped)
            if batch_rows:
                self._run_batch(batch_rows)

    def _run_batch(self, rows: list[_Row]) -> None:
        jobs = list({id(row.job): row.job for row in rows}.values())
        started = time.perf_counter()
        for job in jobs:
            if job.started_at is None:
                job.started_at = started
                self.metrics.queue_seconds.observe(started - job.queued_at)
        tokenized = Tokenized(
            ids=[row.job.tokenized.ids[row.index] for row in rows],
            type_ids=None
            if any(row.job.tokenized.type_ids is None for row in rows)
            else [row.job.tokenized.type_ids[row.index] for row in rows],  # type: ignore[index]
            truncated=0,
        )
        runner = self.encoder.runner
        batch = pad_batch(tokenized, list(range(len(rows))), runner.tokenizer)
        states = frozenset().union(*(job.states for job in jobs))
        try:
            if self.fault_hook is not None:
                self.fault_hook(batch)
            hidden = runner.run(batch, states)
        except Exception as error:
            failure = JobFailed(f"the forward pass failed ({type(error).__name__})")
            for job in jobs:
                self._fail(job, failure)
            self.metrics.batch_failures.inc()
            self.failures_in_a_row += 1
            return
        self.failures_in_a_row = 0
        seconds = time.perf_counter() - started
        for job in jobs:
            job.inference_seconds += seconds
        self._observe_batch(batch, seconds)
        self._pool_batch(rows, batch, hidden, seconds)

    def _observe_batch(self, batch: TokenBatch, seconds: float) -> None:
        """One forward pass in ``/metrics``: its texts, padded tokens and seconds."""
        self.metrics.forward_texts.inc(int(batch.ids.shape[0]))
        self.metrics.batch_texts.observe(int(batch.ids.shape[0]))
        self.metrics.batch_tokens.observe(int(batch.ids.size))
        self.metrics.inference_seconds.observe(seconds)

    def _pool_batch(self, rows: list[_Row], batch: TokenBatch, hidden: Any, seconds: float) -> None:
        groups: dict[tuple[Any, ...], list[int]] = {}
        for position, row in enumerate(rows):
            groups.setdefault(row.job.signature, []).append(position)
        eos_ids, eos_token_id = self.encoder.eos_inputs(batch.ids)
        real = batch.mask != 0
        hidden = state_list(hidden)
        for positions in groups.values():
            first = rows[positions[0]].job
            picked = np.asarray(positions)
            prompt = np.array([rows[p].job.prompt_tokens for p in positions])[:, None]
            mask = real[picked] & (np.cumsum(real[picked], axis=1) > prompt)
            sub_hidden = [None if state is None else state[picked] for state in hidden]
            try:
                pooled = pool(
                    sub_hidden,
                    mask,
                    first.keys,
                    input_ids=eos_ids[picked],
                    eos_token_id=eos_token_id,
                    missing_eos=first.missing_eos,  # type: ignore[arg-type]
                    layer_weights=first.layer_weights,
                    layer_scale=first.layer_scale,
                )
            except ValueError:
                # One request's texts (an eos pool without the token): fail the requests of
                # this group, each by its own rows where it can be told apart.
                self._pool_each(rows, positions, sub_hidden, mask, eos_ids[picked], eos_token_id)
                continue
            if prompt.any():
                # Left-out prompts: weighted means keep each token's rank in the whole text.
                pooled = {
                    key: keep_prompt_weights(
                        value,
                        sub_hidden,
                        mask,
                        real[picked],
                        key,
                        layer_weights=first.layer_weights,
                        layer_scale=first.layer_scale,
                    )
                    for key, value in pooled.items()
                }
            finished = {key: self.encoder.runner.finish(value) for key, value in pooled.items()}
            for offset, position in enumerate(positions):
                self._deliver(rows[position], {k: v[offset] for k, v in finished.items()}, seconds)

    def _pool_each(
        self,
        rows: list[_Row],
        positions: list[int],
        hidden: Sequence[Any],
        mask: np.ndarray,
        eos_ids: np.ndarray,
        eos_token_id: int | None,
    ) -> None:
        by_job: dict[int, list[int]] = {}
        for offset, position in enumerate(positions):
            by_job.setdefault(id(rows[position].job), []).append(offset)
        for offsets in by_job.values():
            job = rows[positions[offsets[0]]].job
            picked = np.asarray(offsets)
            try:
                pooled = pool(
                    [None if state is None else state[picked] for state in hidden],
                    mask[picked],
                    job.keys,
                    input_ids=eos_ids[picked],
                    eos_token_id=eos_token_id,
                    missing_eos=job.missing_eos,  # type: ignore[arg-type]
                    layer_weights=job.layer_weights,
                    layer_scale=job.layer_scale,
                )
            except ValueError as own:
                self._fail(job, JobFailed(str(own).splitlines()[0], 422))
                continue
            finished = {key: self.encoder.runner.finish(value) for key, value in pooled.items()}
            for index, offset in enumerate(offsets):
                self._deliver(
                    rows[positions[offset]], {k: v[index] for k, v in finished.items()}, 0
                )

    def _deliver(self, row: _Row, vectors: dict[str, np.ndarray], seconds: float) -> None:
        job = row.job
        if job.error is not None or job._finished:
            return
        for key, vector in vectors.items():
            if key not in job.results:
                job.results[key] = np.empty((len(job.tokenized.ids), vector.shape[0]), np.float32)
            job.results[key][row.index] = vector
        job.remaining -= 1
        if job.remaining == 0:
            job._finished = True
            job.on_done(job)

    def _fail(self, job: PoolJob, error: BaseException) -> None:
        if job._finished:
            return
        job.error = error
        job._finished = True
        with self._condition:
            self._rows = [row for row in self._rows if row.job is not job]
        job.on_done(job)
