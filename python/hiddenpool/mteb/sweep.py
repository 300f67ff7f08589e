"""``evaluate``: MTEB tasks for several strategies at the cost of one forward pass per
task, each strategy scored by MTEB's own ``mteb.evaluate`` into its own experiment folder
of MTEB's results cache; and the ranking (``Sweep``)."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any, cast

import mteb

from hiddenpool.mteb.intervals import StsInterval, sts_interval, sts_pairs
from hiddenpool.mteb.model import HiddenpoolModel
from hiddenpool.mteb.shared import SharedPass

# The interval's point Spearman (float64 cosines of the pass's rows) must equal MTEB's score
# this closely (it does to 1e-15 on STS-B dev), else the rows are not what MTEB scored and no
# interval is shown.
SPEARMAN_AGREEMENT = 1e-6
# Where the pooled rows of unfinished tasks wait, inside the output folder.
ROWS_FOLDER = "hiddenpool-rows"


@dataclasses.dataclass
class TaskScores:
    """One task's main score per strategy (None where a strategy's run failed)."""

    name: str
    type: str
    main_score: str
    scores: dict[str, float]
    texts_encoded: int = 0
    seconds: float = 0.0
    # STS tasks run here: each strategy's Spearman with its 95% bootstrap interval.
    intervals: dict[str, StsInterval] = dataclasses.field(default_factory=dict)
    reused: bool = False


@dataclasses.dataclass
class Sweep:
    """What ``evaluate`` ran: ``tasks`` (scores per strategy), ``errors`` (a task name to
    the one-line reason it did not run), ``results`` (MTEB's ``TaskResult`` per task and
    strategy), and the texts put through the model in all."""

    strategies: list[str]
    tasks: list[TaskScores]
    errors: dict[str, str]
    results: dict[str, dict[str, Any]]
    texts_encoded: int
    output_folder: str

    def by_type(self) -> dict[str, dict[str, float]]:
        """The mean main score of each strategy over each task type's tasks."""
        means: dict[str, dict[str, float]] = {}
        for kind in sorted({task.type for task in self.tasks}):
            tasks = [task for task in self.tasks if task.type == kind]
            means[kind] = {s: _mean([t.scores.get(s) for t in tasks]) for s in self.strategies}
        return means

    def overall(self) -> dict[str, float]:
        """Each strategy's mean main score over every task (MTEB's "mean (task)")."""
        return {s: _mean([t.scores.get(s) for t in self.tasks]) for s in self.strategies}

    def ranking(self) -> list[str]:
        overall = self.overall()
        return sorted(self.strategies, key=lambda s: -overall[s])


def _mean(values: Sequence[float | None]) -> float:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if len(present) == len(values) and present else float("nan")


def resolve_tasks(tasks: Sequence[Any]) -> list[Any]:
    """Task instances from instances or names (``mteb.get_tasks``); an unknown name is a
    ValueError listing close names."""
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [task for task in tasks if isinstance(task, str)]
    known = (
        {task.metadata.name for task in mteb.get_tasks(exclude_superseded=False)}
        if names
        else set()
    )
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=4, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(f"tasks: {name!r} is not an MTEB task{hint}")
    loaded = iter(mteb.get_tasks(tasks=names)) if names else iter(())
    by_name = {task.metadata.name: task for task in loaded}
    resolved = [by_name[task] if isinstance(task, str) else task for task in tasks]
    for task in resolved:
        if not hasattr(task, "metadata") or not hasattr(task, "evaluate"):
            raise TypeError(f"tasks: expected MTEB tasks or task names, got {type(task).__name__}")
    return resolved


def evaluate(
    model: HiddenpoolModel,
    tasks: Sequence[Any],
    strategies: Sequence[str] | None = None,
    *,
    output_folder: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    keep_rows: bool = False,
    show_progress: bool = False,
    on_task: Any = None,
    resamples: int = 1000,
    seed: int = 0,
) -> Sweep:
    """Scores ``model`` (from ``hiddenpool.mteb.model``) on ``tasks`` (MTEB task instances or
    names) for each of ``strategies`` (default: the model's own), putting each task's texts
    through the model once: the first strategy's MTEB run encodes them and pools every
    strategy, the others read the pooled rows. Each score is ``mteb.evaluate``'s, saved in
    MTEB's results layout under ``output_folder`` (default: MTEB's cache, ``~/.cache/mteb``
    or ``$MTEB_CACHE``), one experiment folder per strategy; results already there are
    reused unless ``overwrite``. A task whose data cannot be loaded is recorded in
    ``errors`` and the others still run. ``on_task`` is called with each ``TaskScores`` or
    (name, error) as it finishes. STS tasks run here get 95% bootstrap intervals of
    ``resamples`` resamples of their pairs (0: none), from the rows the pass holds.

    >>> import hiddenpool.mteb  # doctest: +SKIP
    >>> sweep = hiddenpool.mteb.evaluate(hiddenpool.mteb.model(), ["STSBenchmark"],
    ...                                  ["mean@last", "cls@last"])  # doctest: +SKIP
    >>> sweep.overall()  # doctest: +SKIP
    {'mean@last': 0.8203..., 'cls@last': 0.7349...}
    """
    if not isinstance(model, HiddenpoolModel):
        raise TypeError(f"model: expected hiddenpool.mteb.model(...), got {type(model).__name__}")
    strategies = _check_strategies(model, strategies)
    resolved = resolve_tasks(tasks)
    cache = mteb.ResultCache(os.fspath(output_folder)) if output_folder else mteb.ResultCache()
    folder = str(cache.cache_path)
    variants = {strategy: model.variant(strategy) for strategy in strategies}
    shared = SharedPass(
        model, strategies, os.path.join(folder, ROWS_FOLDER, _pass_name(model, strategies))
    )
    for variant in variants.values():
        variant.shared = shared
    sweep = Sweep(strategies, [], {}, {}, 0, folder)
    try:
        for task in resolved:
            _run_task(task, variants, shared, cache, sweep, overwrite, show_progress)
            if resamples > 0 and sweep.tasks and sweep.tasks[-1].name == task.metadata.name:
                _intervals(task, variants, shared, sweep.tasks[-1], resamples, seed)
            shared.close(remove=not keep_rows)
            if on_task is not None:
                name = task.metadata.name
                on_task(sweep.tasks[-1] if name not in sweep.errors else (name, sweep.errors[name]))
    finally:
        shared.close(remove=False)
    sweep.texts_encoded = shared.texts_encoded
    return sweep


def _check_strategies(model: HiddenpoolModel, strategies: Sequence[str] | None) -> list[str]:
    from hiddenpool.strategy import Strategy

    if strategies is None:
        return [model.strategy]
    if isinstance(strategies, str) or not strategies:
        raise ValueError("strategies: expected a non-empty list of strategy strings")
    for strategy in strategies:
        if not isinstance(strategy, str):
            raise TypeError(f"strategies: expected strategy strings, got {type(strategy).__name__}")
        if strategy != "model":
            Strategy.parse(strategy)
    if len(set(strategies)) != len(strategies):
        raise ValueError("strategies: a strategy is given twice")
    model.encoder.check(list(strategies), layer_weights=model.layer_weights)
    return list(strategies)


def _pass_name(model: HiddenpoolModel, strategies: Sequence[str]) -> str:
    """The rows folder of this model, options and strategy list (a different list or
    option never reads another's rows)."""
    meta = model.mteb_model_meta
    assert meta is not None
    identity = {
        "name": meta.name,
        "revision": meta.revision,
        "experiment": {k: v for k, v in (meta.experiment_kwargs or {}).items() if k != "strategy"},
        "strategies": list(strategies),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _missing(task: Any, variants: dict[str, HiddenpoolModel], cache: Any) -> bool:
    for variant in variants.values():
        path = cache.get_task_result_path(task.metadata.name, variant.mteb_model_meta)
        if not path.is_file():
            return True
    return False


def _load(task: Any) -> str | None:
    """None once the task's data is loaded, else the one-line reason it could not be."""
    if getattr(task, "data_loaded", False):
        return None
    try:
        task.load_data()
    except Exception as error:
        dataset = task.metadata.dataset.get("path", "?")
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return (
            f"its data set {dataset} could not be loaded ({type(error).__name__}: "
            f"{reason[:200]}); offline, run it once online so the datasets cache holds it"
        )
    return None


def _reseed(task: Any) -> None:
    """The task's random state as a fresh instance has it: clustering and classification
    draw their samples from it, so each strategy's run must start from the same state for
    its score to equal that strategy evaluated alone (MTEB 2.26's ``AbsTask.__init__``)."""
    from mteb._set_seed import _set_seed

    task.rng_state, task.np_rng = _set_seed(task.seed)


def _run_task(
    task: Any,
    variants: dict[str, HiddenpoolModel],
    shared: SharedPass,
    cache: Any,
    sweep: Sweep,
    overwrite: bool,
    show_progress: bool,
) -> None:
    name = task.metadata.name
    needed = overwrite or _missing(task, variants, cache)
    if needed:
        error = _load(task)
        if error is not None:
            sweep.errors[name] = error
            return
    before, started = shared.texts_encoded, time.perf_counter()
    if needed:  # a task read back whole from the results folder leaves its rows alone
        shared.open(name)
    scores: dict[str, float] = {}
    results: dict[str, Any] = {}
    for strategy, variant in variants.items():
        _reseed(task)
        outcome = mteb.evaluate(
            cast(Any, variant),
            task,
            cache=cache,
            overwrite_strategy="always" if overwrite else "only-missing",
            show_progress_bar=show_progress,
            raise_error=True,
        )
        result = outcome.task_results[0]
        results[strategy] = result
        scores[strategy] = float(result.get_score())
    sweep.results[name] = results
    sweep.tasks.append(
        TaskScores(
            name,
            str(task.metadata.type),
            str(task.metadata.main_score),
            scores,
            shared.texts_encoded - before,
            time.perf_counter() - started,
            reused=not needed,
        )
    )


def _intervals(
    task: Any,
    variants: dict[str, HiddenpoolModel],
    shared: SharedPass,
    scores: TaskScores,
    resamples: int,
    seed: int,
) -> None:
    """Bootstrap intervals of an STS task just run (its rows still in the pass). The point
    Spearman is recomputed from the rows and kept only where it equals MTEB's score."""
    pairs = sts_pairs(task) if not scores.reused else None
    if pairs is None:
        return
    first, second, gold = pairs
    for strategy, variant in variants.items():
        prompt = variant.prompt_for(task.metadata, None)
        interval = sts_interval(
            shared.rows(strategy, first, prompt),
            shared.rows(strategy, second, prompt),
            gold,
            resamples,
            seed,
        )
        if abs(interval.spearman - scores.scores[strategy]) <= SPEARMAN_AGREEMENT:
            scores.intervals[strategy] = interval
