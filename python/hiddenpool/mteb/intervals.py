"""Bootstrap intervals for MTEB's STS scores, from the pooled rows the shared pass already
holds: the cosine of each pair, Spearman against the gold scores over resampled pairs, as
``hiddenpool compare`` does. The point estimate is recomputed here and must equal MTEB's own
``cosine_spearman`` (``spearman``), a check on both."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hiddenpool.evaluation import bootstrap


@dataclasses.dataclass(frozen=True)
class StsInterval:
    spearman: float
    low: float
    high: float
    pairs: int


def sts_pairs(task: Any) -> tuple[list[str], list[str], np.ndarray] | None:
    """The first evaluation split's pairs and gold scores of a one-subset STS task, or None
    where the task has several subsets or another layout."""
    if str(task.metadata.type) != "STS" or task.metadata.is_multilingual:
        return None
    dataset: Any = getattr(task, "dataset", None)
    if dataset is None:
        return None
    split = task.metadata.eval_splits[0]
    try:
        data = dataset["default"][split] if "default" in dataset else dataset[split]
        first, second = (list(data[column]) for column in task.column_names)
        scores = np.asarray(data["score"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if not all(isinstance(text, str) for text in first + second):
        return None
    return first, second, scores


def sts_interval(
    first: np.ndarray, second: np.ndarray, gold: np.ndarray, resamples: int, seed: int
) -> StsInterval:
    """Spearman of the rows' cosine against ``gold`` with its 95% bootstrap interval."""
    first, second = first.astype(np.float64), second.astype(np.float64)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, (first * second).sum(axis=1) / norms, 0.0)
    point = float(bootstrap.spearman_rows(cosine[None, :], gold[None, :])[0])
    indices = bootstrap.resample_indices(len(gold), resamples, seed)
    samples = bootstrap.spearman_rows(cosine[indices], gold[indices])
    interval = bootstrap.percentile_interval(samples)
    return StsInterval(point, interval.low, interval.high, len(gold))
