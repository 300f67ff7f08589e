"""The extension module against the plain reference: every pool, combine, element type,
mask type and layout, with strided, read-only, misaligned and byte-swapped inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import reference
from hiddenpool import _native

ALL_POOLS = ["mean", "sum", "max", "mean_sqrt_len", "weighted_mean", "first", "last", "index"]
ELEMENT_TYPES = ["float32", "float64", "float16", "bfloat16"]
MASK_TYPES = [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.float32, np.float64]
COMBINES = ["sum", "mean", "concat", "weighted"]
TOLERANCE = {"float32": 2e-6, "float64": 1e-12, "float16": 2e-6, "bfloat16": 2e-6}


def make_layers(rng: np.random.Generator, shape, count: int, element_type: str):
    """Layers stored as ``element_type``; bfloat16 as int16 bits."""
    values = [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]
    if element_type == "bfloat16":
        return [reference.to_bfloat16_bits(v) for v in values]
    return [v.astype(element_type) for v in values]


def random_mask(rng: np.random.Generator, batch: int, tokens: int) -> np.ndarray:
    """Left padding, right padding, holes, and one empty row."""
    mask = np.zeros((batch, tokens), dtype=np.int64)
    for row in range(batch):
        length = int(rng.integers(1, tokens + 1))
        kind = row % 4
        if kind == 0:
            mask[row, :length] = 1
        elif kind == 1:
            mask[row, tokens - length :] = 1
        elif kind == 2:
            mask[row] = rng.integers(0, 2, tokens)
    return mask


def check(actual: np.ndarray, expected: np.ndarray, element_type: str) -> None:
    expected_dtype = np.float64 if element_type == "float64" else np.float32
    assert actual.dtype == expected_dtype
    assert actual.shape == expected.shape
    tolerance = TOLERANCE[element_type]
    np.testing.assert_allclose(actual, expected, rtol=tolerance * 10, atol=tolerance * 10)


@pytest.mark.parametrize(
    "element_type,combine,mask_type",
    list(itertools.product(ELEMENT_TYPES, COMBINES, MASK_TYPES)),
)
def test_padded_layout_matches_reference(element_type, combine, mask_type):
    # A seed from the case's own text: reproducible across processes (hash() is salted).
    rng = np.random.default_rng(list(f"{element_type}-{combine}-{np.dtype(mask_type)}".encode()))
    batch, tokens, hidden = 6, 7, 5
    layers = make_layers(rng, (batch, tokens, hidden), 3, element_type)
    mask = random_mask(rng, batch, tokens).astype(mask_type)
    index = rng.integers(-1, tokens, batch)
    weights = [0.5, -1.25, 2.0] if combine == "weighted" else None
    bfloat16 = element_type == "bfloat16"
    actual = _native.pool(layers, mask, ALL_POOLS, combine, weights, index, bfloat16)
    expected = reference.pool(layers, mask, ALL_POOLS, combine, weights, index, bfloat16)
    check(actual, expected, element_type)


@pytest.mark.parametrize("element_type,combine", list(itertools.product(ELEMENT_TYPES, COMBINES)))
def test_packed_layout_matches_padded_reference(element_type, combine):
    rng = np.random.default_rng(7)
    lengths = [3, 0, 1, 5, 2]
    total = sum(lengths)
    hidden = 4
    packed = make_layers(rng, (total, hidden), 2, element_type)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = max(lengths)
    padded = [np.zeros((len(lengths), tokens, hidden), dtype=layer.dtype) for layer in packed]
    mask = np.zeros((len(lengths), tokens), dtype=bool)
    for row, length in enumerate(lengths):
        for layer, values in zip(padded, packed, strict=True):
            layer[row, :length] = values[offsets[row] : offsets[row + 1]]
        mask[row, :length] = True
    index = np.array([2, -1, 0, 4, 1])
    weights = [0.3, 0.7] if combine == "weighted" else None
    bfloat16 = element_type == "bfloat16"
    actual = _native.pool_packed(packed, offsets, ALL_POOLS, combine, weights, index, bfloat16)
    expected = reference.pool(padded, mask, ALL_POOLS, combine, weights, index, bfloat16)
    check(actual, expected, element_type)


def strided_views(base: np.ndarray):
    """The same logical [B, T, H] values through differently strided views."""
    yield "contiguous", np.ascontiguousarray(base)
    yield "fortran", np.asfortranarray(base)
    transposed = np.ascontiguousarray(base.transpose(2, 0, 1)).transpose(1, 2, 0)
    yield "hidden-major", transposed
    reversed_storage = np.ascontiguousarray(base[:, ::-1, ::-1])[:, ::-1, ::-1]
    yield "negative strides", reversed_storage
    wide = np.zeros((base.shape[0] * 2, base.shape[1], base.shape[2] * 3), dtype=base.dtype)
    wide[::2, :, ::3] = base
    yield "sliced with steps", wide[::2, :, ::3]


@pytest.mark.parametrize("element_type", ELEMENT_TYPES)
def test_strided_inputs_read_the_right_values(element_type):
    rng = np.random.default_rng(3)
    (base,) = make_layers(rng, (4, 6, 5), 1, element_type)
    mask = random_mask(rng, 4, 6)
    bfloat16 = element_type == "bfloat16"
    expected = reference.pool([base], mask, ALL_POOLS[:7], bfloat16=bfloat16)
    for name, view in strided_views(base):
        np.testing.assert_array_equal(view, base)
        for mask_name, mask_view in strided_views(mask[:, :, None]):
            actual = _native.pool([view], mask_view[:, :, 0], ALL_POOLS[:7], bfloat16=bfloat16)
            check(actual, expected, element_type)
            assert actual.flags.c_contiguous, (name, mask_name)


def test_read_only_misaligned_and_byte_swapped_inputs():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((3, 4, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]])
    expected = reference.pool([base], mask, ALL_POOLS[:7])

    read_only = base.copy()
    read_only.flags.writeable = False
    buffer = bytearray(base.nbytes + 1)
    misaligned = np.frombuffer(buffer, dtype=np.float32, count=base.size, offset=1).reshape(
        base.shape
    )
    assert not misaligned.flags.aligned
    misaligned[...] = base
    swapped = base.astype(">f4")
    swapped_mask = mask.astype(">i8")
    for array, mask_view in [(read_only, mask), (misaligned, mask), (swapped, swapped_mask)]:
        before = array.copy()
        check(_native.pool([array], mask_view, ALL_POOLS[:7]), expected, "float32")
        np.testing.assert_array_equal(array, before)


def test_zero_sizes_and_tiny_shapes():
    for batch, tokens, hidden in [(0, 3, 4), (2, 0, 4), (2, 3, 0), (1, 1, 1), (3, 1, 2), (2, 5, 1)]:
        rng = np.random.default_rng(batch * 100 + tokens * 10 + hidden)
        layers = [rng.standard_normal((batch, tokens, hidden)).astype(np.float32)]
        mask = np.ones((batch, tokens), dtype=bool)
        index = np.zeros(batch, dtype=np.int64) if tokens else np.full(batch, -1)
        actual = _native.pool(layers, mask, ALL_POOLS, "sum", None, index)
        expected = reference.pool(layers, mask, ALL_POOLS, index=index)
        assert actual.shape == (batch, hidden * len(ALL_POOLS))
        check(actual, expected, "float32")


def test_half_types_accumulate_in_float32():
    thirty = np.full((1, 4096, 1), 30.0, dtype=np.float16)
    mean = _native.pool([thirty], np.ones((1, 4096), dtype=bool), ["mean"])
    assert mean.dtype == np.float32 and mean[0, 0] == 30.0
    ones = np.full((1, 70000, 1), 1.0, dtype=np.float16)
    total = _native.pool([ones], np.ones((1, 70000), dtype=np.uint8), ["sum"])
    assert total[0, 0] == 70000.0
    ones_bf16 = reference.to_bfloat16_bits(np.ones((1, 70000, 1), dtype=np.float32))
    total = _native.pool([ones_bf16], np.ones((1, 70000), dtype=np.uint8), ["sum"], bfloat16=True)
    assert total[0, 0] == 70000.0


@pytest.mark.parametrize("element_type", ["float32", "float16", "float64"])
def test_padding_is_never_read(element_type):
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((3, 5, 4)).astype(element_type)
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1]])
    clean = _native.pool([hidden], mask, ALL_POOLS[:7])
    poisoned = hidden.copy()
    poisoned[mask == 0] = np.nan
    poisoned[0, 3] = np.inf
    poisoned[1, 0] = -np.inf
    np.testing.assert_array_equal(_native.pool([poisoned], mask, ALL_POOLS[:7]), clean)


def test_nan_in_a_real_token_propagates():
    hidden = np.ones((1, 3, 2), dtype=np.float32)
    hidden[0, 1, 0] = np.nan
    result = _native.pool([hidden], np.ones((1, 3)), ["mean", "max", "sum"])
    assert np.isnan(result[0, [0, 2, 4]]).all()
    np.testing.assert_array_equal(result[0, [1, 3, 5]], [1.0, 1.0, 3.0])


def test_find_token_skips_padding_and_reports_missing():
    ids = np.array([[2, 2, 5, 2, 9], [5, 6, 7, 0, 0], [0, 0, 1, 2, 2]], dtype=np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    for ids_view in (ids, ids.astype(np.int64), np.asfortranarray(ids)):
        positions = _native.find_token(ids_view, mask, 2)
        np.testing.assert_array_equal(positions, reference.first_token(ids, mask, 2))
        np.testing.assert_array_equal(positions, [3, -1, 3])


def bad_calls():
    good = np.zeros((2, 3, 4), dtype=np.float32)
    mask = np.ones((2, 3))
    ids = np.zeros((2, 3), dtype=np.int64)
    yield "wrong ndim", lambda: _native.pool([good[0]], mask, ["mean"]), ValueError, "3 dimensions"
    yield "mask ndim", lambda: _native.pool([good], mask[0], ["mean"]), ValueError, "attention_mask"
    yield (
        "batch disagrees",
        lambda: _native.pool([good], np.ones((3, 3)), ["mean"]),
        ValueError,
        "attention_mask: shape [3, 3]",
    )
    yield (
        "tokens disagree",
        lambda: _native.pool([good], np.ones((2, 4)), ["mean"]),
        ValueError,
        "attention_mask",
    )
    yield (
        "layers differ",
        lambda: _native.pool([good, np.zeros((2, 3, 5), np.float32)], mask, ["mean"]),
        ValueError,
        "layer 1 has shape [2, 3, 5]",
    )
    yield (
        "layer dtypes differ",
        lambda: _native.pool([good, good.astype(np.float64)], mask, ["mean"]),
        TypeError,
        "layer 1 is float64",
    )
    yield (
        "int hidden",
        lambda: _native.pool([good.astype(np.int32)], mask, ["mean"]),
        TypeError,
        "unsupported dtype int32",
    )
    yield (
        "complex hidden",
        lambda: _native.pool([good.astype(np.complex64)], mask, ["mean"]),
        TypeError,
        "complex64",
    )
    yield (
        "float16 mask",
        lambda: _native.pool([good], mask.astype(np.float16), ["mean"]),
        TypeError,
        "attention_mask",
    )
    yield "not an array", lambda: _native.pool([[1.0]], mask, ["mean"]), TypeError, "numpy.ndarray"
    yield "no layers", lambda: _native.pool([], mask, ["mean"]), ValueError, "at least one layer"
    yield "unknown pool", lambda: _native.pool([good], mask, ["median"]), ValueError, "unknown pool"
    yield (
        "unknown combine",
        lambda: _native.pool([good, good], mask, ["mean"], "blend"),
        ValueError,
        "unknown combine",
    )
    yield (
        "weights length",
        lambda: _native.pool([good, good], mask, ["mean"], "weighted", [1.0]),
        ValueError,
        "has 1 weights for 2 layers",
    )
    yield (
        "index missing",
        lambda: _native.pool([good], mask, ["index"]),
        ValueError,
        "index",
    )
    yield (
        "index out of range",
        lambda: _native.pool([good], mask, ["index"], index=np.array([0, 3])),
        ValueError,
        "row 1: position 3",
    )
    yield (
        "float index",
        lambda: _native.pool([good], mask, ["index"], index=np.array([0.0, 1.0])),
        TypeError,
        "index",
    )
    yield (
        "float token ids",
        lambda: _native.find_token(ids.astype(np.float32), mask, 2),
        TypeError,
        "input_ids",
    )
    yield (
        "ids shape",
        lambda: _native.find_token(ids[:, :2], mask, 2),
        ValueError,
        "input_ids: shape [2, 2]",
    )
    packed = np.zeros((5, 4), dtype=np.float32)
    yield (
        "offsets decrease",
        lambda: _native.pool_packed([packed], np.array([0, 3, 2, 5]), ["mean"]),
        ValueError,
        "must not decrease",
    )
    yield (
        "offsets past the end",
        lambda: _native.pool_packed([packed], np.array([0, 3, 6]), ["mean"]),
        ValueError,
        "must end at the number of packed tokens 5",
    )
    yield (
        "offsets start",
        lambda: _native.pool_packed([packed], np.array([1, 5]), ["mean"]),
        ValueError,
        "must start at 0",
    )
    yield (
        "float offsets",
        lambda: _native.pool_packed([packed], np.array([0.0, 5.0]), ["mean"]),
        TypeError,
        "offsets",
    )
    yield "threads", lambda: _native.set_num_threads(0), ValueError, "positive"


@pytest.mark.parametrize("case", list(bad_calls()), ids=lambda case: case[0])
def test_bad_input_raises_a_named_error(case):
    _, call, error, text = case
    with pytest.raises(error, match=text.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_inputs_are_never_written_and_outputs_never_alias():
    rng = np.random.default_rng(9)
    layers = [rng.standard_normal((4, 5, 6)).astype(np.float32) for _ in range(2)]
    mask = random_mask(rng, 4, 5)
    copies = [layer.copy() for layer in layers]
    mask_copy = mask.copy()
    for combine in COMBINES:
        weights = [1.0, 2.0] if combine == "weighted" else None
        out = _native.pool(layers, mask, ALL_POOLS[:7], combine, weights)
        for layer in layers:
            assert not np.shares_memory(out, layer)
        out[...] = 123.0
    for layer, copy in zip(layers, copies, strict=True):
        np.testing.assert_array_equal(layer, copy)
    np.testing.assert_array_equal(mask, mask_copy)


def test_large_inputs_take_the_parallel_path_and_agree_with_small_threads():
    rng = np.random.default_rng(11)
    hidden = rng.standard_normal((3, 300, 512)).astype(np.float32)  # few rows: hidden is split
    mask = random_mask(rng, 3, 300)
    expected = reference.pool([hidden], mask, ALL_POOLS[:7])
    previous = _native.get_num_threads()
    try:
        for threads in (1, 2, 3):
            _native.set_num_threads(threads)
            assert _native.get_num_threads() == threads
            check(_native.pool([hidden], mask, ALL_POOLS[:7]), expected, "float32")
    finally:
        _native.set_num_threads(previous)


def test_strategy_pools_are_the_kernel_pools():
    """The strategy language's pools are the kernel's, with ``eos`` served by ``index``
    (the kernel gathers at positions Python finds) and nothing on either side unmatched."""
    from hiddenpool import strategy

    language = {"index" if pool == "eos" else pool for pool in strategy.POOLS}
    assert language == set(_native.POOLS)
    assert len(strategy.POOLS) == len(_native.POOLS)
