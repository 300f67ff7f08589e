"""Peak extra memory of one call: hiddenpool against the torch way, each in a fresh
process (Linux: the resident high-water mark is reset after the inputs exist).

    python benches/memory.py [--shape 32x256x768]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

OPERATIONS = {
    "hiddenpool mean@last4:sum": "hiddenpool.pool(layers, mask, 'mean@last4:sum')",
    "torch.stack(...).sum(0) + bmm mean": "bench._bmm_mean(torch.stack(layers).sum(0), mask)",
    "hiddenpool mean@last4:concat": "hiddenpool.pool(layers, mask, 'mean@last4:concat')",
    "torch.cat(...) + bmm mean": "bench._bmm_mean(torch.cat(layers, dim=2), mask)",
    "hiddenpool max@last": "hiddenpool.pool(layers[-1], mask, 'max@last')",
    "torch masked_fill(...).amax": "bench._masked_max(layers[-1], mask)",
}

CHILD = """
import re, torch, hiddenpool
from hiddenpool import bench
b, t, h = {shape}
inputs = bench.make_inputs(b, t, h, torch.float32)
layers, mask = inputs.layers, inputs.mask
{operation}  # warm up: imports, thread pools, allocator
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
before = peak()
result = {operation}
print((peak() - before) / 1024)
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shape", default="32x256x768")
    shape = tuple(int(part) for part in parser.parse_args().shape.split("x"))
    layer_megabytes = shape[0] * shape[1] * shape[2] * 4 / 2**20
    print(f"shape {list(shape)} float32, one layer = {layer_megabytes:.1f} MiB, four layers given")
    print("| operation | peak extra memory |")
    print("|---|---|")
    for name, operation in OPERATIONS.items():
        code = CHILD.format(shape=shape, operation=operation)
        output = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        print(f"| {name} | {float(output.stdout.strip()):.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
