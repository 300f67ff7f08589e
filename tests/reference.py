"""The plain definition of every pool, written with numpy loops and float64 arithmetic,
independent of hiddenpool's code. Tests compare the package against it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def widen(array: np.ndarray, bfloat16: bool = False) -> np.ndarray:
    """float64 values of an array; ``bfloat16`` reads 16-bit integers as bfloat16 bits."""
    if bfloat16:
        bits = np.asarray(array).astype(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return np.asarray(array).astype(np.float64)


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Rounds float32 values to bfloat16 (round to nearest even), as int16 bit patterns."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).view(np.int16)


def combine_tokens(
    layers: Sequence[np.ndarray], combine: str, weights: Sequence[float] | None = None
) -> list[np.ndarray]:
    """Per-token layer combination; a list of ``[B, T, H]`` float64 segments."""
    if len(layers) == 1:
        return [layers[0]]
    if combine == "concat":
        return list(layers)
    if combine == "sum":
        return [np.sum(np.stack(layers), axis=0)]
    if combine == "mean":
        return [np.mean(np.stack(layers), axis=0)]
    if combine == "weighted":
        assert weights is not None
        return [
            np.sum(np.stack([w * layer for w, layer in zip(weights, layers, strict=True)]), axis=0)
        ]
    raise AssertionError(combine)


def pool_row(values: np.ndarray, real: np.ndarray, name: str, index: int = -1) -> np.ndarray:
    """One row: ``values`` ``[T, H]`` float64, ``real`` ``[T]`` bool."""
    hidden = values.shape[1]
    positions = [t for t in range(len(real)) if real[t]]
    if name == "index":
        return values[index].copy() if index >= 0 else np.zeros(hidden)
    if not positions:
        return np.zeros(hidden)
    tokens = values[positions]
    if name == "mean":
        return tokens.sum(axis=0) / len(positions)
    if name == "sum":
        return tokens.sum(axis=0)
    if name == "max":
        return tokens.max(axis=0)  # numpy propagates NaN, as torch.amax does
    if name == "mean_sqrt_len":
        return tokens.sum(axis=0) / np.sqrt(len(positions))
    if name == "weighted_mean":
        weights = np.arange(1, len(positions) + 1, dtype=np.float64)
        return (tokens * weights[:, None]).sum(axis=0) / weights.sum()
    if name == "first":
        return tokens[0].copy()
    if name == "last":
        return tokens[-1].copy()
    raise AssertionError(name)


def pool(
    layers: Sequence[np.ndarray],
    mask: np.ndarray,
    pools: Sequence[str],
    combine: str = "sum",
    weights: Sequence[float] | None = None,
    index: np.ndarray | None = None,
    bfloat16: bool = False,
) -> np.ndarray:
    """``[B, D]`` float64: pools concatenated in order, each over the combined segments."""
    widened = [widen(layer, bfloat16) for layer in layers]
    segments = combine_tokens(widened, combine, weights)
    real = np.asarray(mask) != 0
    batch = real.shape[0]
    rows = []
    for row in range(batch):
        parts = []
        for name in pools:
            for segment in segments:
                position = int(index[row]) if index is not None else -1
                parts.append(pool_row(segment[row], real[row], name, position))
        rows.append(np.concatenate(parts) if parts else np.zeros(0))
    width = sum(segment.shape[2] for segment in segments) * len(pools)
    return np.array(rows, dtype=np.float64).reshape(batch, width)


def first_token(input_ids: np.ndarray, mask: np.ndarray, token_id: int) -> np.ndarray:
    """First real position of ``token_id`` per row, -1 where absent."""
    result = []
    for ids, real in zip(np.asarray(input_ids), np.asarray(mask) != 0, strict=True):
        found = [t for t in range(len(ids)) if real[t] and ids[t] == token_id]
        result.append(found[0] if found else -1)
    return np.array(result, dtype=np.int64)
