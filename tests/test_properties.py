"""Property tests over the public functions: random shapes (zero sizes too), every element
and mask dtype, strided, byte-swapped, misaligned and read-only arrays, masks with holes,
and random strategy strings. Each example either equals the plain reference or raises
ValueError/TypeError; nothing else (no crash, no silent mismatch) is acceptable.

Bounded by the "ci" profile in make test; HYPOTHESIS_PROFILE=long runs 20,000 examples.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import hiddenpool
import reference
from hiddenpool import Strategy

ELEMENT_TYPES = ["float32", "float64", "float16", "bfloat16"]
MASK_TYPES = [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.float32, np.float64]
POOLS = ["mean", "sum", "max", "mean_sqrt_len", "weighted_mean", "first", "cls", "last", "eos"]
LAYER_SPECS = [
    "last",
    "last2",
    "last3",
    "all",
    "embeddings",
    "first_last",
    "-1",
    "-2",
    "0",
    "1",
    "1,-1",
    "-3..-1",
    "0..2",
    "2..1",
    "9",
    "-9",
    "last9",
    "lastx",
    "",
    "1..",
    "a,b",
]
COMBINES = ["", ":sum", ":mean", ":concat", ":blend", ":"]
EOS = 5


@st.composite
def arrays_like(draw, values: np.ndarray) -> np.ndarray:
    """The same logical values through a randomly chosen memory layout."""
    layout = draw(
        st.sampled_from(
            ["plain", "fortran", "reversed", "sliced", "swapped", "misaligned", "readonly"]
        )
    )
    if layout == "fortran":
        return np.asfortranarray(values)
    if layout == "reversed":
        flipped = np.ascontiguousarray(values[(slice(None, None, -1),) * values.ndim])
        return flipped[(slice(None, None, -1),) * values.ndim]
    if layout == "sliced":
        wide = np.zeros(tuple(2 * n + 1 for n in values.shape), dtype=values.dtype)
        view = wide[(slice(1, None, 2),) * values.ndim]
        view[...] = values
        return view
    if layout == "swapped" and values.dtype.kind in "fiu" and values.dtype.itemsize > 1:
        return values.astype(values.dtype.newbyteorder())
    if layout == "misaligned" and values.dtype.itemsize > 1 and values.size:
        buffer = bytearray(values.nbytes + 1)
        view = np.frombuffer(buffer, dtype=values.dtype, count=values.size, offset=1).reshape(
            values.shape
        )
        view[...] = values
        return view
    if layout == "readonly":
        copy = values.copy()
        copy.flags.writeable = False
        return copy
    return values


@st.composite
def batches(draw):
    batch = draw(st.integers(0, 4))
    tokens = draw(st.integers(0 if batch else 1, 6))
    hidden = draw(st.integers(0, 5))
    states = draw(st.integers(1, 5))
    element_type = draw(st.sampled_from(ELEMENT_TYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = [
        rng.standard_normal((batch, tokens, hidden)).astype(np.float32) * 4 for _ in range(states)
    ]
    if element_type == "bfloat16":
        stored = [reference.to_bfloat16_bits(v) for v in values]
    else:
        stored = [v.astype(element_type) for v in values]
    mask = (rng.random((batch, tokens)) < draw(st.floats(0.0, 1.0))).astype(
        draw(st.sampled_from(MASK_TYPES))
    )
    ids = rng.integers(6, 50, (batch, tokens))
    ids[rng.random((batch, tokens)) < 0.3] = EOS
    return stored, mask, ids, element_type


def strategy_texts():
    pools = st.lists(st.sampled_from([*POOLS, "median", ""]), min_size=1, max_size=3).map("+".join)
    return st.tuples(pools, st.sampled_from(LAYER_SPECS), st.sampled_from(COMBINES)).map(
        lambda parts: f"{parts[0]}@{parts[1]}{parts[2]}"
    )


def expected_result(strategy: str, stored, mask, ids, element_type) -> np.ndarray:
    parsed = Strategy.parse(strategy)
    indices = parsed.resolve_layers(len(stored))
    chosen = [stored[i] for i in indices]
    combine = parsed.combine or "sum"
    real = np.asarray(mask) != 0
    index = reference.first_token(ids, mask, EOS) if "eos" in parsed.pools else None
    if index is not None:
        has_tokens = real.any(axis=1)
        if np.any((index < 0) & has_tokens):
            raise ValueError("missing eos")  # what hiddenpool must raise too
    pools = ["index" if p == "eos" else p for p in parsed.pools]
    return reference.pool(chosen, mask, pools, combine, None, index, element_type == "bfloat16")


def as_torch(array: np.ndarray, element_type: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("=")))
    return tensor.view(torch.bfloat16) if element_type == "bfloat16" else tensor


@given(batches(), strategy_texts(), st.data())
def test_pool_equals_reference_or_raises(batch, strategy, data):
    stored, mask, ids, element_type = batch
    try:
        expected = expected_result(strategy, stored, mask, ids, element_type)
    except ValueError:
        expected = None
    if element_type == "bfloat16":
        hidden = [as_torch(layer, element_type) for layer in stored]  # bfloat16 enters as torch
        mask_in, ids_in = torch.from_numpy(mask), torch.from_numpy(ids)
    else:
        hidden = [data.draw(arrays_like(layer)) for layer in stored]
        mask_in, ids_in = data.draw(arrays_like(mask)), data.draw(arrays_like(ids))
    before = [
        layer.clone() if isinstance(layer, torch.Tensor) else layer.copy() for layer in hidden
    ]
    backend = data.draw(st.sampled_from(["rust", "torch"]))
    try:
        result = hiddenpool.pool(
            hidden, mask_in, strategy, input_ids=ids_in, eos_token_id=EOS, backend=backend
        )
    except (ValueError, TypeError):
        assert expected is None, f"{strategy} raised but the reference computed a result"
        return
    assert expected is not None, f"{strategy} gave a result where the reference refuses"
    result = result.float().numpy() if isinstance(result, torch.Tensor) else result
    tolerance = 1e-9 if element_type == "float64" else 3e-5
    np.testing.assert_allclose(result, expected, rtol=tolerance, atol=tolerance)
    for layer, copy in zip(hidden, before, strict=True):
        if isinstance(layer, torch.Tensor):
            assert torch.equal(layer, copy)
        else:
            np.testing.assert_array_equal(layer, copy)


@given(st.text(max_size=40))
def test_any_strategy_text_parses_or_raises_value_error(text):
    try:
        parsed = Strategy.parse(text)
    except ValueError:
        return
    assert Strategy.parse(str(parsed)) == parsed


@given(
    st.lists(st.integers(0, 5), min_size=0, max_size=6),
    st.integers(0, 4),
    st.sampled_from(ELEMENT_TYPES[:3]),
    st.data(),
)
def test_packed_equals_padded(lengths, hidden, element_type, data):
    rng = np.random.default_rng(len(lengths) * 7 + hidden)
    total = sum(lengths)
    values = rng.standard_normal((total, hidden)).astype(element_type)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(
        data.draw(st.sampled_from([np.int32, np.int64]))
    )
    tokens = max(lengths, default=0) or 1
    padded = np.full((len(lengths), tokens, hidden), np.nan, dtype=element_type)
    mask = np.zeros((len(lengths), tokens), dtype=bool)
    for row, length in enumerate(lengths):
        padded[row, :length] = values[offsets[row] : offsets[row + 1]]
        mask[row, :length] = True
    strategy = data.draw(
        st.sampled_from(["mean", "max+first", "last+weighted_mean", "sum+mean_sqrt_len"])
    )
    packed = hiddenpool.pool_packed(
        data.draw(arrays_like(values)), data.draw(arrays_like(offsets)), strategy
    )
    np.testing.assert_allclose(
        packed, hiddenpool.pool(padded, mask, strategy), rtol=1e-6, atol=1e-6
    )


@given(st.lists(st.integers(-3, 8), max_size=6), st.integers(1, 8))
def test_bad_offsets_raise_value_error(offsets, total):
    values = np.zeros((total, 2), dtype=np.float32)
    offsets_array = np.array(offsets, dtype=np.int64)
    valid = (
        len(offsets) >= 1
        and offsets[0] == 0
        and offsets[-1] == total
        and all(b >= a for a, b in itertools.pairwise(offsets))
    )
    try:
        result = hiddenpool.pool_packed(values, offsets_array, "mean")
    except ValueError:
        assert not valid
        return
    assert valid and result.shape == (len(offsets) - 1, 2)


@given(batches())
def test_gather_equals_reference(batch):
    stored, _, _, element_type = batch
    assume(element_type != "bfloat16")
    hidden = stored[-1]
    rows, tokens = hidden.shape[:2]
    rng = np.random.default_rng(rows * 10 + tokens)
    index = rng.integers(-1, tokens, rows) if tokens else np.full(rows, -1)
    expected = reference.pool([hidden], np.ones((rows, tokens)), ["index"], index=index)
    np.testing.assert_allclose(hiddenpool.gather(hidden, index), expected, rtol=1e-6)
