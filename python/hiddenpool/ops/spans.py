"""``pool_spans``: ``(row, start, end)`` spans of tokens, padded or packed, each pooled
on its own (words, chunks, late chunking)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from hiddenpool import _native
from hiddenpool.ops.common import (
    _BACKEND,
    Backend,
    StrategyLike,
    _as_numpy,
    _check_shapes,
    _choose_backend,
    _is_torch,
    _Plan,
    _row_lengths,
    _rows_text,
    _states_from,
    _to_tensor,
)
from hiddenpool.strategy import Strategy, strategy_list


def pool_spans(
    hidden_states: Any,
    spans: Any,
    strategy: StrategyLike | Sequence[StrategyLike] = "mean@last",
    *,
    attention_mask: Any = None,
    offsets: Any = None,
    layer_weights: Sequence[float] | None = None,
    layer_scale: float = 1.0,
    empty: Literal["zero", "raise"] = "zero",
    backend: Backend | None = None,
) -> Any:
    """Pools spans of tokens into one vector each, as ``strategy`` says.

    ``spans``: ``[S, 3]`` integers, each ``(row, start, end)``: token positions
    ``start..end`` (end exclusive) of row ``row``. Positions count every position of the
    padded row, padding included; only the real tokens inside a span are pooled, so the
    same span means the same tokens under left and right padding only when the caller
    shifts it (``Encoder.encode_tokens`` and ``encode_words`` do). Spans may overlap and
    share rows. ``hidden_states`` and ``attention_mask`` are as for ``pool`` (``[B, T, H]``
    and ``[B, T]``; no mask: every token is real); with ``offsets`` ``[B + 1]`` instead,
    ``hidden_states`` are packed ``[N, H]`` (``pool_packed``) and positions count from each
    row's first token. Every pool but ``eos`` works (``first``/``last`` are the first and
    last real token inside the span); a span with no real token pools to zeros, or raises
    with ``empty="raise"``. Returns ``[S, D]`` (a dict for a list of strategies), float32
    (float64 for float64 input); torch in gives torch out on the same device.

    >>> import numpy as np
    >>> hidden = np.arange(12, dtype=np.float32).reshape(1, 6, 2)
    >>> pool_spans(hidden, np.array([[0, 0, 2], [0, 2, 6]]), "mean@last")
    array([[1., 2.],
           [7., 8.]], dtype=float32)
    """
    several, keys, strategies = _checked_arguments(strategy, empty, attention_mask, offsets)
    states = _states_from(hidden_states)
    plan = _Plan(strategies, len(states), layer_weights, layer_scale)
    packed = offsets is not None
    if packed:
        first = states[plan.used[0]]
        if (backend or _BACKEND.get()) == "torch" or (
            _is_torch(first) and first.device.type != "cpu"
        ):
            raise ValueError(
                "offsets: packed input is pooled by the Rust kernels, on the host only; pass "
                "padded [B, T, H] states with attention_mask for the torch path"
            )
    chosen = _choose_backend(states[plan.used[0]], "rust" if packed else backend)
    converted, is_bfloat16 = chosen.states(plan.states_used(states))
    host_spans = _checked_spans(spans)
    if packed:
        _check_shapes(converted, None, packed=True)
        offset_array = _as_numpy(offsets, "offsets")[0]
        row_lengths = _row_lengths(offset_array, converted[0].shape[0])
        mask = None
    else:
        mask = chosen.mask(attention_mask, converted[0])
        _check_shapes(converted, mask)
        rows, tokens = tuple(mask.shape)
        row_lengths = np.full(rows, tokens)
    _check_span_bounds(host_spans, row_lengths)
    if empty == "raise":
        _refuse_empty_spans(host_spans, mask, chosen.use_torch)

    def compute(layers: list[Any], pools: list[str], combine: str, weights: Any) -> Any:
        if chosen.use_torch:
            from hiddenpool import torch_backend

            assert mask is not None  # packed input always takes the Rust kernels
            return torch_backend.pool_spans(
                layers, mask, _to_tensor(host_spans, chosen.device), pools, combine, weights
            )
        return _native.pool_spans(
            layers,
            host_spans,
            pools,
            combine,
            list(weights) if weights else None,
            attention_mask=mask,
            offsets=offset_array if packed else None,
            bfloat16=is_bfloat16,
        )

    outputs = plan.run(keys, converted, compute, chosen)
    return outputs if several else outputs[keys[0]]


def _checked_spans(spans: Any) -> np.ndarray:
    """``spans`` as a host ``[S, 3]`` int64 array, or a TypeError/ValueError naming it."""
    if _is_torch(spans):
        spans = spans.detach().cpu()
    array = np.asarray(spans)
    if array.size == 0 and array.dtype.kind == "f":
        array = array.astype(np.int64)  # np.asarray([]) is float64
    if array.dtype.kind not in "iu":
        raise TypeError(f"spans: expected integer (row, start, end) triples, got {array.dtype}")
    if array.size == 0:
        array = array.reshape(0, 3)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"spans: expected shape [S, 3] (row, start, end), got {list(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _check_span_bounds(spans: np.ndarray, row_lengths: np.ndarray) -> None:
    """A ValueError naming the first span whose row or positions fall outside the input."""
    rows = row_lengths.shape[0]
    row, start, end = spans[:, 0], spans[:, 1], spans[:, 2]
    bad_row = np.flatnonzero((row < 0) | (row >= rows))
    if bad_row.size:
        at = int(bad_row[0])
        raise ValueError(
            f"spans[{at}] = ({row[at]}, {start[at]}, {end[at]}): row {row[at]} is outside 0..{rows}"
        )
    limit = row_lengths[row]
    bad = np.flatnonzero((start < 0) | (end < start) | (end > limit))
    if bad.size:
        at = int(bad[0])
        raise ValueError(
            f"spans[{at}] = ({row[at]}, {start[at]}, {end[at]}): needs 0 <= start <= end <= "
            f"{limit[at]} (the row's token positions)"
        )


def _checked_arguments(
    strategy: StrategyLike | Sequence[StrategyLike],
    empty: str,
    attention_mask: Any,
    offsets: Any,
) -> tuple[bool, list[str], list[Strategy]]:
    """``pool_spans``' strategies parsed (no ``eos``), ``empty`` and the layout checked."""
    if empty not in ("zero", "raise"):
        raise ValueError(f"empty: expected 'zero' or 'raise', got {empty!r}")
    several, keys, strategies = strategy_list(strategy)
    for key, parsed in zip(keys, strategies, strict=True):
        if "eos" in parsed.pools:
            raise ValueError(
                f"strategy {key}: the eos pool finds one token per row; within spans use "
                "first or last"
            )
    if attention_mask is not None and offsets is not None:
        raise ValueError(
            "offsets: give attention_mask (padded [B, T, H] input) or offsets (packed [N, H] "
            "input), not both"
        )
    return several, keys, strategies


def _refuse_empty_spans(spans: np.ndarray, mask: Any, use_torch: bool) -> None:
    """``empty="raise"``: a ValueError naming the spans that hold no real token."""
    row, start, end = spans.T
    if mask is None:
        counts = end - start  # packed rows: every position is real
    else:
        # Read on the host only here: a device mask costs a copy and a synchronisation.
        real = np.asarray(mask.cpu() if use_torch else mask) != 0
        before = np.zeros((real.shape[0], real.shape[1] + 1), dtype=np.int64)
        np.cumsum(real, axis=1, out=before[:, 1:])
        counts = before[row, end] - before[row, start]
    empty_spans = [int(span) for span in np.flatnonzero(counts == 0)]
    if empty_spans:
        raise ValueError(
            f"spans: {len(empty_spans)} span(s) hold no real token: "
            f"{_rows_text(empty_spans)} (pass empty='zero' to pool them to zeros)"
        )
