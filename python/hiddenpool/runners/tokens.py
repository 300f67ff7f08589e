"""Texts to padded token batches, shared by every runner: tokenize once, sort by token
length, fill batches up to a token budget, pad on the tokenizer's side.

Two tokenizers read texts: a transformers tokenizer (the torch runner's, any kind) and a
``tokenizers.Tokenizer`` loaded from ``tokenizer.json`` (the ONNX runner's, no transformers
needed). Both give the same ids for the same ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

# Padded tokens per batch when nothing else is asked for. Measured with
# `python benches/end_to_end.py --sweep 256 512 1024 2048 4096` (all-MiniLM-L6-v2, 2,910
# STS-B dev sentences, 2 threads): ONNX Runtime fp32 6.3 s at 1,024 against 7.0-7.8 s at
# 256, 512, 2,048 and 4,096; torch 8.6 s from 1,024 to 4,096, 10.2 s at 256. Larger batches
# leave the caches (8,192 cost ONNX Runtime 35% more) and hold more hidden states at once.
DEFAULT_MAX_BATCH_TOKENS = 1024


@dataclass
class Tokenized:
    """Token ids of a list of texts, truncated to ``max_length``, without padding."""

    ids: list[Sequence[int]]
    type_ids: list[Sequence[int]] | None
    truncated: int  # how many texts were longer than max_length
    # The fast tokenizer's ``tokenizers.Encoding`` of each text (word ids, character
    # offsets, special-token mask); None for slow transformers tokenizers.
    encodings: list[Any] | None = field(default=None, repr=False)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]


@dataclass
class TokenBatch:
    """One padded batch: ``ids``, ``mask`` and ``type_ids`` are ``[B, T]`` int64."""

    rows: list[int]  # each row's index in the input
    ids: np.ndarray
    mask: np.ndarray
    type_ids: np.ndarray | None


class TextTokenizer(Protocol):
    """What the encoder needs from a tokenizer."""

    max_length: int
    pad_id: int
    padding_side: Literal["left", "right"]
    unknown_id: int | None

    def tokenize(self, texts: list[str]) -> Tokenized: ...

    def plain_ids(self, texts: list[str]) -> list[Sequence[int]]:
        """Ids without special tokens and without truncation (for token reports)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1 (added tokens included)."""
        ...

    def special_count(self) -> int:
        """Special tokens added to a single text."""
        ...

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens a text starting with ``prompt`` spends on it: the prompt's tokens with the
        leading special tokens, without the trailing ones (sentence-transformers'
        ``prompt_length`` for BERT-style tokenizers)."""
        ...

    def plain_encoding(self, text: str) -> Any:
        """The ``tokenizers.Encoding`` of ``text`` without special tokens or truncation;
        ValueError for tokenizers that give no character offsets."""
        ...

    def require_fast(self, what: str) -> None:
        """ValueError naming ``what`` unless ``tokenize`` gives ``encodings`` (word ids,
        character offsets): slow transformers tokenizers give none."""
        ...

    def special_frame(self) -> tuple[list[int], list[int]]:
        """The special token ids put before and after every text (``[CLS]``, ``[SEP]``)."""
        ...


class TransformersTokenizer:
    """A transformers tokenizer (fast or slow) behind the ``TextTokenizer`` protocol."""

    def __init__(self, tokenizer: Any, max_length: int, wants_type_ids: bool) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.wants_type_ids = wants_type_ids
        pad_id = tokenizer.pad_token_id
        self.pad_id = int(pad_id) if pad_id is not None else 0
        side = getattr(tokenizer, "padding_side", "right")
        self.padding_side: Literal["left", "right"] = "left" if side == "left" else "right"
        unknown = getattr(tokenizer, "unk_token_id", None)
        self.unknown_id = int(unknown) if unknown is not None else None

    def tokenize(self, texts: list[str]) -> Tokenized:
        encoded = self.tokenizer(
            texts,
            padding=False,
            truncation=True,
            max_length=self.max_length,
        )
        encodings = getattr(encoded, "encodings", None)
        if encodings is not None:
            # Fast tokenizers keep what truncation cut off.
            truncated = sum(1 for encoding in encodings if encoding.overflowing)
        else:
            # Slow tokenizers do not: measure the untruncated lengths instead.
            full = self.tokenizer(texts, truncation=False)["input_ids"]
            truncated = sum(1 for ids in full if len(ids) > self.max_length)
        type_ids = encoded.get("token_type_ids") if self.wants_type_ids else None
        return Tokenized(list(encoded["input_ids"]), type_ids, truncated, encodings)

    def plain_ids(self, texts: list[str]) -> list[Sequence[int]]:
        return list(self.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"])

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def special_count(self) -> int:
        return int(self.tokenizer.num_special_tokens_to_add(pair=False))

    def prompt_tokens(self, prompt: str) -> int:
        encoded = self.tokenizer(
            prompt, truncation=True, max_length=self.max_length, return_special_tokens_mask=True
        )
        return _without_trailing_specials(encoded["special_tokens_mask"])

    def plain_encoding(self, text: str) -> Any:
        self.require_fast("character offsets")
        # verbose=False: a text longer than max_length is expected here (it is windowed).
        encoded = self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)
        return encoded.encodings[0]

    def special_frame(self) -> tuple[list[int], list[int]]:
        encoded = self.tokenizer("a", return_special_tokens_mask=True)
        return _frame(list(encoded["input_ids"]), list(encoded["special_tokens_mask"]))

    def require_fast(self, what: str) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer: {type(self.tokenizer).__name__} is a slow tokenizer, which gives no "
                f"{what}; load the model's fast tokenizer (tokenizer.json)"
            )


class JsonTokenizer:
    """A ``tokenizers.Tokenizer`` (``tokenizer.json``) behind the ``TextTokenizer`` protocol;
    its own padding and truncation settings are replaced by the encoder's."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        *,
        pad_id: int,
        padding_side: Literal["left", "right"],
        truncation_side: Literal["left", "right"] = "right",
        unknown_id: int | None,
        wants_type_ids: bool,
    ) -> None:
        self._plain = tokenizer.__class__.from_str(tokenizer.to_str())
        self._plain.no_padding()
        self._plain.no_truncation()
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length, direction=truncation_side)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.unknown_id = unknown_id
        self.wants_type_ids = wants_type_ids

    def tokenize(self, texts: list[str]) -> Tokenized:
        encodings = self.tokenizer.encode_batch(texts)
        truncated = sum(1 for encoding in encodings if encoding.overflowing)
        type_ids = [encoding.type_ids for encoding in encodings] if self.wants_type_ids else None
        return Tokenized([encoding.ids for encoding in encodings], type_ids, truncated, encodings)

    def plain_ids(self, texts: list[str]) -> list[Sequence[int]]:
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def special_count(self) -> int:
        return len(self._plain.encode("").ids)

    def prompt_tokens(self, prompt: str) -> int:
        return _without_trailing_specials(self.tokenizer.encode(prompt).special_tokens_mask)

    def plain_encoding(self, text: str) -> Any:
        return self._plain.encode(text, add_special_tokens=False)

    def require_fast(self, what: str) -> None:
        return None  # a tokenizers.Tokenizer always gives encodings

    def special_frame(self) -> tuple[list[int], list[int]]:
        encoding = self._plain.encode("a")
        return _frame(list(encoding.ids), list(encoding.special_tokens_mask))


def _without_trailing_specials(special_mask: Sequence[int]) -> int:
    """The length of a token list less its trailing special tokens."""
    count = len(special_mask)
    while count and special_mask[count - 1]:
        count -= 1
    return count


def _frame(ids: list[int], special_mask: list[int]) -> tuple[list[int], list[int]]:
    """The leading and trailing special ids around a text's own tokens."""
    lead = 0
    while lead < len(ids) and special_mask[lead]:
        lead += 1
    tail = _without_trailing_specials(special_mask)
    return ids[:lead], ids[tail:] if tail >= lead else []


def plan_batches(
    lengths: Sequence[int], batch_size: int | None, max_batch_tokens: int | None
) -> list[list[int]]:
    """Row indices grouped into batches, longest texts first: each batch holds at most
    ``batch_size`` texts and at most ``max_batch_tokens`` padded tokens (rows x its longest
    text); a text longer than the budget gets a batch of its own.

    >>> plan_batches([3, 9, 4, 8], batch_size=None, max_batch_tokens=18)
    [[1, 3], [2, 0]]
    >>> plan_batches([3, 9, 4, 8], batch_size=3, max_batch_tokens=None)
    [[1, 3, 2], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        if current and (
            (batch_size is not None and len(current) >= batch_size)
            or (max_batch_tokens is not None and (len(current) + 1) * width > max_batch_tokens)
        ):
            batches.append(current)
            current = []
        if not current:
            width = max(lengths[index], 1)
        current.append(index)
    if current:
        batches.append(current)
    return batches


def plan_batches_by_cost(
    lengths: Sequence[int], max_batch_tokens: int, batch_cost: int = 64
) -> list[list[int]]:
    """Row indices grouped into batches that cost the fewest padded tokens, counting each
    batch as ``batch_cost`` tokens more (a forward pass's fixed cost): the rows sorted by
    length, longest first, cut where a shorter run of rows pays for a batch of its own.
    Each batch stays within ``max_batch_tokens`` (a longer row alone). For a server whose
    queue holds a few dozen texts of mixed lengths: padding them all to the longest doubled
    the tokens computed (STS-B sentences, groups of 22-64), and splitting them by this cost
    ran 1.4-1.8x faster (benches/serve.py). Exact (dynamic programming over the sorted
    rows); quadratic in the rows, so meant for up to a few hundred.

    >>> plan_batches_by_cost([30, 4, 5, 29, 6], max_batch_tokens=1024, batch_cost=16)
    [[0, 3], [4, 2, 1]]
    >>> plan_batches_by_cost([30, 4, 5, 29, 6], max_batch_tokens=1024, batch_cost=1000)
    [[0, 3, 4, 2, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    widths = [max(lengths[index], 1) for index in order]
    count = len(widths)
    best = [0.0] + [float("inf")] * count  # best[i]: the cheapest plan of the first i rows
    start = [0] * (count + 1)
    for end in range(1, count + 1):
        for first in range(end - 1, -1, -1):
            rows = end - first
            if rows > 1 and rows * widths[first] > max_batch_tokens:
                break
            cost = best[first] + rows * widths[first] + batch_cost
            if cost < best[end]:
                best[end], start[end] = cost, first
    batches: list[list[int]] = []
    end = count
    while end > 0:
        batches.append(order[start[end] : end])
        end = start[end]
    return batches[::-1]


def pad_batch(tokenized: Tokenized, rows: list[int], tokenizer: TextTokenizer) -> TokenBatch:
    """The texts at ``rows`` padded to their longest, on the tokenizer's padding side."""
    width = max(1, max(len(tokenized.ids[row]) for row in rows))
    ids = np.full((len(rows), width), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    type_ids = None if tokenized.type_ids is None else np.zeros_like(ids)
    left = tokenizer.padding_side == "left"
    for position, row in enumerate(rows):
        count = len(tokenized.ids[row])
        span = slice(width - count, width) if left else slice(0, count)
        ids[position, span] = tokenized.ids[row]
        mask[position, span] = 1
        if type_ids is not None and tokenized.type_ids is not None:
            type_ids[position, span] = tokenized.type_ids[row]
    return TokenBatch(rows, ids, mask, type_ids)
