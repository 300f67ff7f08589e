"""Prints the kernel comparison table: shape, dtype, operation, ours, each peer, ratio,
GB/s of real-token bytes.

    python benches/run.py                      # the default shapes, dtypes and operations
    python benches/run.py --shapes 32x256x768 --dtypes float32 --threads 2 --markdown out.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers  # noqa: E402

import hiddenpool  # noqa: E402

DEFAULT_SHAPES = ["32x128x384", "32x256x768", "64x512x1024"]
DEFAULT_DTYPES = ["float32", "float16", "bfloat16"]


def median_seconds(function: Callable[[], object], repeat: int, budget: float = 2.0) -> float:
    function()  # warm up
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeat and (len(times) < 3 or time.perf_counter() - started < budget):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.2f} ms"


def run(
    shapes: Sequence[str],
    dtypes: Sequence[str],
    operations: Sequence[str],
    threads: int,
    repeat: int,
) -> list[str]:
    torch.set_num_threads(threads)
    hiddenpool.set_num_threads(threads)
    lines = [
        "| shape | dtype | operation | ours | peer | peer time | ours vs peer | GB/s | floor | ours / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        batch, tokens, hidden = (int(part) for part in shape.split("x"))
        for dtype in dtypes:
            inputs = peers.make_inputs(batch, tokens, hidden, getattr(torch, dtype))
            for operation in operations:
                ours = median_seconds(peers.ours(inputs, operation), repeat)
                floor = median_seconds(peers.floor(inputs, operation), repeat)
                gigabytes_per_second = peers.bytes_read(inputs, operation) / ours / 1e9
                for name, function in peers.peers(inputs, operation).items():
                    peer = median_seconds(function, repeat)
                    lines.append(
                        f"| {shape} | {dtype} | {operation} | {format_time(ours)} | {name} | "
                        f"{format_time(peer)} | {peer / ours:.1f}x faster | "
                        f"{gigabytes_per_second:.1f} | {format_time(floor)} | {ours / floor:.2f} |"
                    )
                    print(lines[-1], flush=True)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxTxH")
    parser.add_argument("--dtypes", nargs="+", default=DEFAULT_DTYPES)
    parser.add_argument("--operations", nargs="+", default=peers.OPERATIONS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--markdown", help="also write the table to this file")
    arguments = parser.parse_args(argv)
    header = (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"threads: {arguments.threads}; torch {torch.__version__}; median of up to "
        f"{arguments.repeat} runs; 'ours vs peer' = peer time / our time; floor = torch.sum "
        "over the same number of bytes"
    )
    print(header)
    lines = run(arguments.shapes, arguments.dtypes, arguments.operations, arguments.threads, arguments.repeat)
    if arguments.markdown:
        with open(arguments.markdown, "w", encoding="utf-8") as handle:
            handle.write(header + "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
