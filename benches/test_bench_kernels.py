"""pytest-benchmark suites: hiddenpool and its peers on the same inputs, grouped per
operation so pytest-benchmark prints them side by side.

    .venv/bin/pytest benches/test_bench_kernels.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch

import hiddenpool
from hiddenpool import bench

SHAPES = [(32, 256, 768)]
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(
    scope="module",
    params=[(s, d) for s in SHAPES for d in DTYPES],
    ids=lambda p: f"{'x'.join(map(str, p[0]))}-{str(p[1])[6:]}",
)
def inputs(request) -> bench.Inputs:
    (batch, tokens, hidden), dtype = request.param
    threads = min(2, torch.get_num_threads())
    torch.set_num_threads(threads)
    hiddenpool.set_num_threads(threads)
    return bench.make_inputs(batch, tokens, hidden, dtype)


@pytest.mark.parametrize("operation", bench.OPERATIONS)
def test_hiddenpool(benchmark, inputs, operation):
    benchmark.group = f"{operation} {inputs.last.dtype} {list(inputs.last.shape)}"
    benchmark(bench.ours(inputs, operation))


@pytest.mark.parametrize("operation", bench.OPERATIONS)
def test_peers(benchmark, inputs, operation):
    peers = bench.peers(inputs, operation)
    if not peers:
        pytest.skip("no peer for this operation")
    name, function = next(iter(peers.items()))
    benchmark.group = f"{operation} {inputs.last.dtype} {list(inputs.last.shape)}"
    benchmark.name = name
    benchmark(function)


def test_floor(benchmark, inputs):
    benchmark.group = f"floor {inputs.last.dtype} {list(inputs.last.shape)}"
    benchmark(bench.floor(inputs, "mean"))
