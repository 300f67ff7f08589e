"""Prints the kernel comparison table (the code is hiddenpool.bench, also behind
`hiddenpool bench`) and optionally writes it as markdown.

    python benches/run.py                      # the default shapes, dtypes and operations
    python benches/run.py --shapes 32x256x768 --dtypes float32 --threads 2 --markdown out.md
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hiddenpool import bench

DEFAULT_SHAPES = ["32x128x384", "32x256x768", "64x512x1024"]
DEFAULT_DTYPES = ["float32", "float16", "bfloat16"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxTxH")
    parser.add_argument("--dtypes", nargs="+", default=DEFAULT_DTYPES)
    parser.add_argument("--operations", nargs="+", default=bench.OPERATIONS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--markdown", help="also write the header and table to this file")
    arguments = parser.parse_args(argv)
    lines = bench.print_table(
        arguments.shapes,
        arguments.dtypes,
        arguments.operations,
        arguments.threads,
        arguments.repeat,
    )
    if arguments.markdown:
        with open(arguments.markdown, "w", encoding="utf-8") as handle:
            handle.write(bench.header(arguments.threads, arguments.repeat) + "\n\n")
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
