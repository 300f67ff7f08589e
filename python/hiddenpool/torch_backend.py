"""Pooling with torch operations, for tensors the Rust kernels cannot read (CUDA and other
devices), with the same semantics as the kernels: float32 accumulation for half types,
padded positions never read into a result (``torch.where``, never a multiply by the mask),
empty rows pooled to zeros, NaN in real tokens propagated.

This module is imported only when a torch tensor arrives.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pool(
    layers: Sequence[torch.Tensor],
    mask: torch.Tensor,
    pools: Sequence[str],
    combine: str,
    layer_weights: Sequence[float] | None,
    index: torch.Tensor | None,
) -> torch.Tensor:
    """The torch twin of ``_native.pool``: ``layers`` are ``[B, T, H]`` tensors on one
    device, ``mask`` ``[B, T]`` (nonzero = real token), ``index`` ``[B]`` int64 (-1: none).
    Returns ``[B, D]`` in float32 (float64 for float64 input), laid out as the kernels do:
    ``[pool 0: segment 0, segment 1, ...][pool 1: ...]``."""
    first_layer = layers[0]
    accumulate = accumulator_dtype(first_layer.dtype)
    batch, tokens, hidden = first_layer.shape
    if combine == "concat":
        segments = [[(layer, 1.0)] for layer in layers]
    elif combine == "weighted":
        assert layer_weights is not None
        segments = [list(zip(layers, layer_weights, strict=True))]
    elif combine == "mean":
        segments = [[(layer, 1.0 / len(layers)) for layer in layers]]
    else:
        segments = [[(layer, 1.0) for layer in layers]]
    if tokens == 0 or not pools:
        # Every row is empty (and has no position to gather at): all pools give zeros.
        width = len(pools) * len(segments) * hidden
        return torch.zeros((batch, width), dtype=accumulate, device=first_layer.device)
    rows = _Rows((mask != 0).to(first_layer.device), accumulate, index)
    pooled = [_Segment(segment, rows) for segment in segments]
    return torch.cat([segment.pool(name) for name in pools for segment in pooled], dim=1)


# Elements of hidden states a chunk of spans copies at most (256 MiB of float32): spans
# are pooled by copying their rows, so the copy is bounded rather than S x T x H at once.
SPAN_CHUNK_ELEMENTS = 1 << 26


def pool_spans(
    layers: Sequence[torch.Tensor],
    mask: torch.Tensor,
    spans: torch.Tensor,
    pools: Sequence[str],
    combine: str,
    layer_weights: Sequence[float] | None,
) -> torch.Tensor:
    """The torch twin of ``_native.pool_spans`` on padded input: ``spans`` ``[S, 3]`` int64
    ``(row, start, end)``, already checked. Each span pools its row's copy under the row's
    mask narrowed to ``start..end``; spans go in chunks so the copies stay bounded."""
    _, tokens, hidden = layers[0].shape
    device = layers[0].device
    spans = spans.to(device=device, dtype=torch.int64)
    positions = torch.arange(tokens, device=device)
    per_span = max(1, tokens * hidden * len(layers))
    step = max(1, SPAN_CHUNK_ELEMENTS // per_span)
    parts = []
    real = (mask != 0).to(device)
    # At least one chunk, so no spans give pool()'s own [0, D] result.
    for first in range(0, max(spans.shape[0], 1), step):
        chunk = spans[first : first + step]
        rows, start, end = chunk[:, 0], chunk[:, 1:2], chunk[:, 2:3]
        inside = real.index_select(0, rows) & (positions >= start) & (positions < end)
        copies = [layer.index_select(0, rows) for layer in layers]
        parts.append(pool(copies, inside, pools, combine, layer_weights, None))
    return torch.cat(parts, dim=0)


class _Rows:
    """What the mask says about each row, computed once per call and only when a pool
    asks for it."""

    def __init__(self, real: torch.Tensor, accumulate: torch.dtype, index: torch.Tensor | None):
        self.real = real
        self.accumulate = accumulate
        self.index = index
        self.real_3d = real.unsqueeze(2)
        self.zero = torch.zeros((), dtype=accumulate, device=real.device)

    @functools.cached_property
    def count(self) -> torch.Tensor:
        return self.real.sum(dim=1).to(self.accumulate).unsqueeze(1)

    @functools.cached_property
    def has_tokens(self) -> torch.Tensor:
        return self.real.any(dim=1).unsqueeze(1)

    @functools.cached_property
    def rank(self) -> torch.Tensor:
        """1-based rank of each real token within its row (meaningless at padding)."""
        return torch.cumsum(self.real.to(torch.int64), dim=1).to(self.accumulate).unsqueeze(2)

    def positions(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The token each row gathers at for first/last/index, and which rows have one."""
        if name == "index":
            assert self.index is not None
            positions = self.index.to(device=self.real.device, dtype=torch.int64)
            return positions, positions >= 0
        chosen = first_real(self.real) if name == "first" else last_real(self.real)
        return chosen, self.has_tokens.squeeze(1)


class _Segment:
    """One output segment (a weighted sum of layers per token) and the pools over it; the
    combined values and their masked sum are shared by the pools that need them."""

    def __init__(self, segment: Sequence[tuple[torch.Tensor, float]], rows: _Rows):
        self.segment = segment
        self.rows = rows

    @functools.cached_property
    def values(self) -> torch.Tensor:
        return _combined(self.segment, self.rows.accumulate)

    @functools.cached_property
    def total(self) -> torch.Tensor:
        return torch.where(self.rows.real_3d, self.values, self.rows.zero).sum(dim=1)

    def pool(self, name: str) -> torch.Tensor:
        rows = self.rows
        if name in ("first", "last", "index"):
            positions, valid = rows.positions(name)
            return _gather(self.segment, rows.accumulate, positions, valid)
        if name == "max":
            negative_infinity = torch.tensor(
                float("-inf"), dtype=rows.accumulate, device=self.values.device
            )
            largest = torch.where(rows.real_3d, self.values, negative_infinity).amax(dim=1)
            return torch.where(rows.has_tokens, largest, rows.zero)
        if name == "sum":
            return self.total
        if name == "weighted_mean":
            total = torch.where(rows.real_3d, self.values * rows.rank, rows.zero).sum(dim=1)
            divisor = rows.count * (rows.count + 1) / 2
        else:
            total = self.total
            divisor = rows.count if name == "mean" else rows.count.sqrt()
        safe_divisor = torch.where(rows.has_tokens, divisor, 1)
        return torch.where(rows.has_tokens, total / safe_divisor, rows.zero)


def _combined(
    segment: Sequence[tuple[torch.Tensor, float]], accumulate: torch.dtype
) -> torch.Tensor:
    total: torch.Tensor | None = None
    for layer, weight in segment:
        value = layer.to(accumulate)
        if weight != 1.0:
            value = value * weight
        total = value if total is None else total + value
    assert total is not None
    return total


def _gather(
    segment: Sequence[tuple[torch.Tensor, float]],
    accumulate: torch.dtype,
    positions: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    # Gather first, then combine: only B tokens are widened.
    hidden = segment[0][0].shape[2]
    safe = torch.where(valid, positions, torch.zeros_like(positions))
    picked = [
        (layer.gather(1, safe.view(-1, 1, 1).expand(-1, 1, hidden)).squeeze(1), weight)
        for layer, weight in segment
    ]
    gathered = _combined(picked, accumulate)
    return torch.where(valid.unsqueeze(1), gathered, torch.zeros_like(gathered))


def first_real(flags: torch.Tensor) -> torch.Tensor:
    """Per row, the first position where ``flags`` ``[B, T]`` is true; 0 where none is
    (callers mask those rows out)."""
    if flags.shape[1] == 0:
        return torch.zeros(flags.shape[0], dtype=torch.int64, device=flags.device)
    return torch.argmax(flags.to(torch.int8), dim=1)


def last_real(flags: torch.Tensor) -> torch.Tensor:
    """Per row, the last position where ``flags`` is true; T - 1 where none is."""
    if flags.shape[1] == 0:
        return torch.zeros(flags.shape[0], dtype=torch.int64, device=flags.device)
    return flags.shape[1] - 1 - torch.argmax(flags.flip(1).to(torch.int8), dim=1)


def find_token(input_ids: torch.Tensor, mask: torch.Tensor, token_id: int) -> torch.Tensor:
    """First real position of ``token_id`` per row, -1 where absent (on the ids' device)."""
    matches = (input_ids == token_id) & (mask.to(input_ids.device) != 0)
    position = first_real(matches)
    return torch.where(matches.any(dim=1), position, torch.full_like(position, -1))
