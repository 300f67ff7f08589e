"""The server's worker hands freed memory back to the system (glibc's malloc_trim), at most
once per interval: freed heap memory that glibc would keep is returned, measured in RSS;
and the server runs ONNX Runtime without its arena, with the same rows."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
import types

import pytest

from hiddenpool.server import memory
from hiddenpool.server.memory import Trimmer


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_trimming_returns_freed_heap_memory():
    trimmer = Trimmer(interval=0)
    if not trimmer.available:
        pytest.skip("the C library has no malloc_trim (not glibc)")
    trimmer.worked()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 200 MB in 64 KB blocks (under glibc's mmap threshold, so from the heap), each touched;
    # all freed but the last, which pins the heap's top so free() alone cannot shrink it.
    blocks = [libc.malloc(65536) for _ in range(3200)]
    for block in blocks:
        ctypes.memset(block, 1, 65536)
    before = rss_mb()
    for block in blocks[:-1]:
        libc.free(block)
    freed = rss_mb()
    assert trimmer.maybe_trim()
    trimmed = rss_mb()
    libc.free(blocks[-1])
    assert freed > before - 50  # glibc kept what was freed
    assert trimmed < freed - 150  # and malloc_trim gave it back


def test_trimming_after_work_at_most_once_per_interval(monkeypatch):
    # The trimmer's clock, stepped by hand: a loaded machine's pauses cannot move it.
    now = [1000.0]
    monkeypatch.setattr(memory, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    trimmer = Trimmer(interval=0.2)
    if not trimmer.available:
        pytest.skip("the C library has no malloc_trim (not glibc)")
    now[0] += 0.25
    assert not trimmer.maybe_trim()  # no work since it was made: nothing owed
    trimmer.worked()
    assert trimmer.pending and trimmer.maybe_trim() and not trimmer.pending
    trimmer.worked()
    now[0] += 0.19
    assert not trimmer.maybe_trim()  # owed, but within the interval
    now[0] += 0.02
    assert trimmer.maybe_trim()


def test_the_server_runs_onnx_runtime_without_its_arena(onnx_encoder, minilm_onnx):
    """The server turns the arena off (and the session is rebuilt with it off); rows are
    the same bit for bit."""
    np = pytest.importorskip("numpy")
    from hiddenpool import Encoder
    from hiddenpool.server.service import ServerSettings, Service

    texts = ["a cat sat on the mat", "hi", "the quick brown fox jumps over the lazy dog"]
    expected = onnx_encoder.encode(texts, "mean@last")
    encoder = Encoder.from_pretrained(minilm_onnx)
    assert encoder.runner.memory_arena
    Service(encoder, ServerSettings(model_path=minilm_onnx, served_model_name="m"))
    assert encoder.runner.memory_arena is False and encoder.runner.spin is False
    rows = encoder.encode(texts, "mean@last")
    assert encoder.runner._session.get_session_options().enable_cpu_mem_arena is False
    np.testing.assert_array_equal(rows, expected)


def test_an_idle_worker_trims_once_after_its_last_work(onnx_encoder):
    """A job that ends within the interval of the last trim leaves a trim owed; the idle
    worker pays it when the interval is up instead of at the next request (there is none
    here), and only once."""
    import threading

    from hiddenpool.server.batcher import Batcher, CallJob
    from hiddenpool.server.metrics import Metrics

    batcher = Batcher(onnx_encoder, 1024, Metrics())
    trimmer = batcher._trimmer
    if not trimmer.available:
        pytest.skip("the C library has no malloc_trim (not glibc)")
    trims: list[float] = []
    real_trim = trimmer._trim
    trimmer._trim = lambda pad: trims.append(time.monotonic()) or real_trim(pad)
    trimmer.interval = 1.0
    batcher.start()
    try:
        done = threading.Event()
        rows = []
        job = CallJob(
            function=lambda: rows.append(onnx_encoder.encode(["a cat"] * 50, "mean@last")),
            on_done=lambda _: done.set(),
        )
        last = trimmer._last = time.monotonic()  # a trim just now: the job ends within 1 s
        batcher.submit(job)
        assert done.wait(30) and job.error is None and rows[0].shape == (50, 384)
        waited = time.monotonic() + 30
        while not trims and time.monotonic() < waited:  # the idle worker pays the trim
            time.sleep(0.05)
        time.sleep(1.5)  # and no second one follows
        assert len(trims) == 1 and trims[0] - last >= 0.99  # once, when the interval was up
        assert not trimmer.pending
    finally:
        batcher.stop()


def test_a_request_leaves_no_reference_cycles(onnx_encoder, minilm_onnx):
    """Requests through the OpenAI handler, with the collector off, leave nothing for it
    to find: each request's objects are freed by reference counting as it ends (a cycle
    per request made the event loop's full collections long under load), and the
    answers are the encoder's own rows."""
    import asyncio
    import gc
    import json

    import numpy as np
    from starlette.requests import Request

    from hiddenpool.server.routes import Routes
    from hiddenpool.server.service import ServerSettings, Service

    service = Service(onnx_encoder, ServerSettings(model_path=minilm_onnx, served_model_name="m"))
    routes = Routes(service)
    texts = ["a cat sits on the mat", "two dogs", "x"]
    body = json.dumps({"model": "m", "input": texts}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/embeddings",
        "headers": [(b"content-type", b"application/json")],
    }

    async def one() -> list[list[float]]:
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays
            raise AssertionError("unreachable")

        response = await routes.openai_embeddings(Request(scope, receive))
        assert response.status_code == 200
        return [item["embedding"] for item in json.loads(bytes(response.body))["data"]]

    async def scenario() -> tuple[int, list[list[list[float]]]]:
        await one()  # objects made once (caches, the plan) are not the requests'
        gc.collect()
        gc.disable()
        try:
            answers = [await one() for _ in range(20)]
            return gc.collect(), answers
        finally:
            gc.enable()

    service.batcher.start()
    try:
        unreachable, answers = asyncio.run(scenario())
    finally:
        service.batcher.stop()
    assert unreachable == 0
    expected = onnx_encoder.encode(texts)
    for answer in answers:
        np.testing.assert_allclose(np.array(answer), expected, atol=1e-6)


def test_the_serving_collector_freezes_restores_and_times_collections():
    """While serving, what was alive is frozen out of the scans and full collections are
    rarer; both are as they were afterwards. Each collection's pause is observed: a
    collection of 300,000 cyclic objects, timed from outside, is the one pause recorded,
    within that time."""
    import gc

    from hiddenpool.server.memory import FULL_COLLECTION_EVERY, serving_collector
    from hiddenpool.server.metrics import Histogram

    before = gc.get_threshold()
    pauses = Histogram("pauses", "test", (0.001, 0.01, 0.1, 1))
    with serving_collector(pauses):
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (before[0], before[1], FULL_COLLECTION_EVERY)
        gc.disable()  # no automatic collection while the garbage is made
        try:
            for _ in range(150_000):
                pair: list[object] = []
                pair.append([pair])
            del pair
            started = time.perf_counter()
            collected = gc.collect()
            outside = time.perf_counter() - started
        finally:
            gc.enable()
        assert collected >= 300_000
        assert pauses.count == 1 and 0.5 * outside <= pauses.maximum <= outside
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    gc.collect()
    assert pauses.count == 1  # no longer observed
