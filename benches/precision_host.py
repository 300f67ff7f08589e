"""Every precision tier on a machine's CPU, for hosts that cannot hold the real model: a
BERT with all-MiniLM-L6-v2's configuration and tokenizer (random weights, seed 0; the
speed of the matmuls depends on the shapes, not the values), exported to ONNX (float32,
dynamic int8 and, where nncf is installed, static int8), then timed over sentences of
STS-B-like lengths: SentenceTransformer.encode on the same weights, ONNX Runtime fp32,
OpenVINO fp32, OpenVINO bf16 (where the CPU has AVX512_BF16 or AMX), ONNX Runtime on the
dynamic int8 graph and OpenVINO on the static int8 graph.

    python benches/precision_host.py CONFIG_FOLDER [--threads 2,16] [--texts 3000]

CONFIG_FOLDER holds config.json and the tokenizer files of the model (what the GPU
machine's run carried; the weights are not needed). With random weights the int8 rows'
vectors are not comparable to fp32's (calibration ranges of noise), so their cosine column
says nothing about the real model's quality: BENCHMARKS.md gives that, measured on STS-B.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

WORDS = [
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config_folder")
    parser.add_argument(
        "--threads", default=str(os.cpu_count() or 1), help="comma-separated thread counts"
    )
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--output",
        help="a new folder to write the exported folders into (float32, int8, int8-static); "
        "default: a temporary one",
    )
    arguments = parser.parse_args()
    try:
        thread_counts = [int(count) for count in arguments.threads.split(",")]
    except ValueError:
        parser.error(f"--threads: expected thread counts like 2,16, got {arguments.threads!r}")
    if not os.path.isfile(os.path.join(arguments.config_folder, "config.json")):
        parser.error(f"config_folder: no config.json in {arguments.config_folder!r}")
    import torch
    import transformers

    import hiddenpool
    from hiddenpool import Encoder, export_onnx
    from hiddenpool.runners.openvino_runner import cpu_flags

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(arguments.config_folder)
    model = transformers.AutoModel.from_config(config).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(arguments.config_folder)
    scratch = arguments.output or tempfile.mkdtemp()
    os.makedirs(scratch, exist_ok=True)
    weights_folder = os.path.join(scratch, "weights")
    model.save_pretrained(weights_folder)
    tokenizer.save_pretrained(weights_folder)
    source = Encoder(model, tokenizer)
    folders: dict[str, str] = {}
    for name, quantize in (("float32", None), ("int8", "int8"), ("int8-static", "int8-static")):
        started = time.perf_counter()
        try:
            folders[name] = export_onnx(source, os.path.join(scratch, name), quantize=quantize)
            print(f"export {name}: {time.perf_counter() - started:.1f} s")
        except Exception as error:  # a row left out says why, the others still run
            print(f"export {name} left out: {type(error).__name__}: {error}".splitlines()[0])
    generator = random.Random(0)
    # Lengths like STS-B's captions and headlines: 3-30 words, about 12 on average.
    texts = [
        " ".join(generator.choice(WORDS) for _ in range(max(3, int(generator.gauss(12, 5)))))
        for _ in range(arguments.texts)
    ]
    flags = cpu_flags()
    print(
        f"{len(texts)} texts; CPU: {cpu_name()}, {os.cpu_count()} logical cores; "
        + ", ".join(sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512_vnni"))))
    )
    print(
        f"torch {torch.__version__}, hiddenpool {hiddenpool.__version__}, "
        + ", ".join(f"{name} {version(name)}" for name in ("onnxruntime", "openvino", "nncf"))
    )
    for threads in thread_counts:
        measure(threads, texts, folders, weights_folder, arguments.repeat)
    return 0


def version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(name)
    except PackageNotFoundError:
        return "absent"


def measure(
    threads: int,
    texts: list[str],
    folders: dict[str, str],
    weights_folder: str,
    repeat: int,
) -> None:
    import torch

    import hiddenpool
    from hiddenpool import Encoder

    hiddenpool.set_num_threads(threads)
    torch.set_num_threads(threads)
    runs: list[tuple[str, Callable[[list[str]], np.ndarray]]] = []

    def add(name: str, make: Callable[[], Callable[[list[str]], np.ndarray]]) -> None:
        try:
            runs.append((name, make()))
        except Exception as error:  # a row left out says why, the others still run
            print(f"{name} left out: {type(error).__name__}: {error}".splitlines()[0])

    def sentence_transformer() -> Callable[[list[str]], np.ndarray]:
        from sentence_transformers import SentenceTransformer, models

        body = models.Transformer(weights_folder)
        pooling = models.Pooling(body.get_word_embedding_dimension(), "mean")
        st = SentenceTransformer(modules=[body, pooling], device="cpu")
        return lambda batch: st.encode(batch, batch_size=32, normalize_embeddings=True)

    def encoder(folder: str, **options: Any) -> Callable[[], Callable[[list[str]], np.ndarray]]:
        def make() -> Callable[[list[str]], np.ndarray]:
            loaded = Encoder.from_pretrained(folder, **options)
            return lambda batch: loaded.encode(batch, "mean@last", normalize=True)

        return make

    add("SentenceTransformer.encode", sentence_transformer)
    if "float32" in folders:
        add("ONNX Runtime fp32", encoder(folders["float32"]))
        add("OpenVINO fp32", encoder(folders["float32"], backend="openvino"))
        # Left out, with the missing CPU feature named, where the CPU has no bf16.
        add("OpenVINO bf16", encoder(folders["float32"], precision="bf16"))
    if "int8" in folders:
        add("ONNX Runtime dynamic int8", encoder(folders["int8"]))
    if "int8-static" in folders:
        add("OpenVINO static int8", encoder(folders["int8-static"]))
    rows: dict[str, np.ndarray] = {}
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _, run in runs:
        run(texts[:64])
    for _ in range(repeat):
        for name, run in runs:
            started = time.perf_counter()
            rows[name] = np.asarray(run(texts), dtype=np.float32)
            times[name].append(time.perf_counter() - started)
    reference_name = "OpenVINO fp32" if "OpenVINO fp32" in rows else runs[0][0]
    reference = rows[reference_name]
    base = statistics.median(times[runs[0][0]])
    onnx_fp32 = statistics.median(times.get("ONNX Runtime fp32", times[runs[0][0]]))
    print(
        f"\n{threads} threads, median of {repeat}\n"
        f"| runtime | seconds | texts/s | x {runs[0][0]} | x ONNX Runtime fp32 | "
        f"min cosine to {reference_name} |\n|---|---|---|---|---|---|"
    )
    for name, _ in runs:
        seconds = statistics.median(times[name])
        cosine = float((rows[name] * reference).sum(1).min())
        print(
            f"| {name} | {seconds:.2f} | {len(texts) / seconds:.0f} | {base / seconds:.2f} | "
            f"{onnx_fp32 / seconds:.2f} | {cosine:.5f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
