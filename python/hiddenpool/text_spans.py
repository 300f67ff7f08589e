"""Spans of a text as token positions: words from word ids, chunks from character spans or
token counts, and the windows late chunking runs a long text in. Used by ``Encoder``'s
``encode_words`` and ``encode_chunks``; numpy only, except that hidden states given as
torch tensors are stitched as torch tensors on their own device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def word_spans(
    word_ids: Sequence[int | None], offsets: Sequence[tuple[int, int]]
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Each word's token span ``(first, last + 1)`` and ``[w, 2]`` character spans, in word
    order; tokens without a word (special tokens) belong to none.

    >>> word_ids = [None, 0, 0, 1, None]
    >>> spans, characters = word_spans(word_ids, [(0, 0), (0, 2), (2, 5), (6, 9), (0, 0)])
    >>> spans, characters.tolist()
    ([(1, 3), (3, 4)], [[0, 5], [6, 9]])
    """
    spans: list[tuple[int, int]] = []
    characters: list[tuple[int, int]] = []
    previous: int | None = None
    for position, word in enumerate(word_ids):
        if word is None:
            previous = None
            continue
        start, end = offsets[position]
        if word == previous:
            spans[-1] = (spans[-1][0], position + 1)
            characters[-1] = (characters[-1][0], max(characters[-1][1], end))
        else:
            spans.append((position, position + 1))
            characters.append((start, end))
        previous = word
    return spans, np.array(characters, dtype=np.int64).reshape(-1, 2)


def chunk_token_spans(
    text: str,
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]] | None,
    chunk_tokens: int | None,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The token span and character span of each chunk of ``text``, whose tokens (no special
    tokens) have character ``offsets``. Either ``spans`` (character spans; a chunk takes the
    tokens that start inside it, and one covering none is a ValueError naming it) or
    ``chunk_tokens`` (consecutive chunks of that many tokens).

    >>> chunk_token_spans("a bc d", [(0, 1), (2, 4), (5, 6)], [(0, 4), (4, 6)], None)
    ([(0, 2), (2, 3)], [(0, 4), (4, 6)])
    >>> chunk_token_spans("a bc d", [(0, 1), (2, 4), (5, 6)], None, 2)
    ([(0, 2), (2, 3)], [(0, 4), (5, 6)])
    """
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    count = len(offsets)
    if chunk_tokens is not None:
        token_spans = [(a, min(a + chunk_tokens, count)) for a in range(0, count, chunk_tokens)]
        char_spans = [(int(offsets[a][0]), int(offsets[b - 1][1])) for a, b in token_spans]
    else:
        assert spans is not None
        char_spans = checked_char_spans(spans, len(text))
        token_spans = []
        for index, (start, end) in enumerate(char_spans):
            inside = np.flatnonzero((starts >= start) & (starts < end))
            if inside.size == 0:
                raise ValueError(
                    f"spans[{index}] = ({start}, {end}): covers no token of the text "
                    f"({text[start:end]!r})"
                )
            token_spans.append((int(inside[0]), int(inside[-1]) + 1))
    if not token_spans:
        raise ValueError("text: has no tokens to chunk")
    return token_spans, char_spans


def checked_char_spans(spans: Sequence[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """``spans`` as ``(start, end)`` int pairs inside a text of ``length`` characters, or a
    TypeError/ValueError naming the span at fault."""
    if isinstance(spans, (str, bytes)):
        raise TypeError("spans: expected (start_char, end_char) pairs, got a string")
    checked: list[tuple[int, int]] = []
    for index, span in enumerate(spans):
        try:
            start, end = (int(value) for value in span)
        except (TypeError, ValueError):
            raise TypeError(
                f"spans[{index}]: expected a (start_char, end_char) pair, got {span!r}"
            ) from None
        if not 0 <= start < end <= length:
            raise ValueError(
                f"spans[{index}] = ({start}, {end}): needs 0 <= start < end <= {length} "
                "(the text's length)"
            )
        checked.append((start, end))
    if not checked:
        raise ValueError("spans: empty; give at least one (start_char, end_char) pair")
    return checked


def late_chunking_windows(tokens: int, window: int) -> tuple[list[int], np.ndarray]:
    """Where the windows over ``tokens`` text tokens start (each ``window`` long, the last
    one ending at the text's end, overlapping by half), and for each token the window
    where it has the most context on both sides: the largest ``min(tokens before it,
    tokens after it)`` inside the window, the earlier window on ties.

    >>> starts, chosen = late_chunking_windows(10, 4)
    >>> starts, chosen.tolist()
    ([0, 2, 4, 6], [0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    """
    if tokens <= window:
        return [0], np.zeros(tokens, dtype=np.int64)
    stride = max(1, window // 2)
    starts = [*range(0, tokens - window, stride), tokens - window]
    chosen = np.empty(tokens, dtype=np.int64)
    begin = np.array(starts)
    # Blocks of tokens at a time: a [tokens, windows] table would be quadratic in the text.
    for first in range(0, tokens, 4096):
        positions = np.arange(first, min(first + 4096, tokens))[:, None]
        inside = (positions >= begin) & (positions < begin + window)
        context = np.where(
            inside, np.minimum(positions - begin, begin + window - 1 - positions), -1
        )
        chosen[first : first + len(positions)] = np.argmax(context, axis=1)
    return starts, chosen


class StitchedStates:
    """One ``[1, n, H]`` row per needed hidden state, token p taken from the window that
    ``chosen[p]`` names, filled batch by batch as windows are run. A runner asked for the
    last state alone may return just that one; torch tensors stay torch on their device."""

    def __init__(
        self,
        states: frozenset[int],
        state_count: int,
        chosen: np.ndarray,
        window_starts: Sequence[int],
        lead: int,
    ) -> None:
        self.states = states
        self.state_count = state_count
        self.chosen = chosen
        self.window_starts = window_starts
        self.lead = lead
        self.rows: list[Any] = [None] * state_count

    def take(self, hidden: Any, windows: Sequence[int], mask: np.ndarray) -> None:
        """Copies the tokens whose chosen window is among ``windows`` (the batch's rows, in
        order) out of the runner's ``hidden`` states of that batch."""
        from hiddenpool.ops.common import _states_from

        layers = _states_from(hidden)
        rows, positions, targets = [], [], []
        for row, window in enumerate(windows):
            tokens = np.flatnonzero(self.chosen == window)
            real = np.flatnonzero(mask[row])
            rows.append(np.full(len(tokens), row))
            positions.append(real[self.lead + tokens - self.window_starts[window]])
            targets.append(tokens)
        source_rows, source_positions, target = (
            np.concatenate(parts).astype(np.int64) for parts in (rows, positions, targets)
        )
        for index in self.states:
            layer = layers[index] if len(layers) == self.state_count else layers[-1]
            if hasattr(layer, "detach"):
                import torch

                picked = layer[
                    torch.from_numpy(source_rows).to(layer.device),
                    torch.from_numpy(source_positions).to(layer.device),
                ]
                if self.rows[index] is None:
                    shape = (1, len(self.chosen), layer.shape[-1])
                    self.rows[index] = layer.new_zeros(shape)
                self.rows[index][0, torch.from_numpy(target).to(layer.device)] = picked
            else:
                array = np.asarray(layer)
                if self.rows[index] is None:
                    shape = (1, len(self.chosen), array.shape[-1])
                    self.rows[index] = np.zeros(shape, dtype=array.dtype)
                self.rows[index][0, target] = array[source_rows, source_positions]
