"""``hiddenpool bench``: the kernels timed against torch and numpy (``hiddenpool.bench``), or
with ``--tiers`` each runtime and precision on this machine (``evaluation.tiers``)."""

from __future__ import annotations

import argparse
import os
import sys

from hiddenpool.cli import checks
from hiddenpool.cli.checks import Accumulate, UsageError


def add_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--shapes", nargs="+", action=Accumulate, default=["32x128x384", "32x256x768"], help="BxTxH"
    )
    bench.add_argument(
        "--dtypes",
        nargs="+",
        action=Accumulate,
        default=["float32", "float16", "bfloat16"],
        help="float32, float16, bfloat16, float64",
    )
    bench.add_argument(
        "--operations",
        nargs="+",
        action=Accumulate,
        default=None,
        help="default: every operation of the table",
    )
    bench.add_argument(
        "--tiers",
        action="store_true",
        help="instead of the kernel table: each runtime and precision this install and CPU "
        "can run, on packaged sentences (sentences/s, worst cosine against fp32, which to "
        "pick); a transformers model is exported into the cache once (minutes), then reused",
    )
    bench.add_argument(
        "--model",
        help="with --tiers: a transformers folder or an ONNX folder (default: all-MiniLM-L6-v2)",
    )
    bench.add_argument(
        "--seconds", type=float, default=2.0, help="with --tiers: timed seconds per tier"
    )
    bench.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="worker threads")
    bench.add_argument("--repeat", type=int, default=15, help="timed calls per row")


def run(arguments: argparse.Namespace) -> int:
    if arguments.tiers:
        return run_tiers(arguments)
    if arguments.model is not None:
        raise UsageError("--model: applies to --tiers (the kernel table uses random arrays)")
    try:
        from hiddenpool import bench
    except ImportError as error:
        raise UsageError(str(error)) from None

    bench.print_table(
        list(arguments.shapes),
        list(arguments.dtypes),
        arguments.operations,
        int(arguments.threads),
        int(arguments.repeat),
    )
    return 0


def run_tiers(arguments: argparse.Namespace) -> int:
    """``bench --tiers``: the tiers measured, a line on stderr as each finishes, then the
    table and the picks on stdout."""
    if not arguments.seconds > 0:
        raise UsageError(f"--seconds: must be positive, got {arguments.seconds}")
    model = arguments.model
    if model is not None:
        checks.check_model("--model", model)
    else:
        model = checks.default_model_path()
    import contextlib

    from hiddenpool import _native
    from hiddenpool.evaluation import tiers

    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    _native.set_num_threads(int(arguments.threads))
    texts = tiers.sample_texts()
    print(tiers.describe(arguments.model, int(arguments.threads), len(texts)), flush=True)

    def said(result: tiers.TierResult) -> None:
        if result.sentences_per_second is not None:
            print(
                f"  {result.tier.name}: {result.sentences_per_second:,.0f} sentences/s "
                f"(loaded in {result.load_seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    results = tiers.measure(model, texts=texts, seconds=float(arguments.seconds), on_tier=said)
    print()
    print(tiers.table(results))
    print()
    for line in tiers.pick_lines(results):
        print(line)
    return 0
