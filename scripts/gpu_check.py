"""Checks the torch path on a CUDA device against the Rust kernels on the same data.

Every DESIGN strategy (plus eos and the remaining pools), float32, float16 and bfloat16,
left and right padding, NaN in padded positions: the CUDA result is compared with the Rust
result computed from a host copy of the same tensors. Prints the largest absolute difference
of each case and PASS/FAIL; exits 1 on any failure.

    python scripts/gpu_check.py                 # needs a CUDA device
    python scripts/gpu_check.py --device cpu    # dry run of the torch path on the CPU
"""

from __future__ import annotations

import argparse
import sys

import torch

import hiddenpool

STRATEGIES = [
    "mean@last",
    "cls@last",
    "eos@last",
    "mean@-2",
    "mean@first_last:mean",
    "mean@last4:sum",
    "mean@last4:concat",
    "mean+max@last",
    "mean@-4..-1:concat",
    "mean@1,-1:concat",
    "sum+mean_sqrt_len+weighted_mean+last@all:mean",
    "max@embeddings",
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
EOS = 3


def make_case(dtype: torch.dtype, padding: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, tokens, hidden, states = 9, 40, 64, 7
    layers = [torch.randn(batch, tokens, hidden, generator=generator) * 3 for _ in range(states)]
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens
    positions = torch.arange(tokens)
    if padding == "right":
        mask = positions[None, :] < lengths[:, None]
    else:
        mask = positions[None, :] >= (tokens - lengths)[:, None]
    mask[-1] = False  # an empty row
    ids = torch.randint(10, 1000, (batch, tokens), generator=generator)
    last = torch.where(mask.any(1), tokens - 1 - torch.argmax(mask.flip(1).int(), 1), 0)
    ids[torch.arange(batch), last] = EOS
    ids[~mask] = EOS  # pad id equal to EOS
    for layer in layers:
        layer[~mask] = float("nan")
    return [layer.to(dtype) for layer in layers], mask.to(torch.int64), ids


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; pass --device cpu for a dry run of the torch path")
        return 2
    print(f"torch {torch.__version__}, device {torch.device(device)}", end="")
    if device.startswith("cuda"):
        print(f" ({torch.cuda.get_device_name(device)})", end="")
    print()
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for padding in ("right", "left"):
            layers, mask, ids = make_case(dtype, padding)
            rust = hiddenpool.pool(
                layers, mask, STRATEGIES, input_ids=ids, eos_token_id=EOS, backend="rust"
            )
            on_device = [layer.to(device) for layer in layers]
            device_results = hiddenpool.pool(
                on_device,
                mask.to(device),
                STRATEGIES,
                input_ids=ids.to(device),
                eos_token_id=EOS,
                backend="torch",
            )
            for strategy in STRATEGIES:
                result = device_results[strategy]
                assert result.device.type == torch.device(device).type, result.device
                expected = rust[strategy]
                difference = (result.cpu() - expected).abs().max().item()
                has_nan = bool(torch.isnan(result).any())
                ok = (
                    difference <= TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
                    and not has_nan
                )
                failures += not ok
                print(
                    f"{'PASS' if ok else 'FAIL'}  {dtype!s:<15} {padding:<5} {strategy:<48} "
                    f"max |cuda - rust| = {difference:.3g}{'  (NaN leaked)' if has_nan else ''}"
                )
    print(f"{'all passed' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
