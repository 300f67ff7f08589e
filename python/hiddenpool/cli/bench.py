"""``hiddenpool bench``: the kernels timed against torch and numpy (``hiddenpool.bench``)."""

from __future__ import annotations

import argparse
import os

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
    bench.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="worker threads")
    bench.add_argument("--repeat", type=int, default=15, help="timed calls per row")


def run(arguments: argparse.Namespace) -> int:
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
