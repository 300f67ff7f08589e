"""pool_spans against pooling spans in torch, in one process.

    python benches/spans.py                      # CPU: Rust kernels vs torch
    python benches/spans.py --device cuda        # CUDA: hiddenpool's torch path vs torch

Hidden states [B, T, H] with right padding (real lengths T/2..T), 8 random spans per row
(start/end drawn inside the row's real tokens), mean pooling over the last layer. Peers:
"torch slice loop" pools ``h[row, start:end].mean(0)`` span by span, as people write it;
"torch masked" copies each span's row and sums under the narrowed mask in one call. Each
figure is the median of --repeat timed calls after two warm-ups.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import hiddenpool


def make(batch: int, tokens: int, hidden: int, spans_per_row: int, dtype, device: str):
    generator = np.random.default_rng(0)
    states = torch.randn(batch, tokens, hidden, dtype=dtype, device=device)
    lengths = generator.integers(tokens // 2, tokens + 1, batch)
    mask = torch.from_numpy(np.arange(tokens)[None, :] < lengths[:, None]).to(device)
    spans = []
    for row in range(batch):
        for _ in range(spans_per_row):
            start, end = sorted(generator.integers(0, lengths[row] + 1, 2))
            end = max(end, start + 1)
            spans.append((row, start, min(end, lengths[row])))
    return states, mask, torch.tensor(spans, dtype=torch.int64)


def slice_loop(states, spans):
    rows = [states[row, start:end].float().mean(0) for row, start, end in spans.tolist()]
    return torch.stack(rows)


def masked(states, mask, spans):
    spans = spans.to(states.device)
    rows, start, end = spans[:, 0], spans[:, 1:2], spans[:, 2:3]
    positions = torch.arange(states.shape[1], device=states.device)
    inside = mask.index_select(0, rows) & (positions >= start) & (positions < end)
    copies = states.index_select(0, rows).float()
    total = torch.where(inside.unsqueeze(2), copies, 0.0).sum(1)
    return total / inside.sum(1, keepdim=True).clamp(min=1)


def timed(call, repeat: int, device: str) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        call()
    sync()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def row(shape: str, name: str, device: str, spans_per_row: int, repeat: int) -> str:
    batch, tokens, hidden = (int(part) for part in shape.split("x"))
    states, mask, spans = make(batch, tokens, hidden, spans_per_row, getattr(torch, name), device)
    on_device = spans.to(device)

    def ours():
        return hiddenpool.pool_spans(states, on_device, "mean@last", attention_mask=mask)

    tolerance = 2e-2 if name == "bfloat16" else 1e-4
    assert torch.allclose(ours().float(), slice_loop(states, spans), atol=tolerance)
    ours_time = timed(ours, repeat, device)
    loop_time = timed(lambda: slice_loop(states, spans), repeat, device)
    masked_time = timed(lambda: masked(states, mask, spans), repeat, device)
    return (
        f"{shape:<12} {name:<9} {len(spans):>5} {ours_time * 1e6:>9.0f}µs "
        f"{loop_time * 1e6:>9.0f}µs {loop_time / ours_time:>5.1f}x "
        f"{masked_time * 1e6:>7.0f}µs {masked_time / ours_time:>5.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=["32x256x768", "64x512x384"], help="BxTxH")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--spans-per-row", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20)
    arguments = parser.parse_args()
    device = arguments.device
    name = f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""
    print(
        f"torch {torch.__version__}, device {device}{name}, hiddenpool threads "
        f"{hiddenpool.get_num_threads()}, torch threads {torch.get_num_threads()}"
    )
    header = (
        f"{'shape':<12} {'dtype':<9} {'spans':>5} {'hiddenpool':>11} {'slice loop':>11} "
        f"{'ratio':>6} {'masked':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for shape in arguments.shapes:
        for dtype in arguments.dtypes:
            print(row(shape, dtype, device, arguments.spans_per_row, arguments.repeat))
    print("ratio: the peer's time over hiddenpool's (above 1: hiddenpool is faster)")


if __name__ == "__main__":
    main()
