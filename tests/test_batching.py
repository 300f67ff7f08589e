"""Token-budget batching: the plan against a plain reading of its rules, the padded
arrays against the tokenizer's own padding, and encodings that do not depend on how
texts were batched."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny_models
from hiddenpool.encoder import Encoder
from hiddenpool.runners.tokens import Tokenized, pad_batch, plan_batches


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), max_size=60),
    batch_size=st.one_of(st.none(), st.integers(1, 10)),
    budget=st.one_of(st.none(), st.integers(1, 200)),
)
def test_plan_follows_its_rules(lengths, batch_size, budget):
    batches = plan_batches(lengths, batch_size, budget)
    # Every text exactly once.
    assert sorted(row for batch in batches for row in batch) == list(range(len(lengths)))
    flat = [row for batch in batches for row in batch]
    # Longest first (ties in input order), so batches are contiguous runs of that order.
    assert flat == sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    for position, batch in enumerate(batches):
        width = max(1, max(lengths[row] for row in batch))
        if batch_size is not None:
            assert len(batch) <= batch_size
        if budget is not None and len(batch) > 1:
            assert len(batch) * width <= budget
        # Greedy: the next text would have broken a limit.
        if position + 1 < len(batches):
            grown = len(batch) + 1
            full = batch_size is not None and len(batch) >= batch_size
            over = budget is not None and grown * width > budget
            assert full or over


class _Side:
    def __init__(self, side: str) -> None:
        self.pad_id = 9
        self.padding_side = side


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_equal_the_tokenizer_padding(side):
    _, tokenizer = tiny_models.bert()
    tokenizer.padding_side = side
    texts = ["the cat sat on the mat", "a dog", "bird"]
    encoded = tokenizer(texts, padding=False)
    tokenized = Tokenized(encoded["input_ids"], None, 0)
    batch = pad_batch(tokenized, [2, 0], _Side(side))
    expected = tokenizer([texts[2], texts[0]], padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch.mask, expected["attention_mask"])
    real = expected["attention_mask"] == 1
    np.testing.assert_array_equal(batch.ids[real], expected["input_ids"][real])
    assert (batch.ids[~real] == 9).all()
    assert batch.rows == [2, 0]


def test_encodings_do_not_depend_on_batching():
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    texts = [text for text in tiny_models.TEXTS for _ in range(3)] + ["the cat " * 20]
    alone = np.stack([encoder.encode([text], "mean+max@last2:sum")[0] for text in texts])
    for batch_size, budget in [(None, 1), (None, 40), (None, 10_000), (4, None), (2, 30)]:
        rows = encoder.encode(
            texts, "mean+max@last2:sum", batch_size=batch_size, max_batch_tokens=budget
        )
        np.testing.assert_allclose(rows, alone, atol=1e-5, err_msg=f"{batch_size} {budget}")


def test_batch_limits_are_checked():
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    for options, message in [
        ({"batch_size": 0}, "batch_size: expected a positive integer or None, got 0"),
        ({"max_batch_tokens": -5}, "max_batch_tokens: expected a positive integer or None"),
        ({"max_batch_tokens": 2.5}, "max_batch_tokens: expected a positive integer or None"),
        ({"max_batch_tokens": None}, "max_batch_tokens: None needs a batch_size"),
    ]:
        with pytest.raises(ValueError, match=message):
            encoder.encode(["the cat"], **options)
