"""``hiddenpool compare --fit TRAIN``: learn layer mixes on a train split
(``evaluation.layer_mix``), rank them beside the fixed strategies, and save the winner as a
pipeline folder (``--save-fit``). Everything checkable is checked before the model loads."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

from hiddenpool.cli import checks
from hiddenpool.cli.checks import UsageError

DEFAULT_FIT = "mean@all:weighted"


@dataclasses.dataclass
class FitPlan:
    """What ``--fit`` will do: the train (and dev) pairs, the fixed strategies and the
    ``:weighted`` ones to fit, each as (strategy, pool, layers)."""

    train: Any
    dev: Any | None
    fixed: list[str]
    fits: list[tuple[str, str, str]]
    save_fit: str | None = None


def plan(options: Any, datasets: Sequence[tuple[str, Any]]) -> FitPlan:
    """The fit's arguments checked and its files read, before the model loads."""
    from hiddenpool.evaluation import layer_mix
    from hiddenpool.strategy import Strategy

    if options.sweep:
        raise UsageError("--fit: ranks the strategies given with --strategies; leave out --sweep")
    if options.layer_weights is not None:
        raise UsageError("--layer-weights: --fit learns the weights; leave it out")
    given = list(options.strategies or [])
    fixed = [s for s in given if s.strip() == "model" or Strategy.parse(s).combine != "weighted"]
    weighted = [s for s in given if s not in fixed] or [DEFAULT_FIT]
    fits = []
    for strategy in weighted:
        parsed = Strategy.parse(strategy)
        if len(parsed.pools) != 1:
            raise UsageError(
                f"strategy {strategy!r}: --fit learns one pool's mix; give one strategy per "
                "pool (mean@all:weighted cls@all:weighted)"
            )
        pool, layers = parsed.pools[0], strategy.split("@", 1)[1].rsplit(":", 1)[0]
        if pool not in layer_mix.LINEAR_POOLS:
            raise UsageError(
                f"strategy {strategy!r}: {pool} is not linear in the layers (the {pool} of a "
                f"mix is not the mix of each layer's {pool}), so it cannot be fit on pooled "
                f"rows; fit one of {', '.join(layer_mix.LINEAR_POOLS)}"
            )
        fits.append((str(parsed), pool, layers))
    retrieval = options.task == "retrieval"
    unit = "queries" if retrieval else "pairs"
    train = _read(options.fit, "--fit", options.skip_bad, retrieval)
    dev = (
        _read(options.fit_dev, "--fit-dev", options.skip_bad, retrieval)
        if options.fit_dev
        else None
    )
    needed = layer_mix.MIN_TRAIN_PAIRS + (0 if dev else layer_mix.MIN_DEV_PAIRS)
    if _count(train) < needed:
        raise UsageError(
            f"--fit {options.fit}: {_count(train)} {unit}; a fit needs at least {needed} "
            f"({layer_mix.MIN_TRAIN_PAIRS} to fit"
            + ("" if dev else f", {layer_mix.MIN_DEV_PAIRS} held out to stop early")
            + ")"
        )
    if dev is not None and _count(dev) < layer_mix.MIN_DEV_PAIRS:
        raise UsageError(
            f"--fit-dev {options.fit_dev}: {_count(dev)} {unit}; early stopping needs at "
            f"least {layer_mix.MIN_DEV_PAIRS}"
        )
    for path, data in datasets:
        shared = _shared(train, data)
        if shared:
            print(
                f"hiddenpool: warning: --data {path}: {shared} of its {_count(data)} {unit} "
                f"are in --fit {options.fit} too: the fitted rows are scored on {unit} they "
                "were fit to",
                file=sys.stderr,
            )
    if options.save_fit:
        _check_new_folder(options.save_fit)
    return FitPlan(train, dev, fixed, fits, options.save_fit)


def check_layers(plan: FitPlan, model: str) -> None:
    """Each fit's layers against the layer count the model's files give (before loading)."""
    from hiddenpool.evaluation import layer_mix

    if plan.save_fit and not os.path.isdir(model):
        raise UsageError(
            f"--save-fit: copies the model's folder, and --model {model} is not a folder"
        )
    count = checks.state_count_from_files(model) if os.path.isdir(model) else None
    if count is None:
        return
    for strategy, pool, layers in plan.fits:
        try:
            layer_mix.check_fit(pool, layers, count)
        except ValueError as error:
            raise UsageError(f"strategy {strategy!r}: {error}") from None


def run_fits(options: Any, plan: FitPlan, encoder: Any) -> list[Any]:
    """Fits each strategy of the plan and prints its weights; the fits."""
    from hiddenpool.evaluation import layer_mix, mix_retrieval

    fitter = (
        mix_retrieval.fit_retrieval_mix if options.task == "retrieval" else layer_mix.fit_layer_mix
    )
    score = "MRR@10" if options.task == "retrieval" else "Pearson"
    fits = []
    for strategy, pool, layers in plan.fits:
        try:
            fit = fitter(
                encoder,
                plan.train,
                pool,
                layers,
                dev=plan.dev,
                seed=options.seed,
                batch_size=options.batch_size,
                max_batch_tokens=options.max_batch_tokens,
            )
        except ValueError as error:
            raise UsageError(f"strategy {strategy!r}: {error}") from None
        dev = options.fit_dev or f"a held-out tenth of {options.fit}"
        unit = "queries" if options.task == "retrieval" else "pairs"
        print(
            f"fitted {fit.strategy} on {options.fit} ({fit.train_pairs} {unit}; stopped on "
            f"{dev}, {fit.dev_pairs} {unit}: best at step {fit.best_step}, dev {score} "
            f"{fit.dev_curve[fit.best_step] * 100:.2f}); forward pass "
            f"{fit.forward_seconds:.1f} s, fit "
            f"{fit.fit_seconds:.2f} s"
        )
        shares = "  ".join(
            f"{state}: {share:.3f}" for state, share in zip(fit.layers, fit.mix, strict=True)
        )
        print(f"  mix by hidden state ({fit.scale:g} x softmax of the weights): {shares}")
        fits.append(fit)
    return fits


def mixes(fits: Sequence[Any]) -> list[Any]:
    """The fitted rows ``compare`` ranks beside the fixed strategies."""
    from hiddenpool.evaluation.evaluate import Mix

    return [
        Mix(f"{fit.strategy} (fit)", fit.strategy, tuple(fit.weights), fit.scale) for fit in fits
    ]


def save(options: Any, encoder: Any, model: str, fits: Sequence[Any], comparisons: Any) -> None:
    """``--save-fit``: the fit that scored best on the (first) --data, as a pipeline folder."""
    from hiddenpool.evaluation import layer_mix

    scored = {
        r.strategy: r.metrics["mrr@10"] if hasattr(r, "metrics") else r.spearman
        for r in comparisons[0].results
        if r.fitted
    }
    best = max(fits, key=lambda fit: scored.get(f"{fit.strategy} (fit)", float("-inf")))
    width = int(encoder.encode([], best.strategy, layer_weights=best.weights).shape[1])
    folder = layer_mix.save_pipeline(best, model, options.save_fit, width, encoder.max_length)
    print(f"\nwrote {folder}: {best.strategy} with the fitted weights as the model's pipeline")
    onnx = os.path.isfile(os.path.join(folder, "model.onnx"))
    print(
        f"use it: hiddenpool encode --model {folder} ... (strategy 'model')"
        + ("" if onnx else f", or SentenceTransformer({folder!r}, trust_remote_code=True)")
    )


def _count(data: Any) -> int:
    """Pairs of a similarity file, queries of a retrieval one."""
    return len(data.queries) if hasattr(data, "queries") else len(data.scores)


def _shared(train: Any, data: Any) -> int:
    """Pairs (or queries) of ``data`` that are in ``train`` too."""
    from hiddenpool.evaluation import layer_mix

    if hasattr(train, "queries"):
        return len(set(train.queries) & set(data.queries))
    return layer_mix.shared_pairs(train, data)


def _read(path: str, flag: str, skip_bad: bool, retrieval: bool = False) -> Any:
    from hiddenpool.evaluation import evaluate
    from hiddenpool.evaluation import retrieval as retrieval_data

    if retrieval:
        return checks.read_data(flag, path, retrieval_data.read_queries)
    return checks.read_data(flag, path, lambda name: evaluate.read_pairs(name, skip_bad=skip_bad))


def _check_new_folder(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"--save-fit {path}: exists and is not an empty folder; choose a new one")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--save-fit {path}: the folder {parent} does not exist")
    checks.check_writable("--save-fit", path, parent)
