"""Sentence-similarity evaluation of pooling strategies: read scored sentence pairs,
encode every distinct sentence once for all strategies, score pairs by cosine similarity,
and rank strategies by Spearman correlation with the gold scores."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import numpy as np

from hiddenpool.tokens import DEFAULT_MAX_BATCH_TOKENS

DEFAULT_STRATEGIES = [
    "mean@last",
    "cls@last",
    "max@last",
    "mean+max@last",
    "mean@-2",
    "mean@first_last:mean",
    "mean@last4:sum",
    "mean@last4:concat",
    "mean@all:mean",
    "mean@embeddings",
]


@dataclass
class Pairs:
    """Scored sentence pairs read from a file; ``skipped`` counts bad rows passed over."""

    first: list[str]
    second: list[str]
    scores: np.ndarray
    skipped: int = 0
    source: str = ""


class DataError(ValueError):
    """A data file that cannot be read as scored sentence pairs; names file and line."""


def default_data_path() -> str:
    """The pairs shipped with the package: several dozen written for hiddenpool, scored 0-5."""
    return str(resources.files("hiddenpool") / "data" / "sts_sample.tsv")


def read_pairs(path: str | os.PathLike[str], *, skip_bad: bool = False) -> Pairs:
    """Reads scored pairs from an STS Benchmark file (tab-separated, score in field 5,
    sentences in fields 6 and 7, extra trailing fields ignored, no quote processing) or from
    CSV/TSV with a header naming ``sentence1``, ``sentence2`` and ``score``.

    A bad row (missing fields, score not a number) raises DataError with its line number,
    or is counted in ``skipped`` with ``skip_bad=True``."""
    path = os.fspath(path)
    with open(path, encoding="utf-8", newline="") as handle:
        first_line = handle.readline()
    if not first_line:
        raise DataError(f"{path}: the file is empty")
    delimiter = "\t" if "\t" in first_line or path.endswith(".tsv") else ","
    header = [name.strip().lower() for name in next(csv.reader([first_line], delimiter=delimiter))]
    if {"sentence1", "sentence2", "score"} <= set(header):
        return _read_with_header(path, delimiter, header, skip_bad)
    return _read_sts_benchmark(path, skip_bad)


def _bad(path: str, line: int, problem: str, skip_bad: bool) -> None:
    if not skip_bad:
        raise DataError(f"{path}:{line}: {problem} (pass --skip-bad to skip such rows)")


def _parse_score(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _read_sts_benchmark(path: str, skip_bad: bool) -> Pairs:
    pairs = Pairs([], [], np.zeros(0), source=path)
    scores: list[float] = []
    with open(path, encoding="utf-8", newline="") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 7:
                _bad(
                    path,
                    line_number,
                    f"expected at least 7 tab-separated fields, got {len(fields)}",
                    skip_bad,
                )
                pairs.skipped += 1
                continue
            score = _parse_score(fields[4])
            if score is None:
                _bad(path, line_number, f"score {fields[4]!r} is not a number", skip_bad)
                pairs.skipped += 1
                continue
            pairs.first.append(fields[5])
            pairs.second.append(fields[6])
            scores.append(score)
    pairs.scores = np.asarray(scores, dtype=np.float64)
    return pairs


def _read_with_header(path: str, delimiter: str, header: list[str], skip_bad: bool) -> Pairs:
    pairs = Pairs([], [], np.zeros(0), source=path)
    scores: list[float] = []
    columns = {name: header.index(name) for name in ("sentence1", "sentence2", "score")}
    needed = max(columns.values()) + 1
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader)
        for row in reader:
            line_number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < needed:
                _bad(path, line_number, f"expected {needed} fields, got {len(row)}", skip_bad)
                pairs.skipped += 1
                continue
            score = _parse_score(row[columns["score"]])
            if score is None:
                _bad(
                    path, line_number, f"score {row[columns['score']]!r} is not a number", skip_bad
                )
                pairs.skipped += 1
                continue
            pairs.first.append(row[columns["sentence1"]])
            pairs.second.append(row[columns["sentence2"]])
            scores.append(score)
    pairs.scores = np.asarray(scores, dtype=np.float64)
    return pairs


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as Spearman's correlation needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's correlation; NaN when either side is constant."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's over average ranks)."""
    return pearson(rank(x), rank(y))


def cosine_similarities(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64; a zero vector has similarity 0."""
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    dots = np.einsum("ij,ij->i", first, second)
    similarities: np.ndarray = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return similarities


@dataclass
class StrategyResult:
    strategy: str
    dim: int
    spearman: float
    pearson: float
    seconds: float


@dataclass
class Comparison:
    model: str
    pairs: int
    sentences: int
    encode_seconds: float
    results: list[StrategyResult] = field(default_factory=list)
    skipped: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pairs": self.pairs,
            "results": [
                {
                    "strategy": result.strategy,
                    "dim": result.dim,
                    "spearman": result.spearman,
                    "pearson": result.pearson,
                    "seconds": result.seconds,
                }
                for result in self.results
            ],
        }


def compare(
    encoder: Any,
    pairs: Pairs,
    strategies: Sequence[str],
    *,
    batch_size: int | None = None,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
    missing_eos: Literal["raise", "last"] = "raise",
    layer_weights: Sequence[float] | None = None,
    layer_scale: float = 1.0,
    model_name: str = "",
    progress: bool | None = None,
) -> Comparison:
    """Scores each strategy on ``pairs``: every distinct sentence is encoded once, in one
    forward pass per batch for all strategies; ``seconds`` is each strategy's own pooling
    and scoring time. Results are ranked by Spearman, best first. ``batch_size`` and
    ``max_batch_tokens``, ``missing_eos``, ``layer_weights`` and ``layer_scale`` are
    ``Encoder.encode``'s."""
    if not pairs.scores.size:
        raise DataError(f"{pairs.source}: no sentence pairs to score")
    sentences = list(dict.fromkeys(pairs.first + pairs.second))
    position = {sentence: index for index, sentence in enumerate(sentences)}
    first_index = np.array([position[s] for s in pairs.first])
    second_index = np.array([position[s] for s in pairs.second])
    timings: dict[str, float] = {}
    started = time.perf_counter()
    embeddings = encoder.encode(
        sentences,
        list(strategies),
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        missing_eos=missing_eos,
        layer_weights=layer_weights,
        layer_scale=layer_scale,
        progress=progress,
        timings=timings,
    )
    encode_seconds = time.perf_counter() - started
    comparison = Comparison(
        model_name, len(pairs.scores), len(sentences), encode_seconds, skipped=pairs.skipped
    )
    for strategy in strategies:
        scoring_started = time.perf_counter()
        vectors = embeddings[strategy]
        similarities = cosine_similarities(vectors[first_index], vectors[second_index])
        result = StrategyResult(
            strategy=strategy,
            dim=int(vectors.shape[1]),
            spearman=spearman(similarities, pairs.scores),
            pearson=pearson(similarities, pairs.scores),
            seconds=timings.get(strategy, 0.0) + time.perf_counter() - scoring_started,
        )
        comparison.results.append(result)
    comparison.results.sort(key=lambda result: -np.nan_to_num(result.spearman, nan=-2.0))
    return comparison
