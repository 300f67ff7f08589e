"""Installed size of what each way of encoding pulls in, from the distributions installed
in this environment: the closure of a requirement (its dependencies, theirs, ... with
environment markers evaluated), summed over the files each distribution's RECORD lists.

    python benches/install_size.py   # the ONNX and OpenVINO runners against the torch runner

Run it in the development environment (.venv), where both are installed. torch there is
PyPI's build, which bundles CUDA libraries; a CPU-only torch wheel is smaller.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

WAYS = {
    "ONNX runner: hiddenpool[onnx] (numpy, onnxruntime, tokenizers)": [
        "numpy",
        "onnxruntime",
        "tokenizers",
    ],
    "OpenVINO runner: hiddenpool[openvino] (numpy, openvino, tokenizers)": [
        "numpy",
        "openvino",
        "tokenizers",
    ],
    "torch runner: hiddenpool[encoder] (torch, transformers, tqdm)": [
        "numpy",
        "torch",
        "transformers",
        "tqdm",
    ],
}


def closure(names: Sequence[str]) -> set[str]:
    seen: set[str] = set()
    pending = [Requirement(name) for name in names]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in distribution.requires or []:
            child = Requirement(text)
            if child.marker is None or child.marker.evaluate({"extra": ""}):
                pending.append(child)
    return seen


def installed_bytes(name: str) -> int:
    distribution = metadata.distribution(name)
    total = 0
    for file in distribution.files or []:
        path = str(distribution.locate_file(file))
        if os.path.isfile(path) and not os.path.islink(path):
            total += os.path.getsize(path)
    return total


def main() -> int:
    print("| way of encoding | distributions | installed size |")
    print("|---|---|---|")
    for label, names in WAYS.items():
        members = closure(names)
        size = sum(installed_bytes(name) for name in members)
        print(f"| {label} | {len(members)} | {size / 1e6:,.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
