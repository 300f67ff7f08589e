"""``hiddenpool compare --mteb TASK ...``: every strategy scored by MTEB itself on MTEB
tasks, each task's texts through the model once (``hiddenpool.mteb.evaluate``); the
ranking per task type and overall, results in MTEB's own folder layout."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from hiddenpool.cli import checks
from hiddenpool.cli.checks import Accumulate, UsageError

DEFAULT_OUTPUT = "mteb-results"


def add_arguments(compare: argparse.ArgumentParser) -> None:
    compare.add_argument(
        "--mteb",
        nargs="+",
        action=Accumulate,
        metavar="TASK",
        help="score the strategies on these MTEB tasks (names as mteb.get_tasks takes them) "
        "with MTEB's own evaluators, each task's texts through the model once",
    )
    compare.add_argument(
        "--mteb-benchmark",
        metavar="NAME",
        help="the tasks of this MTEB benchmark (as mteb.get_benchmark takes it)",
    )
    compare.add_argument(
        "--mteb-local",
        metavar="FOLDER",
        help="MTEB tasks built from the STS Benchmark files in FOLDER (sts-dev.csv, "
        "sts-train.csv): STS, genre classification and clustering, retrieval; no network",
    )
    compare.add_argument(
        "--output-folder",
        metavar="FOLDER",
        help=f"with --mteb: MTEB's results folder (default: ./{DEFAULT_OUTPUT}); results "
        "already there are reused",
    )


def wanted(options: Any) -> bool:
    return bool(options.mteb or options.mteb_benchmark or options.mteb_local)


def _check(options: Any) -> None:
    """Flags that do not go with --mteb, before mteb is even imported."""
    from hiddenpool.evaluation import report

    clashes = [
        ("--data", options.data),
        ("--task retrieval", options.task == "retrieval"),
        ("--fit", options.fit),
        ("--skip-bad", options.skip_bad),
    ]
    for flag, value in clashes:
        if value:
            raise UsageError(f"{flag}: not with --mteb (MTEB's tasks bring their own data)")
    if options.output_folder is not None and not wanted(options):
        raise UsageError("--output-folder: applies to --mteb")
    if options.strategies:
        checks.check_strategies(options.strategies)
    if options.sweep and options.strategies:
        raise UsageError("--sweep: chooses the strategies itself; leave out --strategies")
    checks.check_layer_weights(options)
    if options.json:
        checks.check_output("--json", options.json, (".json",))
    if options.plot:
        checks.check_output("--plot", options.plot, report.plot_formats())
    folder = options.output_folder or DEFAULT_OUTPUT
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--output-folder {folder}: exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise UsageError(f"--output-folder {folder}: the folder {parent} does not exist")
    checks.check_writable("--output-folder", folder, folder if os.path.isdir(folder) else parent)


def _tasks(options: Any) -> list[Any]:
    try:
        import hiddenpool.mteb as hm
    except ImportError as error:
        raise UsageError(
            f"--mteb needs the mteb package ({error.name} is missing): pip install "
            '"hiddenpool[mteb]" (or ".[mteb]" in a hiddenpool checkout)'
        ) from None
    tasks: list[Any] = []
    if options.mteb:
        try:
            tasks += hm.resolve_tasks(options.mteb)
        except ValueError as error:
            raise UsageError(f"--mteb {str(error).removeprefix('tasks: ')}") from None
    if options.mteb_benchmark:
        tasks += _benchmark(options.mteb_benchmark)
    if options.mteb_local:
        try:
            tasks += hm.stsb_tasks(options.mteb_local)
        except FileNotFoundError as error:
            raise UsageError(f"--mteb-local {str(error).removeprefix('folder: ')}") from None
    names = [task.metadata.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--mteb: {', '.join(repeated)} given twice")
    return tasks


def _benchmark(name: str) -> list[Any]:
    import difflib

    import mteb

    try:
        benchmark = mteb.get_benchmark(name)
    except (KeyError, ValueError):
        names = [b.name for b in mteb.get_benchmarks()]
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise UsageError(f"--mteb-benchmark {name!r}: not an MTEB benchmark{hint}") from None
    return list(benchmark.tasks)


def run(options: Any) -> int:
    from hiddenpool.evaluation import evaluate as similarity

    _check(options)
    tasks = _tasks(options)  # says how to install the mteb extra where it is missing
    import datasets

    import hiddenpool.mteb as hm

    datasets.disable_progress_bars()  # the data sets' per-step bars; the command prints its own
    model = checks.preflight(options, options.strategies or ())
    encoder, model_name = checks.load_encoder(options, model)
    if options.sweep:
        strategies = similarity.sweep_strategies(encoder.runner.state_count(), encoder.family)
    else:
        strategies = list(options.strategies or ["model", *similarity.DEFAULT_STRATEGIES])
    checks.check_against_model(encoder, options, strategies)
    wrapped = hm.model(
        options.model,
        strategies[0],
        encoder=encoder,
        batch_size=options.batch_size,
        max_batch_tokens=options.max_batch_tokens,
        layer_weights=options.layer_weights,
        layer_scale=options.layer_scale,
    )
    folder = options.output_folder or DEFAULT_OUTPUT
    print(f"model: {model_name}")
    quantized = f" ({encoder.quantization} quantization)" if encoder.quantization else ""
    print(f"runtime: {encoder.runtime}, precision {encoder.precision}{quantized}")
    if "model" in strategies:
        print(f"strategy 'model' = {encoder.describe_model_strategy()} (the model's own pipeline)")
    print(
        f"{len(tasks)} MTEB tasks x {len(strategies)} strategies; results in {folder}\n", flush=True
    )
    sweep = hm.evaluate(
        wrapped,
        tasks,
        strategies,
        output_folder=folder,
        on_task=_progress,
        resamples=options.bootstrap,
        seed=options.seed,
    )
    print()
    print(ranking_tables(sweep))
    if options.json:
        checks.write_json(options.json, as_json(sweep, model_name, encoder))
    if options.plot:
        plot(sweep, model_name, options.plot)
        print(f"wrote {options.plot}")
    return 1 if sweep.errors else 0


def _progress(event: Any) -> None:
    if isinstance(event, tuple):
        name, error = event
        print(f"hiddenpool: error: --mteb {name}: {error}", file=sys.stderr, flush=True)
        return
    how = (
        "results reused from the output folder"
        if event.reused
        else f"{event.texts_encoded} texts through the model once, {event.seconds:.1f} s"
    )
    print(f"{event.name} ({event.type}, {event.main_score}): {how}", flush=True)


def _cell(value: float | None, width: int = 9) -> str:
    if value is None or math.isnan(value):
        return f"{'n/a':>{width}}"
    return f"{value * 100:>{width}.2f}"


def ranking_tables(sweep: Any) -> str:
    """A table per task type (main score x 100 per task, their mean) and the overall
    ranking (mean per type, mean over tasks), strategies ranked by the last."""
    ranked = sweep.ranking()
    width = max(len("strategy"), *(len(s) for s in ranked))
    lines: list[str] = []
    for kind, means in sweep.by_type().items():
        tasks = [task for task in sweep.tasks if task.type == kind]
        column = min(28, max(16, *(len(task.name) for task in tasks)))
        heads = [task.name[:column] for task in tasks]
        lines.append(
            f"{kind}: main score x 100 ({', '.join(sorted({t.main_score for t in tasks}))})"
        )
        lines.append(
            f"{'strategy':<{width}}" + "".join(f"  {h:>{column}}" for h in heads) + f"  {'mean':>9}"
        )
        for strategy in sorted(ranked, key=lambda s: -_key(means[s])):
            cells = ""
            for task in tasks:
                interval = task.intervals.get(strategy)
                text = _cell(task.scores.get(strategy), 7).strip()
                if interval is not None:
                    text += f" [{interval.low * 100:.1f}-{interval.high * 100:.1f}]"
                cells += f"  {text:>{column}}"
            lines.append(f"{strategy:<{width}}{cells}  {_cell(means[strategy])}")
        lines.append("")
    if any(task.intervals for task in sweep.tasks):
        lines.append("[low-high]: 95% bootstrap interval of the STS pairs\n")
    overall = sweep.overall()
    kinds = list(sweep.by_type())
    lines.append(
        f"overall: mean main score x 100 per task type and over all {len(sweep.tasks)} tasks"
    )
    lines.append(
        f"{'rank':>4}  {'strategy':<{width}}"
        + "".join(f"  {k[:14]:>14}" for k in kinds)
        + f"  {'mean (task)':>11}"
    )
    by_type = sweep.by_type()
    for position, strategy in enumerate(ranked, start=1):
        lines.append(
            f"{position:>4}  {strategy:<{width}}"
            + "".join(f"  {_cell(by_type[k][strategy], 14)}" for k in kinds)
            + f"  {_cell(overall[strategy], 11)}"
        )
    if sweep.errors:
        lines.append(f"\nnot run ({len(sweep.errors)}): {', '.join(sweep.errors)}")
    return "\n".join(lines)


def _key(value: float) -> float:
    return value if value == value else -math.inf


def _number(value: float | None) -> float | None:
    return None if value is None or value != value else value


def as_json(sweep: Any, model_name: str, encoder: Any) -> dict[str, Any]:
    return {
        "model": model_name,
        "runtime": encoder.runtime,
        "precision": encoder.precision,
        "quantization": encoder.quantization,
        "output_folder": sweep.output_folder,
        "strategies": sweep.strategies,
        "ranking": sweep.ranking(),
        "overall": {s: _number(v) for s, v in sweep.overall().items()},
        "by_type": {
            kind: {s: _number(v) for s, v in means.items()}
            for kind, means in sweep.by_type().items()
        },
        "tasks": [
            {
                "name": task.name,
                "type": task.type,
                "main_score": task.main_score,
                "scores": {s: _number(v) for s, v in task.scores.items()},
                "intervals": {
                    s: {"low": i.low, "high": i.high, "pairs": i.pairs}
                    for s, i in task.intervals.items()
                },
                "texts_encoded": task.texts_encoded,
                "seconds": task.seconds,
                "reused": task.reused,
            }
            for task in sweep.tasks
        ],
        "texts_encoded": sweep.texts_encoded,
        "errors": sweep.errors,
    }


def plot(sweep: Any, model_name: str, path: str) -> None:
    """Bars of each strategy's mean main score over the tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hiddenpool.evaluation import report

    overall = sweep.overall()
    ranked = list(reversed(sweep.ranking()))
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(ranked) + 1.5))
    values = [overall[s] * 100 if overall[s] == overall[s] else 0.0 for s in ranked]
    axes.barh(ranked, values, color="#3b75af")
    for index, value in enumerate(values):
        axes.text(value, index, f" {value:.2f}", va="center")
    names = ", ".join(task.name for task in sweep.tasks)
    axes.set_title(
        f"{model_name}\nMTEB mean main score over {len(sweep.tasks)} tasks: {names}"[:200],
        fontsize=9,
    )
    axes.set_xlabel("mean main score x 100")
    axes.set_xlim(0, 100)
    figure.tight_layout()
    report.save_figure(figure, path)
