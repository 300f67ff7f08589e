"""Equivalence with sentence-transformers' Pooling module (the installed version) on
right-padded batches, and the cases where hiddenpool deliberately differs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import hiddenpool
import reference

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # older sentence-transformers
        from sentence_transformers.models import Pooling

# sentence-transformers mode -> hiddenpool pool
MODES = {
    "cls": "first",
    "mean": "mean",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weighted_mean",
    "lasttoken": "last",
}


def right_padded(seed: int = 0, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    lengths = [7, 1, 4, 7, 3, 5]
    tokens, hidden = 7, 16
    values = torch.from_numpy(
        rng.standard_normal((len(lengths), tokens, hidden)).astype(np.float32)
    )
    mask = torch.zeros((len(lengths), tokens), dtype=torch.int64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return values.to(dtype), mask


def sentence_transformers_pool(values: torch.Tensor, mask: torch.Tensor, modes) -> torch.Tensor:
    module = Pooling(values.shape[-1], pooling_mode=tuple(modes))
    features = {"token_embeddings": values, "attention_mask": mask}
    return module(features)["sentence_embedding"]


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_equals_sentence_transformers(mode):
    values, mask = right_padded()
    theirs = sentence_transformers_pool(values, mask, [mode])
    ours = hiddenpool.pool(values, mask, f"{MODES[mode]}@last")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_concatenated_modes_equal_sentence_transformers():
    values, mask = right_padded(1)
    modes = list(MODES)
    theirs = sentence_transformers_pool(values, mask, modes)
    ours = hiddenpool.pool(values, mask, "+".join(MODES[m] for m in modes) + "@last")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # And the forced torch path gives the same numbers.
    with hiddenpool.use_backend("torch"):
        forced = hiddenpool.pool(values, mask, "+".join(MODES[m] for m in modes) + "@last")
    torch.testing.assert_close(forced, theirs, rtol=1e-6, atol=1e-6)


def test_left_padding_matches_the_plain_definition():
    values, right_mask = right_padded(2)
    lengths = right_mask.sum(1)
    tokens = right_mask.shape[1]
    left_values = torch.zeros_like(values)
    left_mask = torch.zeros_like(right_mask)
    for row, length in enumerate(lengths.tolist()):
        left_values[row, tokens - length :] = values[row, :length]
        left_mask[row, tokens - length :] = 1
    strategy = "first+mean+max+mean_sqrt_len+weighted_mean+last@last"
    # Left and right padding of the same sentences give the same vectors.
    torch.testing.assert_close(
        hiddenpool.pool(left_values, left_mask, strategy),
        hiddenpool.pool(values, right_mask, strategy),
        rtol=1e-6,
        atol=1e-6,
    )
    expected = reference.pool(
        [left_values.numpy()], left_mask.numpy(), strategy.split("@")[0].split("+")
    )
    np.testing.assert_allclose(
        hiddenpool.pool(left_values.numpy(), left_mask.numpy(), strategy),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )


def test_where_we_differ_nan_in_padding_does_not_leak():
    values, mask = right_padded(3)
    values[mask == 0] = float("nan")
    theirs = sentence_transformers_pool(values, mask, ["mean"])
    ours = hiddenpool.pool(values, mask, "mean@last")
    assert torch.isnan(theirs).any()  # sentence-transformers multiplies NaN by a zero mask
    assert not torch.isnan(ours).any()
    expected = reference.pool([torch.nan_to_num(values).numpy()], mask.numpy(), ["mean"])
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_where_we_differ_empty_rows_give_zeros():
    values, mask = right_padded(4)
    mask[2] = 0
    theirs = sentence_transformers_pool(values, mask, ["max", "cls"])
    ours = hiddenpool.pool(values, mask, "max+first@last")
    hidden = values.shape[-1]
    assert torch.isinf(theirs[2, :hidden]).all()  # max over nothing: -inf
    torch.testing.assert_close(theirs[2, hidden:], values[2, 0])  # cls reads a padding token
    assert (ours[2] == 0).all()
    torch.testing.assert_close(ours[[0, 1, 3]], theirs[[0, 1, 3]])


def test_where_we_differ_weighted_mean_counts_real_tokens_only():
    values, mask = right_padded(5)
    mask[0] = torch.tensor([1, 0, 0, 1, 1, 0, 1])  # a masked-out prompt in the middle
    ours = hiddenpool.pool(values, mask, "weighted_mean@last")
    real = [0, 3, 4, 6]
    weights = torch.arange(1, 5, dtype=torch.float32)
    expected = (values[0, real] * weights[:, None]).sum(0) / weights.sum()
    torch.testing.assert_close(ours[0], expected)
