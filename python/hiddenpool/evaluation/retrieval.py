"""Retrieval evaluation of pooling strategies: queries against a corpus made of every
distinct positive and negative text, ranked by cosine similarity with exact search in
numpy (a [queries, corpus] similarity block at a time; fine up to some 10^5 corpus texts,
past which an approximate index would be the tool), scored by MRR@10, recall@1,
recall@10 and nDCG@10, with bootstrap intervals over queries."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hiddenpool.evaluation import bootstrap
from hiddenpool.evaluation.evaluate import TIE_LEVEL, _finite
from hiddenpool.io.json_lines import DataError, read_json_lines

METRICS = ("mrr@10", "recall@1", "recall@10", "ndcg@10")


@dataclass
class Queries:
    """Queries, the corpus, and each query's relevant corpus indices."""

    queries: list[str]
    corpus: list[str]
    relevant: list[set[int]]
    source: str = ""


def read_queries(path: str | os.PathLike[str]) -> Queries:
    """Rows of ``query``, ``positive`` and optional ``negative`` from CSV/TSV (with a header)
    or JSON lines. A query on several rows gets every positive given for it; the corpus is
    every distinct positive and negative."""
    path = os.fspath(path)
    rows: list[dict[str, Any]] = []
    if path.lower().endswith((".jsonl", ".ndjson")):
        for number, record in read_json_lines(path):
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            rows.append({"line": number, **record})
    else:
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            for row in reader:
                rows.append({"line": reader.line_num, **row})
    queries: dict[str, set[str]] = {}
    corpus: dict[str, None] = {}
    for row in rows:
        query, positive = row.get("query"), row.get("positive")
        if not isinstance(query, str) or not isinstance(positive, str):
            raise DataError(f"{path}:{row['line']}: needs 'query' and 'positive' text fields")
        queries.setdefault(query, set()).add(positive)
        corpus.setdefault(positive)
        negative = row.get("negative")
        if isinstance(negative, str) and negative:
            corpus.setdefault(negative)
    if not queries:
        raise DataError(f"{path}: no queries")
    position = {text: index for index, text in enumerate(corpus)}
    return Queries(
        list(queries),
        list(corpus),
        [{position[text] for text in positives} for positives in queries.values()],
        source=path,
    )


def per_query_metrics(
    similarities: np.ndarray, relevant: Sequence[set[int]]
) -> dict[str, np.ndarray]:
    """Each query's MRR@10, recall@1, recall@10 and nDCG@10 (binary relevance) from a
    ``[queries, corpus]`` similarity matrix; ties broken by corpus order.

    >>> scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    >>> per_query_metrics(scores, [{2}, {2}])["mrr@10"]
    array([0.5, 1. ])
    """
    count, size = similarities.shape
    depth = min(10, size)
    # Stable order of -similarity: the higher first, ties by corpus index.
    top = np.argsort(-similarities, axis=1, kind="stable")[:, :depth]
    hits = np.zeros((count, depth), dtype=bool)
    for query, chosen in enumerate(relevant):
        hits[query] = np.isin(top[query], list(chosen))
    relevant_counts = np.array([len(chosen) for chosen in relevant], dtype=np.float64)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)
    reciprocal = np.where(first_hit > 0, 1.0 / np.maximum(first_hit, 1), 0.0)
    discounts = 1.0 / np.log2(np.arange(2, depth + 2))
    ideal = np.array([discounts[: min(int(n), depth)].sum() for n in relevant_counts])
    return {
        "mrr@10": reciprocal,
        "recall@1": hits[:, :1].sum(axis=1) / relevant_counts,
        "recall@10": hits.sum(axis=1) / relevant_counts,
        "ndcg@10": (hits * discounts).sum(axis=1) / ideal,
    }


def cosine_matrix(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """``[Q, C]`` cosine similarities in float64 (zero vectors give 0)."""
    q = np.asarray(queries, dtype=np.float64)
    c = np.asarray(corpus, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-300)
    result: np.ndarray = q @ c.T
    return result


@dataclass
class RetrievalResult:
    strategy: str
    dim: int
    metrics: dict[str, float]
    ci_low: float = float("nan")  # of mrr@10, over queries
    ci_high: float = float("nan")
    p_vs_best: float = float("nan")
    tied_with_best: bool = False
    # A fitted mix's row: its MRR@10 less the best fixed strategy's, with the 95% interval
    # of that difference on the same resamples of the queries.
    fitted: bool = False
    reference: str = ""
    gain: float = float("nan")
    gain_low: float = float("nan")
    gain_high: float = float("nan")


@dataclass
class RetrievalComparison:
    model: str
    data: str
    queries: int
    corpus: int
    encode_seconds: float
    resamples: int
    seed: int | None
    results: list[RetrievalResult] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        from hiddenpool._version import __version__

        return {
            "task": "retrieval",
            "model": self.model,
            "data": self.data,
            "queries": self.queries,
            "corpus": self.corpus,
            "encode_seconds": self.encode_seconds,
            "bootstrap_resamples": self.resamples,
            "seed": self.seed,
            "hiddenpool_version": __version__,
            "results": [
                {
                    "strategy": result.strategy,
                    "dim": result.dim,
                    **{name: _finite(value) for name, value in result.metrics.items()},
                    "ci_low": _finite(result.ci_low),
                    "ci_high": _finite(result.ci_high),
                    "p_vs_best": _finite(result.p_vs_best),
                    "tied_with_best": result.tied_with_best,
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


def compare_retrieval(
    encoder: Any,
    data: Queries,
    strategies: Sequence[str],
    *,
    model_name: str = "",
    resamples: int = 1000,
    seed: int | None = 0,
    mixes: Sequence[Any] = (),
    **encode_options: Any,
) -> RetrievalComparison:
    """Ranks strategies by MRR@10 of ``data``'s queries against its corpus; queries and
    corpus are encoded once for all strategies. Intervals and the paired test against the
    best are over queries, on MRR@10. ``mixes`` (``evaluate.Mix``, fitted layer mixes) are
    rows of their own, each with its gain over the best fixed strategy and that gain's
    interval on the same resamples."""
    from hiddenpool.evaluation.evaluate import _embeddings

    texts = list(dict.fromkeys(data.queries + data.corpus))
    position = {text: index for index, text in enumerate(texts)}
    started = time.perf_counter()
    options = {"progress": None, "layer_weights": None, "layer_scale": 1.0, **encode_options}
    embeddings = _embeddings(encoder, texts, strategies, mixes, options, {})
    seconds = time.perf_counter() - started
    comparison = RetrievalComparison(
        model_name, data.source, len(data.queries), len(data.corpus), seconds, resamples, seed
    )
    query_rows = [position[text] for text in data.queries]
    corpus_rows = [position[text] for text in data.corpus]
    per_query: dict[str, np.ndarray] = {}
    fitted = {mix.name for mix in mixes}
    for strategy in [*strategies, *fitted]:
        vectors = embeddings[strategy]
        similarities = cosine_matrix(vectors[query_rows], vectors[corpus_rows])
        metrics = per_query_metrics(similarities, data.relevant)
        per_query[strategy] = metrics["mrr@10"]
        comparison.results.append(
            RetrievalResult(
                strategy,
                int(vectors.shape[1]),
                {name: float(values.mean()) for name, values in metrics.items()},
                fitted=strategy in fitted,
            )
        )
    comparison.results.sort(key=lambda result: -result.metrics["mrr@10"])
    fixed = [result for result in comparison.results if not result.fitted]
    for result in comparison.results:
        if result.fitted and fixed:
            result.reference = fixed[0].strategy
            result.gain = result.metrics["mrr@10"] - fixed[0].metrics["mrr@10"]
    if resamples:
        indices = bootstrap.resample_indices(len(data.queries), resamples, seed)
        samples = {name: values[indices].mean(axis=1) for name, values in per_query.items()}
        best = comparison.results[0].strategy
        for result in comparison.results:
            interval = bootstrap.percentile_interval(samples[result.strategy])
            result.ci_low, result.ci_high = interval.low, interval.high
            result.p_vs_best = bootstrap.paired_p_value(samples[best], samples[result.strategy])
            result.tied_with_best = bool(result.p_vs_best >= TIE_LEVEL)
            if result.reference:
                difference = samples[result.strategy] - samples[result.reference]
                gained = bootstrap.percentile_interval(difference)
                result.gain_low, result.gain_high = gained.low, gained.high
    return comparison
