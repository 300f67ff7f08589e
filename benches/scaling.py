"""Thread scaling and cost against sequence length for mean pooling (float32, H=768,
B=32, every row 60% real tokens, right padding).

    python benches/scaling.py
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import hiddenpool
from hiddenpool import bench


def main() -> int:
    print("| threads | T | real tokens | mean time | per real token | GB/s |")
    print("|---|---|---|---|---|---|")
    for threads in (1, 2):
        hiddenpool.set_num_threads(threads)
        torch.set_num_threads(threads)
        for tokens in (64, 128, 256, 512, 1024):
            hidden = torch.randn(32, tokens, 768)
            length = int(tokens * 0.6)
            mask = torch.zeros(32, tokens, dtype=torch.int64)
            mask[:, :length] = 1
            seconds = bench.median_seconds(
                lambda hidden=hidden, mask=mask: hiddenpool.pool(hidden, mask, "mean@last"), 25
            )
            real = 32 * length
            rate = real * 768 * 4 / seconds / 1e9
            print(
                f"| {threads} | {tokens} | {real} | {bench.format_time(seconds)} | "
                f"{seconds / real * 1e9:.1f} ns | {rate:.1f} |"
            )
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    sys.exit(main())
