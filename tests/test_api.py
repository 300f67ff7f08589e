"""The public API: the strategy language over every input kind and both backends, against
the plain reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hiddenpool
import reference
from hiddenpool import Strategy

DESIGN_EXAMPLES = [
    "mean@last",
    "cls@last",
    "eos@last",
    "mean@-2",
    "mean@first_last:mean",
    "mean@last4:sum",
    "mean@last4:concat",
    "mean+max@last",
    "mean@-4..-1:concat",
    "mean@1,-1:concat",
    "sum+mean_sqrt_len+weighted_mean+last@all:mean",
    "max@embeddings",
]
EOS = 7


def make_batch(seed: int = 0, batch: int = 5, tokens: int = 6, hidden: int = 4, states: int = 7):
    """Hidden states (float32, embeddings + 6 layers), a mask with left and right padding,
    holes and an empty row, and input_ids with one EOS per non-empty row."""
    rng = np.random.default_rng(seed)
    layers = [
        rng.standard_normal((batch, tokens, hidden)).astype(np.float32) for _ in range(states)
    ]
    mask = np.array(
        [
            [1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1],
            [1, 0, 1, 1, 0, 1],
            [1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0],
        ][:batch]
    )
    ids = rng.integers(10, 100, (batch, tokens))
    for row in range(batch):
        real = np.flatnonzero(mask[row])
        if real.size:
            ids[row, real[-1]] = EOS
    ids[mask == 0] = EOS  # pad id equal to EOS, as GPT-2 and CLIP tokenizers do
    return layers, mask, ids


def expected_for(strategy: str, layers, mask, ids, weights=None) -> np.ndarray:
    parsed = Strategy.parse(strategy)
    indices = parsed.resolve_layers(len(layers))
    chosen = [layers[i] for i in indices]
    combine = parsed.combine or "sum"
    pools = ["index" if p == "eos" else p for p in parsed.pools]
    index = reference.first_token(ids, mask, EOS)
    return reference.pool(chosen, mask, pools, combine, weights, index)


def as_numpy(value) -> np.ndarray:
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


INPUT_KINDS = ["numpy", "torch", "torch-forced", "numpy-forced", "array-like"]


def convert(kind: str, layers, mask, ids):
    if kind.startswith("torch"):
        return [torch.from_numpy(x) for x in layers], torch.from_numpy(mask), torch.from_numpy(ids)
    if kind == "array-like":

        class ArrayLike:
            def __init__(self, array):
                self.array = array

            def __array__(self, dtype=None, copy=None):
                return self.array

        return [ArrayLike(x) for x in layers], ArrayLike(mask), ArrayLike(ids)
    return layers, mask, ids


@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("strategy", DESIGN_EXAMPLES)
def test_design_examples_match_reference_on_every_input_kind(strategy, kind):
    layers, mask, ids = make_batch()
    expected = expected_for(strategy, layers, mask, ids)
    hidden, mask_in, ids_in = convert(kind, layers, mask, ids)
    backend = "torch" if kind.endswith("forced") else None
    result = hiddenpool.pool(
        hidden, mask_in, strategy, input_ids=ids_in, eos_token_id=EOS, backend=backend
    )
    assert isinstance(result, torch.Tensor) == kind.startswith("torch")
    assert result.dtype in (np.float32, torch.float32)
    np.testing.assert_allclose(as_numpy(result), expected, rtol=1e-5, atol=1e-5)


def test_several_strategies_return_a_dict_keyed_as_given():
    layers, mask, ids = make_batch(1)
    given = ["mean@last", "CLS@last", "max@last", Strategy.parse("mean@last4:sum"), "eos@last"]
    results = hiddenpool.pool(layers, mask, given, input_ids=ids, eos_token_id=EOS)
    assert list(results) == ["mean@last", "CLS@last", "max@last", "mean@last4:sum", "eos@last"]
    for key, value in results.items():
        single = hiddenpool.pool(layers, mask, key, input_ids=ids, eos_token_id=EOS)
        np.testing.assert_array_equal(value, single)
        np.testing.assert_allclose(value, expected_for(str(key), layers, mask, ids), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_torch_path_equals_rust_path(dtype, padding):
    layers, mask, ids = make_batch(2)
    if padding == "left":
        mask = np.array([[0] * (6 - int(row.sum())) + [1] * int(row.sum()) for row in mask])
        ids = np.where(mask == 1, ids, EOS)
    tensors = [torch.from_numpy(x).to(getattr(torch, dtype)) for x in layers]
    for tensor in tensors:
        tensor[torch.from_numpy(mask) == 0] = float("nan")  # padding must never leak
    mask_t, ids_t = torch.from_numpy(mask), torch.from_numpy(ids)
    strategies = [s for s in DESIGN_EXAMPLES if s != "eos@last"] + ["eos@last"]
    rust = hiddenpool.pool(
        tensors, mask_t, strategies, input_ids=ids_t, eos_token_id=EOS, missing_eos="last"
    )
    with hiddenpool.use_backend("torch"):
        torch_path = hiddenpool.pool(
            tensors, mask_t, strategies, input_ids=ids_t, eos_token_id=EOS, missing_eos="last"
        )
    tolerance = 1e-6 if dtype == "float32" else 1e-5
    for strategy in strategies:
        assert rust[strategy].dtype == torch.float32
        assert not torch.isnan(rust[strategy]).any(), strategy
        torch.testing.assert_close(
            torch_path[strategy], rust[strategy], rtol=tolerance, atol=tolerance
        )


def test_float64_stays_float64_on_both_paths():
    layers, mask, _ = make_batch(3)
    doubles = [x.astype(np.float64) for x in layers]
    expected = expected_for("mean+max@last4:concat", doubles, mask, np.zeros_like(mask))
    for backend in ("rust", "torch"):
        result = hiddenpool.pool(doubles, mask, "mean+max@last4:concat", backend=backend)
        assert result.dtype == np.float64
        np.testing.assert_allclose(result, expected, rtol=1e-12)


def test_weighted_combine_is_scalar_mix():
    layers, mask, ids = make_batch(4)
    raw = [0.1, -0.4, 2.0, 0.3]
    scale = 1.7
    mix = scale * np.exp(raw) / np.exp(raw).sum()
    expected = expected_for("mean@last4:weighted", layers, mask, ids, weights=list(mix))
    for backend in ("rust", "torch"):
        result = hiddenpool.pool(
            layers,
            mask,
            "mean@last4:weighted",
            layer_weights=raw,
            layer_scale=scale,
            backend=backend,
        )
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer_weights: has 3 weights for 4 chosen layers"):
        hiddenpool.pool(layers, mask, "mean@last4:weighted", layer_weights=raw[:3])
    with pytest.raises(ValueError, match="pass layer_weights"):
        hiddenpool.pool(layers, mask, "mean@last4:weighted")


def test_model_output_uses_hidden_states_with_last_hidden_state_last():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    layers, mask, _ = make_batch(5)
    final = np.full_like(layers[-1], 0.25)  # as CLIP: last_hidden_state != hidden_states[-1]
    output = BaseModelOutputWithPooling(
        last_hidden_state=torch.from_numpy(final),
        hidden_states=tuple(torch.from_numpy(x) for x in layers),
    )
    last = hiddenpool.pool(output, torch.from_numpy(mask), "mean@last")
    np.testing.assert_allclose(last.numpy(), reference.pool([final], mask, ["mean"]), atol=1e-6)
    second = hiddenpool.pool(output, torch.from_numpy(mask), "mean@-2")
    np.testing.assert_allclose(
        second.numpy(), reference.pool([layers[-2]], mask, ["mean"]), atol=1e-6
    )
    as_dict = {"hidden_states": output.hidden_states, "last_hidden_state": output.last_hidden_state}
    torch.testing.assert_close(hiddenpool.pool(as_dict, torch.from_numpy(mask), "mean@-2"), second)
    only_last = BaseModelOutputWithPooling(last_hidden_state=torch.from_numpy(final))
    with pytest.raises(ValueError, match="out of range for 1 hidden state"):
        hiddenpool.pool(only_last, torch.from_numpy(mask), "mean@-2")


def test_empty_rows_pool_to_zeros_or_raise():
    layers, mask, _ = make_batch(6)
    zeros = hiddenpool.pool(layers, mask, "mean+max+first+last@last")
    np.testing.assert_array_equal(zeros[4], 0.0)
    for backend in ("rust", "torch"):
        with pytest.raises(ValueError, match="1 row\\(s\\) have no real token: 4"):
            hiddenpool.pool(layers, mask, "mean@last", empty="raise", backend=backend)


def test_missing_eos_raises_naming_rows_or_falls_back_to_last():
    layers, mask, ids = make_batch(7)
    ids = ids.copy()
    ids[ids == EOS] = 11
    ids[0, 1] = EOS
    for backend in ("rust", "torch"):
        with pytest.raises(ValueError, match="in 3 row\\(s\\): 1, 2, 3"):
            hiddenpool.eos(layers[-1], mask, ids, EOS, backend=backend)
        fallback = hiddenpool.eos(layers[-1], mask, ids, EOS, missing_eos="last", backend=backend)
        expected = reference.pool([layers[-1]], mask, ["last"])
        expected[0] = layers[-1][0, 1]
        np.testing.assert_allclose(as_numpy(fallback), expected, atol=1e-6)


def test_single_pool_functions():
    layers, mask, _ = make_batch(8)
    hidden = layers[-1]
    for name in ["mean", "sum", "max", "mean_sqrt_len", "weighted_mean", "first", "last"]:
        result = getattr(hiddenpool, name)(hidden, mask)
        np.testing.assert_allclose(
            result, reference.pool([hidden], mask, [name]), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_array_equal(hiddenpool.cls(hidden, mask), hiddenpool.first(hidden, mask))


def test_gather_at_explicit_positions():
    layers, _, _ = make_batch(9)
    hidden = layers[-1]
    index = np.array([0, 5, -1, 3, 2])
    expected = reference.pool([hidden], np.ones(hidden.shape[:2]), ["index"], index=index)
    np.testing.assert_allclose(hiddenpool.gather(hidden, index), expected)
    torch_result = hiddenpool.gather(
        torch.from_numpy(hidden), torch.from_numpy(index), backend="torch"
    )
    np.testing.assert_allclose(torch_result.numpy(), expected)
    with pytest.raises(ValueError, match="index: row 1: position 6"):
        hiddenpool.gather(hidden, np.array([0, 6, 0, 0, 0]))
    with pytest.raises(ValueError, match="index: expected shape \\[5\\]"):
        hiddenpool.gather(hidden, np.array([0, 1]))


def test_pool_packed_matches_padded():
    rng = np.random.default_rng(10)
    lengths = [2, 4, 0, 1]
    values = [rng.standard_normal((sum(lengths), 3)).astype(np.float32) for _ in range(3)]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    padded = [np.zeros((4, 4, 3), np.float32) for _ in values]
    mask = np.zeros((4, 4), dtype=bool)
    for row, length in enumerate(lengths):
        for target, source in zip(padded, values, strict=True):
            target[row, :length] = source[offsets[row] : offsets[row + 1]]
        mask[row, :length] = True
    for strategy in ["mean@last", "max+last@-2", "weighted_mean@-3..-1:concat", "first@last2:mean"]:
        packed = hiddenpool.pool_packed(values, offsets, strategy)
        np.testing.assert_allclose(packed, hiddenpool.pool(padded, mask, strategy), rtol=1e-6)
    tensor_result = hiddenpool.pool_packed(torch.from_numpy(values[0]), torch.from_numpy(offsets))
    assert isinstance(tensor_result, torch.Tensor)


def test_torch_inputs_are_not_copied_or_modified():
    layers, mask, _ = make_batch(11)
    tensors = [torch.from_numpy(x.copy()) for x in layers]
    before = [t.clone() for t in tensors]
    for backend in ("rust", "torch"):
        out = hiddenpool.pool(
            tensors, torch.from_numpy(mask), "mean+max@last4:sum", backend=backend
        )
        out.fill_(5.0)
    for tensor, copy in zip(tensors, before, strict=True):
        torch.testing.assert_close(tensor, copy)


def test_non_contiguous_and_grad_tensors():
    layers, mask, _ = make_batch(12)
    base = torch.from_numpy(np.ascontiguousarray(layers[-1].transpose(0, 2, 1))).transpose(1, 2)
    assert not base.is_contiguous()
    grad = torch.from_numpy(layers[-1]).clone().requires_grad_(True)
    expected = reference.pool([layers[-1]], mask, ["mean", "max"])
    for tensor in (base, grad):
        result = hiddenpool.pool(tensor, torch.from_numpy(mask), "mean+max@last")
        np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "strategy,message",
    [
        ("median@last", "unknown pool 'median'; valid pools: mean, sum, max"),
        ("mean@last4", "several layers are chosen, so a combine is required"),
        ("mean@last4:blend", "unknown combine 'blend'"),
        ("mean@lost", "malformed layer spec 'lost'"),
        ("mean@-9", "out of range for 7 hidden state"),
        ("mean@last9:sum", "needs 9 hidden states but hidden_states has 7"),
        ("mean@5..2:sum", "runs backwards"),
        ("eos@last", "the eos pool needs input_ids and eos_token_id"),
    ],
)
def test_strategy_errors_are_clear(strategy, message):
    layers, mask, _ = make_batch()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        hiddenpool.pool(layers, mask, strategy)


def test_single_array_input_errors():
    layers, mask, _ = make_batch()
    with pytest.raises(ValueError, match="needs the full hidden_states sequence"):
        hiddenpool.pool(layers[-1], mask, "mean@embeddings")
    with pytest.raises(ValueError, match="attention_mask: shape \\[5, 5\\]"):
        hiddenpool.pool(layers[-1], mask[:, :5], "mean")
    with pytest.raises(ValueError, match="expected 3 dimensions"):
        hiddenpool.pool(layers[-1][0], mask, "mean")
    with pytest.raises(TypeError, match="hidden_states"):
        hiddenpool.pool("text", mask, "mean")
    with pytest.raises(ValueError, match="empty"):
        hiddenpool.pool(layers[-1], mask, "mean", empty="skip")  # type: ignore[arg-type]


def test_strategy_round_trip_and_canonical_form():
    for text in [*DESIGN_EXAMPLES, "CLS @ LAST", "mean@+1..-1:mean", "mean@last1"]:
        parsed = Strategy.parse(text)
        assert Strategy.parse(str(parsed)) == parsed
    assert str(Strategy.parse("CLS @ LAST")) == "first@last"
    assert str(Strategy.parse("mean@last1")) == "mean@last"
    assert str(Strategy.parse("mean")) == "mean@last"
    assert Strategy.parse("mean@first_last:mean").resolve_layers(13) == [1, 12]
    assert Strategy.parse("mean@all:mean").resolve_layers(4) == [1, 2, 3]
    assert Strategy.parse("mean@1,-1:concat").resolve_layers(4) == [1, 3]


def test_no_mask_means_every_token_is_real():
    layers, _, _ = make_batch(13)
    every = np.ones(layers[-1].shape[:2], dtype=bool)
    for backend in ("rust", "torch"):
        result = hiddenpool.pool(layers, None, "mean+max@last2:concat", backend=backend)
        np.testing.assert_allclose(
            result, reference.pool(layers[-2:], every, ["mean", "max"], "concat"), atol=1e-6
        )
    torch_result = hiddenpool.mean(torch.from_numpy(layers[-1]), None)
    np.testing.assert_allclose(
        torch_result.numpy(), reference.pool([layers[-1]], every, ["mean"]), atol=1e-6
    )


def test_mixed_numpy_and_torch_arguments():
    layers, mask, ids = make_batch(14)
    expected = expected_for("mean+eos@last", layers, mask, ids)
    # numpy hidden states with torch mask and ids, and the other way round.
    mixed = hiddenpool.pool(
        layers,
        torch.from_numpy(mask),
        "mean+eos@last",
        input_ids=torch.from_numpy(ids),
        eos_token_id=EOS,
    )
    assert isinstance(mixed, np.ndarray)
    np.testing.assert_allclose(mixed, expected, atol=1e-6)
    tensors = [torch.from_numpy(x) for x in layers]
    other = hiddenpool.pool(tensors, mask, "mean+eos@last", input_ids=ids, eos_token_id=EOS)
    np.testing.assert_allclose(other.numpy(), expected, atol=1e-6)


def test_bool_masks_holding_bytes_other_than_0_and_1():
    """numpy stores any byte in a bool array seen through ``.view(np.bool_)``: numpy's own
    truth test reads nonzero as True, and so must every entry point (the kernels once read
    such bytes as Rust bool, which is undefined behaviour, and pooled only token 0)."""
    rng = np.random.default_rng(16)
    hidden = rng.standard_normal((2, 4, 3)).astype(np.float32)
    mask_bytes = np.array([[1, 2, 4, 0], [0, 128, 255, 3]], dtype=np.uint8)
    odd_bools = mask_bytes.view(np.bool_)
    plain = mask_bytes != 0
    assert odd_bools.tolist() == plain.tolist()  # numpy's reading, the oracle
    strategies = ["mean@last", "max@last", "first@last", "last@last", "weighted_mean@last"]
    for strategy in strategies:
        expected = reference.pool(
            [hidden], plain.astype(np.int64), [strategy.split("@")[0]], "sum", None, None, False
        )
        np.testing.assert_allclose(hiddenpool.pool(hidden, odd_bools, strategy), expected)
        np.testing.assert_allclose(
            hiddenpool.pool(hidden, odd_bools, strategy, backend="torch"), expected, rtol=1e-6
        )
        # Strided (every other column) and read-only views of the same bytes.
        wide = np.zeros((2, 8), dtype=np.uint8)
        wide[:, ::2] = mask_bytes
        strided = wide.view(np.bool_)[:, ::2]
        strided.flags.writeable = False
        np.testing.assert_allclose(hiddenpool.pool(hidden, strided, strategy), expected)
    # The same real tokens, packed: rows are tokens 0..2 and 1..3.
    packed = np.concatenate([hidden[0, :3], hidden[1, 1:]])
    np.testing.assert_allclose(
        hiddenpool.pool_packed(packed, np.array([0, 3, 6]), "mean"),
        hiddenpool.pool(hidden, odd_bools, "mean"),
        rtol=1e-6,
    )
    # eos skips padding by the same reading: EOS id 9 sits in padding of row 1 (token 0)
    # and at real tokens 2 and 3.
    ids = np.array([[5, 5, 9, 9], [9, 5, 5, 9]], dtype=np.int64)
    positions = hiddenpool._native.find_token(ids, odd_bools, 9)
    assert positions.tolist() == [2, 3]
    np.testing.assert_allclose(
        hiddenpool.eos(hidden, odd_bools, ids, 9), np.stack([hidden[0, 2], hidden[1, 3]])
    )
