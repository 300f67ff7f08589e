"""Two builds of hiddenpool against each other in one session, alternating, three runs
each: the kernel table (``hiddenpool bench --shapes 32x256x768 --dtypes float32 float16
--threads 2``; medians of the runs) and end to end (STS-B dev's sentences, three
strategies, an ONNX fp32 folder, 2 threads, best of 3 within a run; medians). Each build is
a folder holding an unpacked wheel (``maturin build --release --out W`` in a checkout of
each commit, then ``python -m zipfile -e W/*.whl FOLDER``). Build both the same way: the
f16 kernels of a plain ``cargo build --lib`` ran 2.5x slower here than maturin's wheel of
the same code.

    python benches/ab_builds.py BEFORE_FOLDER AFTER_FOLDER ONNX_FOLDER [STSB_DEV]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

KERNEL = ["bench", "--shapes", "32x256x768", "--dtypes", "float32", "float16", "--threads", "2"]
END_TO_END = r"""
import csv, sys, time, hiddenpool
from hiddenpool import Encoder
hiddenpool.set_num_threads(2)
rows = csv.reader(open(sys.argv[1]), delimiter="\t", quoting=csv.QUOTE_NONE)
pairs = [row for row in rows if len(row) > 6]
texts = list(dict.fromkeys([row[5] for row in pairs] + [row[6] for row in pairs]))
encoder = Encoder.from_pretrained(sys.argv[2])
encoder.encode(texts[:64], "mean@last")
best = float("inf")
for _ in range(3):
    started = time.perf_counter()
    encoder.encode(texts, ["mean@last", "cls@last", "mean@last4:sum"])
    best = min(best, time.perf_counter() - started)
print(len(texts) / best)
"""


def seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"µs": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def main() -> None:
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    trees = {"before": sys.argv[1], "after": sys.argv[2]}
    onnx = os.path.abspath(sys.argv[3])
    dev = os.path.abspath(sys.argv[4] if len(sys.argv) == 5 else "../shared/data/stsb/sts-dev.csv")
    base = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    kernel: dict[str, dict[tuple[str, str], list[float]]] = {name: {} for name in trees}
    e2e: dict[str, list[float]] = {name: [] for name in trees}
    for round_ in range(3):
        for name, path in trees.items():
            env = dict(base, PYTHONPATH=os.path.abspath(path))
            table = subprocess.run(
                [sys.executable, "-m", "hiddenpool", *KERNEL, "--repeat", "15"],
                capture_output=True, text=True, env=env, cwd="/tmp", check=True,
            ).stdout  # fmt: skip
            for line in table.splitlines():
                cells = [cell.strip() for cell in line.strip("|").split("|")]
                if len(cells) == 10 and cells[0] == "32x256x768":
                    kernel[name].setdefault((cells[1], cells[2]), []).append(seconds(cells[3]))
            speed = float(
                subprocess.run(
                    [sys.executable, "-c", END_TO_END, dev, onnx],
                    capture_output=True, text=True, env=env, cwd="/tmp", check=True,
                ).stdout.split()[-1]
            )  # fmt: skip
            e2e[name].append(speed)
            print(f"round {round_ + 1} {name}: end to end {speed:.0f} sentences/s", flush=True)
    print("\n| dtype | operation | before (median of 3) | after | after / before |")
    print("|---|---|---|---|---|")
    ratios = []
    for key, runs in kernel["before"].items():
        before, after = statistics.median(runs), statistics.median(kernel["after"][key])
        ratios.append(after / before)
        print(f"| {key[0]} | {key[1]} | {before * 1e6:.0f} µs | {after * 1e6:.0f} µs | "
              f"{after / before:.2f} |")  # fmt: skip
    print(
        f"\nkernel rows: after/before geometric mean {statistics.geometric_mean(ratios):.3f}, "
        f"range {min(ratios):.2f}-{max(ratios):.2f}"
    )
    before, after = statistics.median(e2e["before"]), statistics.median(e2e["after"])
    print(
        f"end to end: before {before:.0f}, after {after:.0f} sentences/s (medians), "
        f"after/before {after / before:.3f}; runs before {[round(x) for x in e2e['before']]}, "
        f"after {[round(x) for x in e2e['after']]}"
    )


if __name__ == "__main__":
    main()
