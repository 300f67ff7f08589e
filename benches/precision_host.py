"""bf16 against fp32 on a machine's CPU, for hosts that cannot hold the real model: a BERT
with all-MiniLM-L6-v2's configuration and tokenizer (random weights, seed 0; the speed of
the matmuls depends on the shapes, not the values), exported to ONNX, then timed on ONNX
Runtime fp32, OpenVINO fp32 and OpenVINO bf16 over sentences of STS-B-like lengths.

    python benches/precision_host.py CONFIG_FOLDER [--threads N] [--texts 3000]

CONFIG_FOLDER holds config.json and the tokenizer files of the model (what the GPU
machine's run carried; the weights are not needed).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config_folder")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    import torch
    import transformers

    import hiddenpool
    from hiddenpool import Encoder, export_onnx
    from hiddenpool.runners.openvino_runner import BF16_FEATURES, cpu_flags

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(arguments.config_folder)
    model = transformers.AutoModel.from_config(config).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(arguments.config_folder)
    folder = export_onnx(Encoder(model, tokenizer), os.path.join(tempfile.mkdtemp(), "onnx"))
    generator = random.Random(0)
    words = [
        "a",
        "man",
        "woman",
        "dog",
        "cat",
        "plays",
        "guitar",
        "runs",
        "field",
        "river",
        "city",
        "street",
        "car",
        "market",
    ]
    # STS-B sentences: 8-40 words, most around 10-15.
    texts = [
        " ".join(generator.choice(words) for _ in range(max(3, int(generator.gauss(12, 5)))))
        for _ in range(arguments.texts)
    ]
    hiddenpool.set_num_threads(arguments.threads)
    flags = cpu_flags()
    print(
        f"{len(texts)} texts, {arguments.threads} threads; CPU: "
        + ", ".join(sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512_vnni"))))
    )
    runs: list[tuple[str, Encoder]] = []
    try:
        runs.append(("ONNX Runtime fp32", Encoder.from_pretrained(folder)))
    except ImportError as error:
        print(f"ONNX Runtime row left out: {error}")
    runs.append(("OpenVINO fp32", Encoder.from_pretrained(folder, backend="openvino")))
    if any(feature in flags for feature in BF16_FEATURES):
        runs.append(("OpenVINO bf16", Encoder.from_pretrained(folder, precision="bf16")))
    rows: dict[str, np.ndarray] = {}
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _, encoder in runs:
        encoder.encode(texts[:64])
    for _ in range(arguments.repeat):
        for name, encoder in runs:
            started = time.perf_counter()
            rows[name] = encoder.encode(texts, "mean@last", normalize=True)
            times[name].append(time.perf_counter() - started)
    reference = rows["OpenVINO fp32"]
    base = statistics.median(times[runs[0][0]])
    print(f"| runtime | seconds | texts/s | x {runs[0][0]} | min cosine to OpenVINO fp32 |")
    print("|---|---|---|---|---|")
    for name, _ in runs:
        seconds = statistics.median(times[name])
        cosine = float((rows[name] * reference).sum(1).min())
        print(
            f"| {name} | {seconds:.2f} | {len(texts) / seconds:.0f} | {base / seconds:.2f} | "
            f"{cosine:.5f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
