"""``hiddenpool compare``: rank pooling strategies on sentence-similarity pairs (Spearman
with bootstrap intervals) or on retrieval data (MRR@10, recall, nDCG), print the table,
and optionally write JSON and a chart (``hiddenpool.evaluation.report``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from hiddenpool.cli import checks, compare_fit, compare_mteb
from hiddenpool.cli.checks import Accumulate, ModelOptions, UsageError


@dataclasses.dataclass(frozen=True)
class CompareOptions(ModelOptions):
    data: list[str] | None = None
    task: str = "similarity"
    sweep: bool = False
    json: str | None = None
    plot: str | None = None
    skip_bad: bool = False
    bootstrap: int = 1000
    seed: int = 0
    fit: str | None = None
    fit_dev: str | None = None
    save_fit: str | None = None
    mteb: list[str] | None = None
    mteb_benchmark: str | None = None
    mteb_local: str | None = None
    output_folder: str | None = None


def add_arguments(compare: argparse.ArgumentParser) -> None:
    compare.add_argument(
        "--data",
        nargs="+",
        action=Accumulate,
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
    compare.add_argument(
        "--fit",
        metavar="TRAIN",
        help="learn ScalarMix layer weights for each ':weighted' strategy (default "
        "mean@all:weighted) on these train pairs (as --data reads them), one forward pass, "
        "early stopping on a held-out tenth; the fitted rows join the ranking",
    )
    compare.add_argument(
        "--fit-dev", metavar="DEV", help="with --fit: the pairs to stop early on instead"
    )
    compare.add_argument(
        "--save-fit",
        metavar="FOLDER",
        help="with --fit: write the best fitted mix as a pipeline folder (the model with a "
        "HiddenPooling holding the weights) that Encoder, encode, serve, export and "
        "SentenceTransformer(trust_remote_code=True) load",
    )
    compare_mteb.add_arguments(compare)


def run(arguments: argparse.Namespace) -> int:
    return compare(CompareOptions.from_arguments(arguments))


def compare(options: CompareOptions) -> int:
    from hiddenpool.evaluation import evaluate, report

    if compare_mteb.wanted(options) or options.output_folder is not None:
        if options.plot:
            _require_matplotlib()
        return compare_mteb.run(options)
    _check(options)
    if options.task == "retrieval":
        return compare_retrieval(options)
    paths = options.data or [evaluate.default_data_path()]
    datasets = [(path, _read_pairs(path, options.skip_bad)) for path in paths]
    plan = compare_fit.plan(options, datasets) if options.fit else None
    given = plan.fixed if plan is not None else options.strategies
    model = checks.preflight(options, given or ())
    if plan is not None:
        compare_fit.check_layers(plan, model)
    encoder, model_name = checks.load_encoder(options, model)
    if options.sweep:
        strategies = evaluate.sweep_strategies(encoder.runner.state_count(), encoder.family)
    else:
        strategies = list(given or ["model", *evaluate.DEFAULT_STRATEGIES])
        if not given and encoder.family == "clip":
            strategies.append("eos@last")
    checks.check_against_model(encoder, options, strategies)
    _print_header(encoder, options.model, strategies)
    fits = compare_fit.run_fits(options, plan, encoder) if plan is not None else []
    comparisons = []
    for path, pairs in datasets:
        if len(datasets) > 1:
            print()
        print(
            f"data: {path}: {len(pairs.scores)} pairs"
            + (f", {pairs.skipped} bad rows skipped" if pairs.skipped else ""),
            flush=True,
        )
        comparison = _run_comparison(
            options, encoder, model_name, pairs, strategies, compare_fit.mixes(fits)
        )
        comparisons.append(comparison)
        rows = len(comparison.results)
        count = f"all {rows} strategies" if rows > 1 else "the 1 strategy"
        if len(fits) > 1:
            count += f" (the fitted mixes after the first in a pass each: {len(fits) - 1})"
        print(
            f"{comparison.sentences} distinct sentences encoded once for {count} in "
            f"{comparison.encode_seconds:.2f} s; seconds = each strategy's pooling and "
            "scoring time"
        )
        print()
        print(
            report.sweep_grid(comparison.results)
            if options.sweep
            else report.similarity_table(comparison)
        )
    average = evaluate.average(comparisons) if len(comparisons) > 1 else None
    if average is not None:
        print(f"\nranked by the mean Spearman over the {len(comparisons)} data files:\n")
        print(report.average_table(average, [path for path, _ in datasets]))
    _write_outputs(options, encoder, model_name, comparisons, average, fits)
    if options.save_fit:
        compare_fit.save(options, encoder, model, fits, comparisons)
    return 0


def _check(options: CompareOptions) -> None:
    """Everything checkable before the data is read or the model loads."""
    from hiddenpool.evaluation import report

    if options.strategies:
        checks.check_strategies(options.strategies)
    if options.sweep and options.strategies:
        raise UsageError("--sweep: chooses the strategies itself; leave out --strategies")
    for flag, value in (("--fit-dev", options.fit_dev), ("--save-fit", options.save_fit)):
        if value is not None and not options.fit:
            raise UsageError(f"{flag}: applies to --fit")
    if not options.fit:  # --fit learns the weights its ':weighted' strategies need
        checks.check_layer_weights(options)
    if options.json:
        checks.check_output("--json", options.json, (".json",))
    if options.plot:
        _require_matplotlib()
        checks.check_output("--plot", options.plot, report.plot_formats())


def _print_header(encoder: Any, model: str | None, strategies: list[str]) -> None:
    # The model as given: the runtime and precision have the line below.
    print(f"model: {model or checks.DEFAULT_MODEL_NAME}")
    quantized = f" ({encoder.quantization} quantization)" if encoder.quantization else ""
    print(f"runtime: {encoder.runtime}, precision {encoder.precision}{quantized}")
    if "model" in strategies:
        print(f"strategy 'model' = {encoder.describe_model_strategy()} (the model's own pipeline)")


def _write_outputs(
    options: CompareOptions,
    encoder: Any,
    model_name: str,
    comparisons: list[Any],
    average: list[dict[str, Any]] | None,
    fits: Sequence[Any] = (),
) -> None:
    from hiddenpool.evaluation import report

    if options.json:
        document: dict[str, Any] = (
            comparisons[0].as_json()
            if average is None
            else {
                "model": model_name,
                "datasets": [comparison.as_json() for comparison in comparisons],
                "average": average,
            }
        )
        # The runtime and precision the ranking was made under, to rank as deployed.
        document["runtime"] = encoder.runtime
        document["precision"] = encoder.precision
        document["quantization"] = encoder.quantization
        if fits:
            document["fits"] = [fit.as_json() for fit in fits]
        checks.write_json(options.json, document)
    if options.plot:
        if options.sweep:
            report.plot_sweep(comparisons, options.plot)
        else:
            report.plot_ranking(comparisons, average, options.plot)
        print(f"wrote {options.plot}")


def compare_retrieval(options: CompareOptions) -> int:
    from hiddenpool.evaluation import evaluate, report, retrieval

    if not options.data or len(options.data) != 1:
        raise UsageError("--data: --task retrieval takes one file of query, positive rows")
    refused = [
        flag for flag, value in (("--sweep", options.sweep), ("--plot", options.plot)) if value
    ]
    if refused:
        raise UsageError(
            f"{' and '.join(refused)}: not available with --task retrieval (similarity only)"
        )
    path = options.data[0]
    data = checks.read_data("--data", path, retrieval.read_queries)
    plan = compare_fit.plan(options, [(path, data)]) if options.fit else None
    given = plan.fixed if plan is not None else options.strategies
    model = checks.preflight(options, given or ())
    if plan is not None:
        compare_fit.check_layers(plan, model)
    encoder, model_name = checks.load_encoder(options, model)
    strategies = list(given or ["model", *evaluate.DEFAULT_STRATEGIES])
    checks.check_against_model(encoder, options, strategies)
    _print_header(encoder, options.model, strategies)
    fits = compare_fit.run_fits(options, plan, encoder) if plan is not None else []
    print(f"data: {path}: {len(data.queries)} queries, corpus of {len(data.corpus)}", flush=True)
    comparison = retrieval.compare_retrieval(
        encoder,
        data,
        strategies,
        model_name=model_name,
        resamples=options.bootstrap,
        seed=options.seed,
        batch_size=options.batch_size,
        max_batch_tokens=options.max_batch_tokens,
        missing_eos=options.missing_eos,
        layer_weights=options.layer_weights,
        layer_scale=options.layer_scale,
        mixes=compare_fit.mixes(fits),
    )
    print(f"encoded once for all strategies in {comparison.encode_seconds:.2f} s\n")
    print(report.retrieval_table(comparison))
    if options.json:
        document = comparison.as_json()
        document["runtime"] = encoder.runtime
        document["precision"] = encoder.precision
        document["quantization"] = encoder.quantization
        if fits:
            document["fits"] = [fit.as_json() for fit in fits]
        checks.write_json(options.json, document)
    if options.save_fit:
        compare_fit.save(options, encoder, model, fits, [comparison])
    return 0


def _run_comparison(
    options: CompareOptions,
    encoder: Any,
    model_name: str,
    pairs: Any,
    strategies: list[str],
    mixes: Sequence[Any] = (),
) -> Any:
    from hiddenpool.evaluation import evaluate

    with warnings.catch_warnings():
        # The data notes are printed below as hiddenpool warnings.
        warnings.simplefilter("ignore", UserWarning)
        comparison = evaluate.compare(
            encoder,
            pairs,
            strategies,
            batch_size=options.batch_size,
            max_batch_tokens=options.max_batch_tokens,
            missing_eos=options.missing_eos,
            layer_weights=options.layer_weights,
            layer_scale=options.layer_scale,
            model_name=model_name,
            resamples=options.bootstrap,
            seed=options.seed,
            mixes=mixes,
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


def _read_pairs(data: str, skip_bad: bool) -> Any:
    from hiddenpool.evaluation import evaluate

    return checks.read_data(
        "--data", data, lambda path: evaluate.read_pairs(path, skip_bad=skip_bad)
    )


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib: pip install matplotlib "
            '(or pip install ".[plot]" in a hiddenpool checkout)'
        ) from None
