"""The layer mix fit for retrieval (``compare --fit TRAIN --task retrieval``): the same
ScalarMix over frozen per-layer pooled rows as ``layer_mix``, fit to an in-batch
contrastive objective. Each step takes a batch of (query, positive) pairs; every other
positive of the batch is a negative of a query, and the loss is the cross-entropy of
picking its own positive from the batch by cosine / temperature (InfoNCE). Cosines come
from per-pair Gram matrices (``[B, B, L, L]`` a batch), so a step costs B^2 x L^2, and the
gradient is exact. Early stopping on the dev queries' MRR@10 against the dev corpus; the
batches are drawn with ``seed``, so a fit repeats bit for bit."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hiddenpool.evaluation.layer_mix import (
    MIN_DEV_PAIRS,
    MIN_TRAIN_PAIRS,
    LayerMixFit,
    adam_step,
    check_fit,
    pooled_layers,
    softmax,
)
from hiddenpool.evaluation.retrieval import Queries, cosine_matrix, per_query_metrics

TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss uses scale 20


def split_queries(data: Queries, fraction: float, seed: int) -> tuple[Queries, Queries]:
    """A held-out ``fraction`` of the queries (at least ``MIN_DEV_PAIRS``), drawn with
    ``seed``, each with its own corpus of the positives of its queries: (train, dev)."""
    count = len(data.queries)
    held = max(MIN_DEV_PAIRS, round(count * fraction))
    order = np.random.default_rng(seed).permutation(count)
    return _part(data, np.sort(order[held:]), "train"), _part(data, np.sort(order[:held]), "dev")


def _part(data: Queries, rows: np.ndarray, name: str) -> Queries:
    queries = [data.queries[i] for i in rows]
    texts = list(dict.fromkeys(data.corpus[j] for i in rows for j in sorted(data.relevant[i])))
    position = {text: index for index, text in enumerate(texts)}
    relevant = [{position[data.corpus[j]] for j in data.relevant[i]} for i in rows]
    return Queries(queries, texts, relevant, source=f"{data.source} ({name})")


def fit_retrieval_mix(
    encoder: Any,
    data: Queries,
    pool: str = "mean",
    layers: str = "all",
    *,
    dev: Queries | None = None,
    dev_fraction: float = 0.1,
    seed: int = 0,
    steps: int = 300,
    learning_rate: float = 0.05,
    patience: int = 60,
    batch: int = 64,
    batch_size: int | None = None,
    max_batch_tokens: int | None = 1024,
) -> LayerMixFit:
    """Fits ScalarMix weights over ``layers`` for ``pool`` so that each query of ``data``
    picks its positive from a batch by cosine (in-batch negatives), stopping early on the
    dev queries' MRR@10 (``dev``, else a held-out ``dev_fraction`` drawn with ``seed``).
    ``dev_curve`` holds the dev MRR@10 after each step; ``train_spearman`` and
    ``dev_spearman`` hold MRR@10 (the retrieval score) for the fitted weights."""
    strategy, chosen = check_fit(pool, layers, encoder.runner.state_count())
    if dev is None:
        if len(data.queries) < MIN_TRAIN_PAIRS + MIN_DEV_PAIRS:
            raise ValueError(
                f"data: {len(data.queries)} queries; a fit needs at least "
                f"{MIN_TRAIN_PAIRS + MIN_DEV_PAIRS} ({MIN_TRAIN_PAIRS} to fit, "
                f"{MIN_DEV_PAIRS} held out to stop early) or a dev split"
            )
        data, dev = split_queries(data, dev_fraction, seed)
    if len(data.queries) < MIN_TRAIN_PAIRS:
        raise ValueError(f"data: {len(data.queries)} queries; a fit needs {MIN_TRAIN_PAIRS}")
    if len(dev.queries) < MIN_DEV_PAIRS:
        raise ValueError(f"dev: {len(dev.queries)} queries; early stopping needs {MIN_DEV_PAIRS}")
    texts = list(dict.fromkeys(data.queries + data.corpus + dev.queries + dev.corpus))
    position = {text: index for index, text in enumerate(texts)}
    rows, forward_seconds = pooled_layers(
        encoder, texts, pool, chosen, batch_size, max_batch_tokens
    )
    started = time.perf_counter()
    pairs = np.array(
        [
            (position[query], position[data.corpus[j]])
            for query, positives in zip(data.queries, data.relevant, strict=True)
            for j in sorted(positives)
        ]
    )

    def mrr(split: Queries, weights: np.ndarray) -> float:
        mixed = np.tensordot(softmax(weights), rows, axes=1)
        queries = mixed[[position[text] for text in split.queries]]
        corpus = mixed[[position[text] for text in split.corpus]]
        similarities = cosine_matrix(queries, corpus)
        return float(per_query_metrics(similarities, split.relevant)["mrr@10"].mean())

    generator = np.random.default_rng(seed)
    weights = np.zeros(len(chosen))
    moments = (np.zeros(len(chosen)), np.zeros(len(chosen)))
    best, best_weights, best_step = mrr(dev, weights), weights.copy(), 0
    curve = [best]
    order = generator.permutation(len(pairs))
    cursor = 0
    for step in range(1, steps + 1):
        if cursor + batch > len(order):
            order, cursor = generator.permutation(len(pairs)), 0
        chosen_pairs = pairs[order[cursor : cursor + batch]]
        cursor += batch
        gradient = _contrastive_gradient(rows, chosen_pairs, softmax(weights))
        weights, moments = adam_step(weights, gradient, moments, step, learning_rate)
        score = mrr(dev, weights)
        curve.append(score)
        if score > best:
            best, best_weights, best_step = score, weights.copy(), step
        elif step - best_step >= patience:
            break
    return LayerMixFit(
        pool=pool,
        layers=chosen,
        weights=[float(w) for w in best_weights],
        scale=1.0,
        strategy=str(strategy),
        train_pairs=len(data.queries),
        dev_pairs=len(dev.queries),
        best_step=best_step,
        dev_curve=curve,
        train_spearman=mrr(data, best_weights),
        dev_spearman=best,
        forward_seconds=forward_seconds,
        fit_seconds=time.perf_counter() - started,
        score="mrr@10",
    )


def _contrastive_gradient(rows: np.ndarray, pairs: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """The gradient in ``shares`` of minus the in-batch contrastive loss of ``pairs``
    (query row, positive row): ascent makes each query's own positive likelier."""
    q, p = rows[:, pairs[:, 0]], rows[:, pairs[:, 1]]  # [L, B, H]
    qq = np.einsum("lih,mih->ilm", q, q)
    pp = np.einsum("ljh,mjh->jlm", p, p)
    qp = np.einsum("lih,mjh->ijlm", q, p)
    qq_s, pp_s = qq @ shares, pp @ shares  # [B, L]
    norm_q = np.sqrt(np.maximum(qq_s @ shares, 1e-30))
    norm_p = np.sqrt(np.maximum(pp_s @ shares, 1e-30))
    qp_s = qp @ shares  # [B, B, L]: d(q_i . p_j)/ds via the query side
    pq_s = np.einsum("ijlm,l->ijm", qp, shares)  # ... via the positive side
    norms = np.outer(norm_q, norm_p)
    cosine = (qp_s @ shares) / norms
    logits = cosine / TEMPERATURE
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    count = len(pairs)
    # d(-loss)/d cosine: (identity - softmax) / (batch x temperature)
    weight = (np.eye(count) - probabilities) / (count * TEMPERATURE)
    through_dot = np.einsum("ij,ijl->l", weight / norms, qp_s + pq_s)
    through_q = ((weight * cosine).sum(axis=1) / norm_q**2) @ qq_s
    through_p = ((weight * cosine).sum(axis=0) / norm_p**2) @ pp_s
    result: np.ndarray = through_dot - through_q - through_p
    return result
