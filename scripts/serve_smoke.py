"""Run inside the fresh environment of the wheel with the ``onnx`` and ``serve`` extras
only: ``hiddenpool serve`` on an exported folder answers OpenAI's embeddings request with
SentenceTransformer's vectors (made by scripts/onnx_export_reference.py), torch and
transformers not installed, then stops on SIGTERM with status 0.

    python scripts/serve_smoke.py FOLDER
"""

import base64
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import numpy as np

from site_size import site_packages_mb

folder = sys.argv[1]
for absent in ("torch", "transformers"):
    assert importlib.util.find_spec(absent) is None, f"{absent} is installed here"
texts = ["A man is playing a guitar.", "hi"]
command = [sys.executable, "-m", "hiddenpool", "serve", "--port", "0"]
server = subprocess.Popen(
    [*command, "--model", os.path.join(folder, "minilm")],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
)
try:
    line = server.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    assert match, (line, server.stderr.read())
    body = json.dumps({"model": "minilm", "input": texts, "encoding_format": "base64"})
    request = urllib.request.Request(
        match.group(1) + "/v1/embeddings",
        data=body.encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        document = json.load(response)
    rows = np.array(
        [np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in document["data"]]
    )
    np.testing.assert_allclose(rows, np.load(os.path.join(folder, "expected.npy"))[:2], atol=1e-5)
finally:
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=60)
assert code == 0, code
print("hiddenpool serve without torch answers with SentenceTransformer's vectors to 1e-5")
print(f"site-packages of this environment ([onnx,serve]): {site_packages_mb():.0f} MB")
