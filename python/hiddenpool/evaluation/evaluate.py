"""Sentence-similarity evaluation of pooling strategies: read scored sentence pairs,
encode every distinct sentence once for all strategies, score pairs by cosine similarity,
and rank strategies by Spearman correlation with the gold scores."""

from __future__ import annotations

import csv
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import numpy as np

# Re-exported: the data readers of this module and retrieval raise and use them.
from hiddenpool.io.json_lines import DataError as DataError
from hiddenpool.io.json_lines import read_json_lines as read_json_lines
from hiddenpool.runners.tokens import DEFAULT_MAX_BATCH_TOKENS

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
    ci_low: float = float("nan")  # 95% bootstrap interval of spearman, over pairs
    ci_high: float = float("nan")
    p_vs_best: float = float("nan")  # paired bootstrap p-value against the best strategy
    tied_with_best: bool = False  # p_vs_best >= 0.05 (the best itself included)
    # A fitted mix's row: its Spearman less the best fixed strategy's (``reference``), with
    # the 95% interval of that difference on the same bootstrap resamples.
    fitted: bool = False
    reference: str = ""
    gain: float = float("nan")
    gain_low: float = float("nan")
    gain_high: float = float("nan")


@dataclass(frozen=True)
class Mix:
    """A row of its own in ``compare``: ``strategy`` (``...:weighted``) pooled with these
    ``weights`` and ``scale`` (a mix fitted by ``layer_mix.fit_layer_mix``), shown as
    ``name``."""

    name: str
    strategy: str
    weights: tuple[float, ...]
    scale: float = 1.0


# A strategy is called tied with the best when the paired test cannot tell them apart at
# this level.
TIE_LEVEL = 0.05


@dataclass
class Comparison:
    model: str
    pairs: int
    sentences: int
    encode_seconds: float
    results: list[StrategyResult] = field(default_factory=list)
    skipped: int = 0
    data: str = ""
    max_length: int | None = None
    resamples: int = 0
    seed: int | None = None
    notes: list[str] = field(default_factory=list)  # why figures may mean little

    def as_json(self) -> dict[str, Any]:
        """The comparison as JSON-ready values; NaN (a constant side) becomes None."""
        from hiddenpool._version import __version__

        return {
            "model": self.model,
            "data": self.data,
            "pairs": self.pairs,
            "sentences": self.sentences,
            "skipped": self.skipped,
            "encode_seconds": self.encode_seconds,
            "max_length": self.max_length,
            "bootstrap_resamples": self.resamples,
            "seed": self.seed,
            "hiddenpool_version": __version__,
            "notes": list(self.notes),
            "results": [
                {
                    "strategy": result.strategy,
                    "dim": result.dim,
                    "spearman": _finite(result.spearman),
                    "pearson": _finite(result.pearson),
                    "ci_low": _finite(result.ci_low),
                    "ci_high": _finite(result.ci_high),
                    "p_vs_best": _finite(result.p_vs_best),
                    "tied_with_best": result.tied_with_best,
                    "seconds": result.seconds,
                    **(
                        {
                            "fitted": True,
                            "reference": result.reference,
                            "gain": _finite(result.gain),
                            "gain_low": _finite(result.gain_low),
                            "gain_high": _finite(result.gain_high),
                        }
                        if result.fitted
                        else {}
                    ),
                }
                for result in self.results
            ],
        }


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def add_intervals(
    results: Sequence[StrategyResult],
    similarities: dict[str, np.ndarray],
    scores: np.ndarray,
    resamples: int,
    seed: int | None,
) -> None:
    """Fills each result's 95% bootstrap interval of Spearman over pairs and its paired
    p-value against the best-scoring strategy, all on the same resamples."""
    from hiddenpool.evaluation import bootstrap

    if resamples == 0 or not results:
        return
    indices = bootstrap.resample_indices(len(scores), resamples, seed)

    def scorer(values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lambda chosen: bootstrap.spearman_rows(values[chosen], scores[chosen])

    samples = {
        result.strategy: bootstrap.bootstrap_scores(scorer(similarities[result.strategy]), indices)
        for result in results
    }
    best = max(results, key=lambda result: np.nan_to_num(result.spearman, nan=-2.0))
    for result in results:
        interval = bootstrap.percentile_interval(samples[result.strategy])
        result.ci_low, result.ci_high = interval.low, interval.high
        result.p_vs_best = bootstrap.paired_p_value(
            samples[best.strategy], samples[result.strategy]
        )
        result.tied_with_best = bool(result.p_vs_best >= TIE_LEVEL)
    for result in results:
        if result.fitted and result.reference:
            # The gain over the best fixed strategy, on the very same resamples.
            difference = samples[result.strategy] - samples[result.reference]
            gained = bootstrap.percentile_interval(difference)
            result.gain_low, result.gain_high = gained.low, gained.high


def _set_gains(results: Sequence[StrategyResult]) -> None:
    """Each fitted row's Spearman less the best fixed strategy's (its ``reference``)."""
    fixed = [result for result in results if not result.fitted]
    if not fixed:
        return
    reference = max(fixed, key=lambda result: np.nan_to_num(result.spearman, nan=-2.0))
    for result in results:
        if result.fitted:
            result.reference = reference.strategy
            result.gain = result.spearman - reference.spearman


def data_notes(scores: np.ndarray) -> list[str]:
    """Why figures on these gold scores may mean little (few pairs, constant scores)."""
    notes = []
    if len(scores) < 10:
        notes.append(f"only {len(scores)} pairs: correlations on so few pairs mean little")
    if len(scores) and np.all(scores == scores[0]):
        notes.append("every gold score is the same: correlations are undefined (null)")
    return notes


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
    resamples: int = 1000,
    seed: int | None = 0,
    mixes: Sequence[Mix] = (),
) -> Comparison:
    """Scores each strategy on ``pairs``: every distinct sentence is encoded once, in one
    forward pass per batch for all strategies; ``seconds`` is each strategy's own pooling
    and scoring time. Results are ranked by Spearman, best first. ``batch_size`` and
    ``max_batch_tokens``, ``missing_eos``, ``layer_weights`` and ``layer_scale`` are
    ``Encoder.encode``'s. ``resamples`` bootstrap resamples of the pairs (``seed`` makes
    them reproducible; 0 skips) give each result a 95% interval and a paired p-value
    against the best strategy. ``mixes`` are rows of their own, each ``:weighted``
    strategy pooled with its own weights (the first in the shared pass where no other
    strategy takes ``layer_weights``, the others in a pass each); each gets the difference
    from the best fixed strategy with its interval, on the same resamples."""
    if not pairs.scores.size:
        raise DataError(f"{pairs.source}: no sentence pairs to score")
    sentences = list(dict.fromkeys(pairs.first + pairs.second))
    position = {sentence: index for index, sentence in enumerate(sentences)}
    first_index = np.array([position[s] for s in pairs.first])
    second_index = np.array([position[s] for s in pairs.second])
    timings: dict[str, float] = {}
    started = time.perf_counter()
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "max_batch_tokens": max_batch_tokens,
        "missing_eos": missing_eos,
        "progress": progress,
        "layer_weights": layer_weights,
        "layer_scale": layer_scale,
    }
    embeddings = _embeddings(encoder, sentences, strategies, mixes, options, timings)
    encode_seconds = time.perf_counter() - started
    comparison = Comparison(
        model_name,
        len(pairs.scores),
        len(sentences),
        encode_seconds,
        skipped=pairs.skipped,
        data=pairs.source,
        max_length=getattr(encoder, "max_length", None),
        resamples=resamples,
        seed=seed,
        notes=data_notes(pairs.scores),
    )
    all_similarities: dict[str, np.ndarray] = {}
    fitted = {mix.name for mix in mixes}
    for strategy in [*strategies, *(mix.name for mix in mixes)]:
        scoring_started = time.perf_counter()
        vectors = embeddings[strategy]
        similarities = cosine_similarities(vectors[first_index], vectors[second_index])
        all_similarities[strategy] = similarities
        result = StrategyResult(
            strategy=strategy,
            dim=int(vectors.shape[1]),
            spearman=spearman(similarities, pairs.scores),
            pearson=pearson(similarities, pairs.scores),
            seconds=timings.get(strategy, 0.0) + time.perf_counter() - scoring_started,
            fitted=strategy in fitted,
        )
        comparison.results.append(result)
    comparison.results.sort(key=lambda result: -np.nan_to_num(result.spearman, nan=-2.0))
    _set_gains(comparison.results)
    add_intervals(comparison.results, all_similarities, pairs.scores, resamples, seed)
    for note in comparison.notes:
        warnings.warn(f"{pairs.source}: {note}", stacklevel=2)
    return comparison


def _embeddings(
    encoder: Any,
    sentences: list[str],
    strategies: Sequence[str],
    mixes: Sequence[Mix],
    options: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, np.ndarray]:
    """Every strategy's and every mix's rows: the first mix in the pass of the fixed
    strategies where none of them takes ``layer_weights``, the others in a pass each."""
    first = mixes[0] if mixes else None
    alone = first is None or options["layer_weights"] is not None or first.strategy in strategies
    riding = None if alone else first
    shared = dict(options)
    if riding is not None:
        shared["layer_weights"], shared["layer_scale"] = list(riding.weights), riding.scale
    keys = list(strategies) + ([riding.strategy] if riding is not None else [])
    embeddings: dict[str, np.ndarray] = encoder.encode(sentences, keys, timings=timings, **shared)
    for mix in mixes:
        if mix is riding:
            embeddings[mix.name] = embeddings.pop(mix.strategy)
            timings[mix.name] = timings.pop(mix.strategy, 0.0)
            continue
        started = time.perf_counter()
        mixed = {**options, "layer_weights": list(mix.weights), "layer_scale": mix.scale}
        embeddings[mix.name] = encoder.encode(sentences, mix.strategy, **mixed)
        timings[mix.name] = time.perf_counter() - started
    return embeddings


def sweep_strategies(state_count: int, family: str) -> list[str]:
    """Every single hidden state (0 = embedding output .. L) with mean, max and cls, and
    eos for CLIP: the strategies of ``compare --sweep``, pooled from one forward pass.

    >>> sweep_strategies(3, "encoder")[:4]
    ['mean@0', 'max@0', 'cls@0', 'mean@1']
    """
    pools = ["mean", "max", "cls"] + (["eos"] if family == "clip" else [])
    return [f"{pool}@{state}" for state in range(state_count) for pool in pools]


def average(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    """Strategies ranked by their mean Spearman over several comparisons (one per data
    file), each with its per-file figures (None where undefined)."""
    strategies = [result.strategy for result in comparisons[0].results]
    rows: list[dict[str, Any]] = []
    for strategy in strategies:
        values = [
            next(r.spearman for r in comparison.results if r.strategy == strategy)
            for comparison in comparisons
        ]
        finite = [value for value in values if np.isfinite(value)]
        mean = float(np.mean(finite)) if len(finite) == len(values) else float("nan")
        rows.append(
            {
                "strategy": strategy,
                "mean_spearman": _finite(mean),
                "spearman": [_finite(value) for value in values],
            }
        )
    means = [row["mean_spearman"] for row in rows]
    order = sorted(range(len(rows)), key=lambda i: -(means[i] if means[i] is not None else -2.0))
    return [rows[i] for i in order]
