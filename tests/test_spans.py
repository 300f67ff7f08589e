"""pool_spans: random spans over every pool, combine, dtype and layout, against the plain
numpy reference on a copy of each span's row; the Rust kernels against the torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hiddenpool
import reference
from hiddenpool import Strategy

POOLS = ["mean", "sum", "max", "mean_sqrt_len", "weighted_mean", "first", "last"]
STRATEGIES = [f"{pool}@last" for pool in POOLS] + [
    "mean+max@last4:sum",
    "first+weighted_mean@last4:mean",
    "max+mean_sqrt_len@-3,-1:concat",
    "sum@all:weighted",
    "last@embeddings",
]
TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "float16": 1e-5, "bfloat16": 1e-5}


def random_case(seed: int, padding: str, batch: int = 4, tokens: int = 11, hidden: int = 6):
    """Layers (embeddings + 4), a mask padded on ``padding`` with a hole and an empty row,
    and 8 spans per row drawn at random (empty and whole-row spans included)."""
    rng = np.random.default_rng(seed)
    layers = [rng.standard_normal((batch, tokens, hidden)).astype(np.float32) for _ in range(5)]
    lengths = rng.integers(1, tokens + 1, batch)
    lengths[0] = tokens
    lengths[-1] = 0
    positions = np.arange(tokens)
    if padding == "right":
        mask = positions[None, :] < lengths[:, None]
    else:
        mask = positions[None, :] >= (tokens - lengths)[:, None]
    mask[1, tokens // 2] = False  # a hole (a masked-out prompt token, say)
    for layer in layers:
        layer[~mask] = np.nan  # padding must never be read
    spans = []
    for row in range(batch):
        for _ in range(8):
            start, end = sorted(rng.integers(0, tokens + 1, 2))
            spans.append((row, start, end))
    spans += [(0, 0, tokens), (2, 3, 3)]
    return layers, mask, np.array(spans, dtype=np.int64)


def expected_spans(strategy: str, layers, mask, spans, weights=None, bfloat16=False):
    """The reference: each span's row copied, its mask narrowed to the span, pooled."""
    parsed = Strategy.parse(strategy)
    indices = parsed.resolve_layers(len(layers))
    combine = parsed.combine or "sum"
    rows, start, end = spans[:, 0], spans[:, 1], spans[:, 2]
    positions = np.arange(mask.shape[1])
    narrowed = mask[rows] & (positions >= start[:, None]) & (positions < end[:, None])
    chosen = [np.asarray(layers[i])[rows] for i in indices]
    mix = None
    if combine == "weighted":
        exponent = np.exp(np.asarray(weights) - np.max(weights))
        mix = list(exponent / exponent.sum())
    return reference.pool(chosen, narrowed, parsed.pools, combine, mix, bfloat16=bfloat16)


def stored(layers, dtype: str):
    if dtype == "bfloat16":
        return [
            torch.from_numpy(reference.to_bfloat16_bits(x)).view(torch.bfloat16) for x in layers
        ]
    if dtype == "float16":
        return [x.astype(np.float16) for x in layers]
    return [x.astype(dtype) for x in layers]


def host_values(layers, dtype: str):
    """float64 values of what the kernels read (rounded to the dtype)."""
    if dtype == "bfloat16":
        return [reference.widen(x.view(torch.int16).numpy(), bfloat16=True) for x in layers]
    return [np.asarray(x, dtype=np.float64) for x in layers]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_spans_match_reference_and_torch_path(dtype, padding):
    layers, mask, spans = random_case(seed=len(dtype) * 2 + (padding == "left"), padding=padding)
    data = stored(layers, dtype)
    values = host_values(data, dtype)
    weights = [0.3, -0.2, 0.5, 0.1]
    for strategy in STRATEGIES:
        options = {"layer_weights": weights} if strategy.endswith(":weighted") else {}
        expected = expected_spans(strategy, values, mask, spans, weights)
        rust = hiddenpool.pool_spans(
            data, spans, strategy, attention_mask=mask, backend="rust", **options
        )
        on_torch = hiddenpool.pool_spans(
            data, spans, strategy, attention_mask=mask, backend="torch", **options
        )
        rust, on_torch = (np.asarray(x, dtype=np.float64) for x in (rust, on_torch))
        assert rust.shape == expected.shape, strategy
        assert not np.isnan(rust).any(), f"{strategy}: padding leaked"
        scale = max(1.0, np.abs(expected).max())
        tolerance = TOLERANCE[dtype] * scale
        np.testing.assert_allclose(rust, expected, atol=tolerance, rtol=0, err_msg=strategy)
        np.testing.assert_allclose(on_torch, rust, atol=tolerance, rtol=0, err_msg=strategy)


def test_non_contiguous_layers_and_spans_read_the_same_values():
    layers, mask, spans = random_case(seed=3, padding="right")
    transposed = [np.ascontiguousarray(x.transpose(2, 0, 1)).transpose(1, 2, 0) for x in layers]
    assert not transposed[0].flags.c_contiguous
    spans_fortran = np.asfortranarray(spans.astype(np.int32))
    expected = hiddenpool.pool_spans(layers, spans, "mean+max@last4:concat", attention_mask=mask)
    got = hiddenpool.pool_spans(
        transposed, spans_fortran, "mean+max@last4:concat", attention_mask=mask[:, :]
    )
    np.testing.assert_array_equal(got, expected)


def test_packed_spans_equal_padded_spans():
    layers, mask, spans = random_case(seed=5, padding="right")
    lengths = mask.sum(1)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    packed = [np.concatenate([x[row, : lengths[row]] for row in range(len(x))]) for x in layers]
    # Packed positions count real tokens only: keep the spans inside each row's tokens
    # (the hole in row 1 makes its padded positions differ, so drop that row).
    inside = (spans[:, 0] != 1) & (spans[:, 2] <= lengths[spans[:, 0]])
    chosen = spans[inside]
    assert len(chosen) > 10
    for strategy in ["mean+max@last", "weighted_mean+last@last4:mean"]:
        expected = hiddenpool.pool_spans(layers, chosen, strategy, attention_mask=mask)
        got = hiddenpool.pool_spans(packed, chosen, strategy, offsets=offsets)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_torch_tensors_come_back_as_tensors_and_spans_may_be_tensors():
    layers, mask, spans = random_case(seed=1, padding="left")
    tensors = [torch.from_numpy(x) for x in layers]
    result = hiddenpool.pool_spans(tensors, torch.from_numpy(spans), attention_mask=mask)
    assert isinstance(result, torch.Tensor)
    np.testing.assert_array_equal(
        result.numpy(), hiddenpool.pool_spans(layers, spans, attention_mask=mask)
    )
    several = hiddenpool.pool_spans(layers, spans, ["max@last", "mean@-2"], attention_mask=mask)
    assert list(several) == ["max@last", "mean@-2"]


def test_empty_spans_follow_empty():
    layers, mask, spans = random_case(seed=2, padding="right")
    pooled = hiddenpool.pool_spans(layers, spans, "max@last", attention_mask=mask)
    counts = np.array([mask[r, s:e].sum() for r, s, e in spans])
    assert (counts == 0).any()
    np.testing.assert_array_equal(pooled[counts == 0], 0.0)
    with pytest.raises(ValueError, match=r"spans: \d+ span\(s\) hold no real token: "):
        hiddenpool.pool_spans(layers, spans, "max@last", attention_mask=mask, empty="raise")
    # No spans at all: [0, D].
    none = hiddenpool.pool_spans(layers, np.zeros((0, 3), np.int64), "mean+max@last")
    assert none.shape == (0, 12)


@pytest.mark.parametrize(
    ("spans", "error", "message"),
    [
        ([[4, 0, 1]], ValueError, r"spans\[0\] = \(4, 0, 1\): row 4 is outside 0\.\.4"),
        ([[0, 1, 1], [1, 5, 2]], ValueError, r"spans\[1\] = \(1, 5, 2\): needs 0 <= start"),
        ([[0, 0, 12]], ValueError, r"end <= 11 \(the row's token positions\)"),
        ([[0, -1, 2]], ValueError, r"spans\[0\]"),
        ([[0, 1]], ValueError, r"spans: expected shape \[S, 3\]"),
        ([[0.0, 1.0, 2.0]], TypeError, r"spans: expected integer"),
    ],
)
def test_bad_spans_are_named(spans, error, message):
    layers, mask, _ = random_case(seed=0, padding="right")
    for backend in ("rust", "torch"):
        with pytest.raises(error, match=message):
            hiddenpool.pool_spans(layers, spans, attention_mask=mask, backend=backend)


def test_eos_and_mixed_layouts_are_refused():
    layers, mask, spans = random_case(seed=0, padding="right")
    with pytest.raises(ValueError, match="strategy eos@last: the eos pool finds one token"):
        hiddenpool.pool_spans(layers, spans, "eos@last", attention_mask=mask)
    with pytest.raises(ValueError, match="offsets: give attention_mask"):
        hiddenpool.pool_spans(layers, spans, attention_mask=mask, offsets=np.array([0, 1]))


def test_caller_buffers_are_untouched():
    layers, mask, spans = random_case(seed=4, padding="left")
    before = [x.copy() for x in layers], mask.copy(), spans.copy()
    for backend in ("rust", "torch"):
        hiddenpool.pool_spans(
            layers, spans, "max+mean@last4:sum", attention_mask=mask, backend=backend
        )
    for now, then in zip(layers, before[0], strict=True):
        np.testing.assert_array_equal(now, then)
    np.testing.assert_array_equal(mask, before[1])
    np.testing.assert_array_equal(spans, before[2])


def test_packed_spans_check_offsets_and_refuse_the_torch_path():
    values = np.zeros((5, 2), np.float32)
    spans = np.array([[0, 0, 1]])
    for offsets in ([0, 3, 2, 5], [1, 5], [0, 4]):
        with pytest.raises(ValueError, match="offsets: must start at 0, never decrease"):
            hiddenpool.pool_spans(values, spans, offsets=np.array(offsets))
    with pytest.raises(ValueError, match="offsets: packed input is pooled by the Rust kernels"):
        hiddenpool.pool_spans(values, spans, offsets=np.array([0, 5]), backend="torch")
