"""MTEB for many strategies: the shared pass (``hiddenpool.mteb.evaluate``) against the ways
a user would otherwise get the same scores, on the four local MTEB tasks built from the STS
Benchmark files (``hiddenpool.mteb.stsb_tasks``; no network), all-MiniLM-L6-v2 on torch,
one process, each run into a fresh results folder (nothing reused):

  shared-8      the eight strategies of the issue through one pass per task
  shared-1      one strategy (mean@last) through it
  alone-8       eight ``mteb.evaluate`` runs of ``hiddenpool.mteb.model``, one per strategy
  shared-5      the five strategies sentence-transformers' Pooling also offers
  st-5          five ``mteb.evaluate`` runs of SentenceTransformer models whose Pooling is
                set to mean, cls, max, lasttoken and weightedmean (MTEB wraps them itself)

It prints each run's wall time, the texts put through the model, the ratios the issue sets
targets for, and the scores of the strategies the two kinds of run share (equal to 1e-4).

    python benches/mteb_sweep.py [STSB_FOLDER] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

EIGHT = [
    "mean@last",
    "cls@last",
    "max@last",
    "mean@-2",
    "mean@first_last:mean",
    "mean@last4:sum",
    "mean@last4:concat",
    "model",
]
# sentence-transformers' Pooling mode and the hiddenpool strategy that computes the same.
ST_MODES = {
    "mean": "mean@last",
    "cls": "cls@last",
    "max": "max@last",
    "lasttoken": "last@last",
    "weightedmean": "weighted_mean@last",
}


def timed(function: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "stsb")
    parser.add_argument("stsb", nargs="?", default=default)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()

    import mteb
    import torch
    from sentence_transformers import SentenceTransformer, models

    import hiddenpool
    import hiddenpool.mteb as hm

    torch.set_num_threads(arguments.threads)
    hiddenpool.set_num_threads(arguments.threads)
    path = hm.model().encoder.runner.model.name_or_path
    model = hm.model(strategy="mean@last")
    counting = {"texts": 0, "seconds": 0.0}
    runner, run = model.encoder.runner, model.encoder.runner.run

    def counted(batch: Any, *rest: Any, **keywords: Any) -> Any:
        if int(batch.mask.sum(axis=1).max()) > 2:  # the empty probe that finds a width
            counting["texts"] += len(batch.rows)
        started = time.perf_counter()
        try:
            return run(batch, *rest, **keywords)
        finally:
            counting["seconds"] += time.perf_counter() - started

    runner.run = counted
    tasks = lambda: hm.stsb_tasks(arguments.stsb)  # noqa: E731 (fresh, unloaded tasks each run)
    rows: list[tuple[str, float, int, float]] = []
    scores: dict[str, dict[str, dict[str, float]]] = {}

    def shared(name: str, strategies: list[str]) -> None:
        counting["texts"], counting["seconds"] = 0, 0.0
        with tempfile.TemporaryDirectory() as folder:
            seconds, sweep = timed(
                lambda: hm.evaluate(model, tasks(), strategies, output_folder=folder)
            )
        rows.append((name, seconds, counting["texts"], counting["seconds"]))
        scores[name] = {s: {t.name: t.scores[s] for t in sweep.tasks} for s in strategies}
        print(f"{name}: {seconds:.1f} s", flush=True)

    shared("shared-8", EIGHT)
    shared("shared-1", ["mean@last"])
    counting["texts"], counting["seconds"] = 0, 0.0
    alone: dict[str, dict[str, float]] = {}

    def alone_runs() -> None:
        for strategy in EIGHT:
            result = mteb.evaluate(
                hm.model(strategy=strategy, encoder=model.encoder),
                tasks(),
                cache=None,
                show_progress_bar=False,
            )
            alone[strategy] = {r.task_name: r.get_score() for r in result.task_results}

    seconds, _ = timed(alone_runs)
    rows.append(("alone-8", seconds, counting["texts"], counting["seconds"]))
    print(f"alone-8: {seconds:.1f} s", flush=True)
    shared("shared-5", list(ST_MODES.values()))
    st_scores: dict[str, dict[str, float]] = {}

    def st_runs() -> None:
        for mode, strategy in ST_MODES.items():
            transformer = models.Transformer(path)
            pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=mode)
            st = SentenceTransformer(modules=[transformer, pooling], device="cpu")
            result = mteb.evaluate(st, tasks(), cache=None, show_progress_bar=False)
            st_scores[strategy] = {r.task_name: r.get_score() for r in result.task_results}

    seconds, _ = timed(st_runs)
    rows.append(("st-5", seconds, -1, float("nan")))
    print(f"st-5: {seconds:.1f} s\n", flush=True)
    report(rows, scores, alone, st_scores)


def report(
    rows: list[tuple[str, float, int, float]],
    scores: dict[str, dict[str, dict[str, float]]],
    alone: dict[str, dict[str, float]],
    st_scores: dict[str, dict[str, float]],
) -> None:
    times = {name: seconds for name, seconds, _, _ in rows}
    print(
        f"{'run':<10}  {'seconds':>8}  {'texts through the model':>24}  {'forward s':>9}"
        f"  {'rest s (MTEB scoring, data)':>27}"
    )
    for name, seconds, texts, forward in rows:
        shown = texts if texts >= 0 else "n/a"
        rest = seconds - forward
        print(f"{name:<10}  {seconds:>8.1f}  {shown:>24}  {forward:>9.1f}  {rest:>27.1f}")
    print()
    print(f"shared-8 / shared-1: {times['shared-8'] / times['shared-1']:.2f}x (target <= 1.3x)")
    print(f"alone-8 / shared-8:  {times['alone-8'] / times['shared-8']:.2f}x faster")
    print(f"st-5 / shared-5:     {times['st-5'] / times['shared-5']:.2f}x faster (target >= 5x)")
    print(f"st-5 / shared-8:     {times['st-5'] / times['shared-8']:.2f}x faster")
    worst = max(abs(scores["shared-8"][s][t] - alone[s][t]) for s in alone for t in alone[s])
    print(f"\nlargest |shared-8 - alone-8| score difference: {worst:.1e}")
    print("\nshared-5 against sentence-transformers' Pooling (main score x 100)")
    tasks = list(next(iter(st_scores.values())))
    print(f"{'strategy':<20}" + "".join(f"  {t[-22:]:>22}" for t in tasks))
    for strategy, by_task in st_scores.items():
        ours = scores["shared-5"][strategy]
        cells = "".join(f"  {ours[t] * 100:>10.2f} / {by_task[t] * 100:>9.2f}" for t in tasks)
        print(f"{strategy:<20}{cells}")
    gap = max(abs(scores["shared-5"][s][t] - v) for s, d in st_scores.items() for t, v in d.items())
    print(f"largest |hiddenpool - sentence-transformers| score difference: {gap:.1e}")


if __name__ == "__main__":
    main()
