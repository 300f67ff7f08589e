"""A small run of every kernel entry point, for valgrind (see `make valgrind`): numpy only,
so the interpreter under valgrind stays fast enough."""

import contextlib

import numpy as np

from hiddenpool import _native

rng = np.random.default_rng(0)
layers = [rng.standard_normal((3, 9, 20)).astype(dtype) for dtype in ("float32",) * 3]
mask = (rng.random((3, 9)) < 0.7).astype(np.int64)
index = np.array([0, 4, -1])
for combine in ("sum", "mean", "concat"):
    _native.pool(
        layers,
        mask,
        ["mean", "max", "weighted_mean", "first", "last", "index"],
        combine,
        None,
        index,
    )
_native.pool(
    [layer.astype(np.float16) for layer in layers],
    mask,
    ["mean", "max"],
    "weighted",
    [0.2, 0.3, 0.5],
)
_native.pool([layer[:, ::-1, ::2] for layer in layers], mask[:, ::-1], ["sum"], "mean")
big = rng.standard_normal((8, 128, 256)).astype(np.float32)  # large enough for the worker pool
_native.pool([big], np.ones((8, 128), dtype=bool), ["mean", "max"])
_native.pool_packed([layers[0].reshape(27, 20)], np.array([0, 5, 5, 27]), ["mean", "last"])
_native.find_token(rng.integers(0, 5, (3, 9)), mask, 2)
for bad in (
    lambda: _native.pool([layers[0]], mask[:2], ["mean"]),
    lambda: _native.pool_packed([big[0]], np.array([0, 3, 1]), ["mean"]),
):
    with contextlib.suppress(ValueError):
        bad()
print("valgrind smoke run finished")
