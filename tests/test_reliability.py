"""Threads, torch's own threads, memory growth, and the encoder under odd and large input."""

from __future__ import annotations

import gc
import os
import sys
import threading

import numpy as np
import pytest
import torch

import hiddenpool
import tiny_models
from hiddenpool import _native
from hiddenpool.encoder import Encoder

STRATEGIES = ["mean@last", "max+first@last", "mean@last3:sum", "weighted_mean@last2:concat"]


def shared_inputs(batch: int, tokens: int, hidden: int):
    rng = np.random.default_rng(batch * tokens + hidden)
    layers = [rng.standard_normal((batch, tokens, hidden)).astype(np.float32) for _ in range(3)]
    mask = (rng.random((batch, tokens)) < 0.7).astype(np.int64)
    return layers, mask


def test_sixteen_threads_give_the_single_thread_results():
    cases = [shared_inputs(2, 5, 8), shared_inputs(24, 200, 256), shared_inputs(3, 400, 512)]
    expected = [hiddenpool.pool(layers, mask, STRATEGIES) for layers, mask in cases]
    failures: list[str] = []
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work(worker: int) -> None:
        for round_number in range(6):
            index = (worker + round_number) % len(cases)
            layers, mask = cases[index]
            results = hiddenpool.pool(layers, mask, STRATEGIES)
            for key, value in results.items():
                if not np.array_equal(value, expected[index][key]):
                    failures.append(f"worker {worker}, case {index}, {key}")

    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "a worker hung"
    finally:
        sys.setswitchinterval(previous)
    assert failures == []


def test_no_deadlock_beside_torch_intra_op_threads():
    layers, mask = shared_inputs(16, 256, 512)
    tensors = [torch.from_numpy(layer) for layer in layers]
    expected = hiddenpool.pool(tensors, torch.from_numpy(mask), "mean+max@last3:sum")
    matrix = torch.randn(512, 512)
    errors: list[BaseException] = []

    def torch_work() -> None:
        try:
            for _ in range(40):
                matrix @ matrix
                torch.stack(tensors).sum(0)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def pool_work() -> None:
        try:
            for _ in range(40):
                result = hiddenpool.pool(tensors, torch.from_numpy(mask), "mean+max@last3:sum")
                assert torch.equal(result, expected)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=torch_work), threading.Thread(target=pool_work)]
    threads += [threading.Thread(target=pool_work)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads), "deadlock beside torch"
    assert errors == []


def resident_megabytes() -> float:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_stays_bounded_over_many_calls():
    small_layers, small_mask = shared_inputs(2, 6, 16)
    large_layers, large_mask = shared_inputs(32, 256, 384)
    for _ in range(200):  # warm up allocator pools and the worker threads
        _native.pool(small_layers, small_mask, ["mean", "max"])
        hiddenpool.pool(large_layers, large_mask, "mean+max@last3:sum")
    gc.collect()
    start = resident_megabytes()
    for _ in range(100_000):
        _native.pool(small_layers, small_mask, ["mean", "max"], "sum")
    for _ in range(5_000):
        hiddenpool.pool(small_layers, small_mask, STRATEGIES)
    after_small = resident_megabytes()
    for _ in range(1_000):
        hiddenpool.pool(large_layers, large_mask, "mean+max@last3:sum")
    gc.collect()
    after_large = resident_megabytes()
    # Measured on the development machine: +0.01 MB after each phase (620.5 MB resident).
    assert after_small - start < 16, (start, after_small)
    assert after_large - start < 32, (start, after_large)


@pytest.fixture(scope="module")
def tiny_encoder() -> Encoder:
    model, tokenizer = tiny_models.bert()
    return Encoder(model, tokenizer, max_length=16)


def test_odd_texts_each_get_their_own_row(tiny_encoder):
    texts = [
        "",
        " ",
        "the cat " * 200,  # far over max_length
        "emoji 🙂🚀 and ünïcödé",
        "control \x00\x07\x1b[31m chars\r\n",
        "\u200b\u200d zero width",
        "the cat sat",
    ]
    with pytest.warns(UserWarning, match="1 of 7 texts were longer than max_length=16"):
        together = tiny_encoder.encode(texts, "mean+max@last", batch_size=3)
    assert together.shape == (len(texts), 32) and np.isfinite(together).all()
    for index, text in enumerate(texts):
        alone = tiny_encoder.encode([text], "mean+max@last")
        np.testing.assert_allclose(together[index], alone[0], atol=1e-5)


def test_ten_thousand_texts_in_one_call_keep_their_order(tiny_encoder):
    rng = np.random.default_rng(0)
    words = tiny_models.WORDS
    texts = [" ".join(rng.choice(words, rng.integers(0, 20))) for _ in range(10_000)]
    result = tiny_encoder.encode(texts, "mean@last", batch_size=256, progress=False)
    assert result.shape == (10_000, 16)
    for index in rng.choice(10_000, 25, replace=False):
        alone = tiny_encoder.encode([texts[index]], "mean@last")
        np.testing.assert_allclose(result[index], alone[0], atol=1e-5)
