"""Pooling with torch operations, for tensors the Rust kernels cannot read (CUDA and other
devices), with the same semantics as the kernels: float32 accumulation for half types,
padded positions never read into a result (``torch.where``, never a multiply by the mask),
empty rows pooled to zeros, NaN in real tokens propagated.

This module is imported only when a torch tensor arrives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KERNEL_POOLS = ("mean", "sum", "max", "mean_sqrt_len", "weighted_mean", "first", "last", "index")


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
    Returns ``[B, D]`` in float32 (float64 for float64 input)."""
    first_layer = layers[0]
    accumulate = accumulator_dtype(first_layer.dtype)
    real = (mask != 0).to(first_layer.device)
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

    if tokens == 0:
        # Every row is empty (and has no position to gather at): all pools give zeros.
        width = len(pools) * len(segments) * hidden
        return torch.zeros((batch, width), dtype=accumulate, device=first_layer.device)
    counts = real.sum(dim=1)
    has_tokens = (counts > 0).unsqueeze(1)
    real_3d = real.unsqueeze(2)
    rank = torch.cumsum(real.to(torch.int64), dim=1)
    first_position = first_real(real)
    last_position = last_real(real)
    blocks: list[torch.Tensor] = []
    for name in pools:
        for segment in segments:
            blocks.append(
                _pool_segment(
                    name,
                    segment,
                    accumulate,
                    real_3d,
                    counts,
                    has_tokens,
                    rank,
                    first_position,
                    last_position,
                    index,
                    batch,
                    hidden,
                )
            )
    if not blocks:
        return torch.zeros((batch, 0), dtype=accumulate, device=first_layer.device)
    return torch.cat(blocks, dim=1)


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
    hidden: int,
) -> torch.Tensor:
    # Gather first, then combine: only B tokens are widened.
    safe = torch.where(valid, positions, torch.zeros_like(positions))
    picked = [
        (layer.gather(1, safe.view(-1, 1, 1).expand(-1, 1, hidden)).squeeze(1), weight)
        for layer, weight in segment
    ]
    gathered = _combined(picked, accumulate)
    return torch.where(valid.unsqueeze(1), gathered, torch.zeros_like(gathered))


def _pool_segment(
    name: str,
    segment: Sequence[tuple[torch.Tensor, float]],
    accumulate: torch.dtype,
    real_3d: torch.Tensor,
    counts: torch.Tensor,
    has_tokens: torch.Tensor,
    rank: torch.Tensor,
    first_position: torch.Tensor,
    last_position: torch.Tensor,
    index: torch.Tensor | None,
    batch: int,
    hidden: int,
) -> torch.Tensor:
    if name in ("first", "last", "index"):
        if name == "index":
            assert index is not None
            positions = index.to(device=real_3d.device, dtype=torch.int64)
            valid = positions >= 0
        else:
            positions = first_position if name == "first" else last_position
            valid = has_tokens.squeeze(1)
        return _gather(segment, accumulate, positions, valid, hidden)
    values = _combined(segment, accumulate)
    zero = torch.zeros((), dtype=accumulate, device=values.device)
    count = counts.to(accumulate).unsqueeze(1)
    if name == "max":
        negative_infinity = torch.tensor(float("-inf"), dtype=accumulate, device=values.device)
        largest = torch.where(real_3d, values, negative_infinity).amax(dim=1)
        return torch.where(has_tokens, largest, zero)
    if name == "weighted_mean":
        weights = rank.to(accumulate).unsqueeze(2)
        total = torch.where(real_3d, values * weights, zero).sum(dim=1)
        divisor = count * (count + 1) / 2
    else:
        total = torch.where(real_3d, values, zero).sum(dim=1)
        if name == "sum":
            return total
        divisor = count if name == "mean" else count.sqrt()
    return torch.where(has_tokens, total / torch.where(has_tokens, divisor, 1), zero)


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
