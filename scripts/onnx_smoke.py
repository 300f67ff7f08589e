"""Run inside a fresh environment holding only the wheel, numpy, onnxruntime and
tokenizers: an exported folder encodes to SentenceTransformer's vectors (made by
scripts/onnx_export_reference.py) without torch or transformers, which are not even
installed; prints the environment's installed size.

    python scripts/onnx_smoke.py FOLDER
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np

import hiddenpool
from site_size import site_packages_mb

folder = sys.argv[1]
for absent in ("torch", "transformers"):
    assert importlib.util.find_spec(absent) is None, f"{absent} is installed here"
texts = [
    "A man is playing a guitar.",
    "hi",
    "",
    "The quick brown fox jumps over the lazy dog. " * 30,
    "Ünïcödé, emoji 🙂 and\ttabs\nnewlines",
]
encoder = hiddenpool.Encoder.from_pretrained(os.path.join(folder, "minilm"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the long text is truncated, as it should be
    rows = encoder.encode(texts, "mean@last", normalize=True)
np.testing.assert_allclose(rows, np.load(os.path.join(folder, "expected.npy")), atol=1e-5)
every = encoder.encode(texts, ["mean@last4:sum", "cls+max@-2"])
assert every["mean@last4:sum"].shape == (5, 384) and every["cls+max@-2"].shape == (5, 768)
loaded = sorted(name for name in ("torch", "transformers") if name in sys.modules)
assert not loaded, loaded

# The command line too: encode from the folder into a file, equal to the rows above.
with tempfile.TemporaryDirectory() as scratch:
    output = os.path.join(scratch, "vectors.npy")
    command = [sys.executable, "-m", "hiddenpool", "encode", "--model"]
    command += [os.path.join(folder, "minilm"), "--input", os.path.join(folder, "texts.txt")]
    command += ["--output", output, "--normalize"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from_cli = np.load(output)
# texts.txt holds the texts with newlines as spaces, so compare the rows without them.
np.testing.assert_allclose(from_cli[[0, 1, 2, 3]], rows[[0, 1, 2, 3]], atol=1e-6)
print("hiddenpool encode --model FOLDER:", result.stdout.strip())
print("ONNX runner without torch equals SentenceTransformer to 1e-5")
print(f"site-packages of this environment: {site_packages_mb():.0f} MB")
