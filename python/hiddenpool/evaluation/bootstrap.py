"""Bootstrap intervals and paired tests for evaluation scores, vectorized over resamples:
one ``[B, n]`` array of resampled indices is shared by every strategy, so differences
between strategies are measured on the same resamples (a paired test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000


def resample_indices(count: int, resamples: int, seed: int | None) -> np.ndarray:
    """``[resamples, count]`` indices drawn with replacement (``seed`` makes them
    reproducible).

    >>> resample_indices(4, 2, seed=0).shape
    (2, 4)
    """
    if resamples < 1:
        raise ValueError(f"resamples: expected a positive integer, got {resamples}")
    generator = np.random.default_rng(seed)
    return generator.integers(0, count, size=(resamples, count))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1 along the last axis, ties sharing their average rank (float64).

    >>> average_ranks(np.array([[3.0, 1.0, 3.0, 2.0]]))
    array([[3.5, 1. , 3.5, 2. ]])
    """
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    count = values.shape[-1]
    positions = np.broadcast_to(np.arange(count), values.shape)
    starts = np.ones(values.shape, dtype=bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = np.ones(values.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=-1)
    last = np.flip(
        np.minimum.accumulate(np.flip(np.where(ends, positions, count), axis=-1), axis=-1),
        axis=-1,
    )
    ranks = np.empty(values.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
    return ranks


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's correlation of each row pair of ``[B, n]`` arrays; NaN for constant rows."""
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (x * y).sum(-1) / denominator, np.nan)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's correlation of each row pair of ``[B, n]`` arrays."""
    return pearson_rows(average_ranks(x), average_ranks(y))


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> Interval:
    """The central ``level`` percentile interval of bootstrap samples (NaNs dropped; NaN
    bounds when nothing is left)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return Interval(float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(low), float(high))


def paired_p_value(best: np.ndarray, other: np.ndarray) -> float:
    """Two-sided paired bootstrap p-value for "``other`` scores the same as ``best``", from
    the two score samples on the same resamples: twice the smaller share of resamples on
    either side of no difference, with the +1 correction, at most 1. Identical samples give 1.

    >>> paired_p_value(np.array([0.8, 0.7, 0.9]), np.array([0.8, 0.7, 0.9]))
    1.0
    """
    difference = best - other
    difference = difference[np.isfinite(difference)]
    count = difference.size
    if count == 0:
        return float("nan")
    at_most = (np.count_nonzero(difference <= 0) + 1) / (count + 1)
    at_least = (np.count_nonzero(difference >= 0) + 1) / (count + 1)
    return float(min(1.0, 2 * min(at_most, at_least)))


def bootstrap_scores(score: Callable[[np.ndarray], np.ndarray], indices: np.ndarray) -> np.ndarray:
    """``score`` applied to each resample: ``score`` takes ``[B, n]`` indices and returns
    ``[B]`` scores; resamples are fed in blocks to bound memory."""
    block = max(1, 2_000_000 // max(1, indices.shape[1]))
    return np.concatenate(
        [score(indices[start : start + block]) for start in range(0, len(indices), block)]
    )
