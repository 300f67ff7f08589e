"""Run inside a fresh environment holding only the built wheel and its declared
dependencies: the package imports, and its kernels compute a known mean."""

import numpy as np

import hiddenpool

hidden = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
mask = np.array([[1, 1, 0], [0, 1, 1]])
result = hiddenpool.pool(hidden, mask, "mean@last")
expected = np.stack([hidden[0, :2].mean(0), hidden[1, 1:].mean(0)])
assert result.dtype == np.float32 and result.shape == (2, 4), (result.dtype, result.shape)
np.testing.assert_array_equal(result, expected)
print("wheel smoke test passed:", hiddenpool.__file__)

# The package data the CLI's defaults read ships inside the wheel.
from hiddenpool.evaluation import evaluate  # noqa: E402

pairs = evaluate.read_pairs(evaluate.default_data_path())
assert len(pairs.scores) >= 36, len(pairs.scores)
print("shipped sentence pairs:", len(pairs.scores))

# Without their extras, `compare --mteb` and `serve --ray` say which extra to install, in
# one line, exit code 2 (before any model loads).
import subprocess  # noqa: E402
import sys  # noqa: E402

for arguments, extra in (
    (["compare", "--mteb", "STSBenchmark"], "hiddenpool[mteb]"),
    (["serve", "--ray", "--model", "/nonexistent"], "hiddenpool[ray-serve]"),
):
    result = subprocess.run(
        [sys.executable, "-m", "hiddenpool", *arguments], capture_output=True, text=True
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and extra in lines[0], result.stderr
    print(f"hiddenpool {' '.join(arguments[:2])} without its extra:", lines[0])
