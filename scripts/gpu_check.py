"""Checks the torch path on a CUDA device against the Rust kernels on the same data.

Every DESIGN strategy (plus eos and the remaining pools), float32, float16 and bfloat16,
left and right padding, NaN in padded positions: the CUDA result is compared with the Rust
result computed from a host copy of the same tensors. Then ``pool_spans`` (8 random spans a
row, every pool and combine) the same way, and the Encoder's span features (tokens, words,
prompt exclusion, late chunking across windows) with a tiny BERT on the device against the
same model on the CPU. Prints the largest absolute difference of each case and PASS/FAIL;
exits 1 on any failure.

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
    failures += check_spans(device)
    failures += check_encoder(device)
    print(f"{'all passed' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


SPAN_STRATEGIES = [
    "mean@last",
    "max@last",
    "first+last@last",
    "mean+max@last4:sum",
    "weighted_mean+mean_sqrt_len@-3,-1:concat",
    "sum@all:mean",
]


def report(ok: bool, label: str, difference: float) -> int:
    print(f"{'PASS' if ok else 'FAIL'}  {label:<80} max |difference| = {difference:.3g}")
    return 0 if ok else 1


def check_spans(device: str) -> int:
    """pool_spans on the device against the Rust kernels on a host copy."""
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for padding in ("right", "left"):
            layers, mask, _ = make_case(dtype, padding, seed=1)
            generator = torch.Generator().manual_seed(2)
            batch, tokens = mask.shape
            bounds = torch.randint(0, tokens + 1, (batch * 8, 2), generator=generator)
            rows = torch.arange(batch).repeat_interleave(8)
            spans = torch.stack([rows, bounds.min(1).values, bounds.max(1).values], 1)
            rust = hiddenpool.pool_spans(
                layers, spans, SPAN_STRATEGIES, attention_mask=mask, backend="rust"
            )
            on_device = hiddenpool.pool_spans(
                [layer.to(device) for layer in layers],
                spans.to(device),
                SPAN_STRATEGIES,
                attention_mask=mask.to(device),
                backend="torch",
            )
            for strategy in SPAN_STRATEGIES:
                result, expected = on_device[strategy], rust[strategy]
                difference = (result.cpu() - expected).abs().max().item()
                has_nan = bool(torch.isnan(result).any())
                ok = not has_nan and difference <= TOLERANCE[dtype] * max(
                    1.0, expected.abs().max().item()
                )
                failures += report(ok, f"spans {dtype!s:<15} {padding:<5} {strategy}", difference)
    return failures


def check_encoder(device: str) -> int:
    """Encoder span features with a tiny BERT on the device against the CPU."""
    import os
    import warnings

    warnings.simplefilter("ignore")  # the 33-word text is truncated by encode, on purpose
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import tiny_models

    failures = 0
    model, tokenizer = tiny_models.bert()
    on_cpu = hiddenpool.Encoder(model, tokenizer, max_length=12)
    on_device = hiddenpool.Encoder(
        tiny_models.bert()[0].to(device), tiny_models.bert()[1], max_length=12
    )
    texts = [text for text in tiny_models.TEXTS if text]
    long_text = " ".join((tiny_models.WORDS * 2)[:33])  # three windows of 10 tokens

    def compare(label: str, ours, theirs, tolerance: float = 1e-4) -> int:
        pairs = list(zip(ours, theirs, strict=True)) if isinstance(ours, list) else [(ours, theirs)]
        difference = max(float(abs(a - b).max()) if a.size else 0.0 for a, b in pairs)
        return report(difference <= tolerance, f"encoder {label}", difference)

    failures += compare(
        "encode mean+max@last4:sum",
        on_device.encode(texts, "mean+max@last4:sum"),
        on_cpu.encode(texts, "mean+max@last4:sum"),
    )
    options = {"prompt": "the ", "include_prompt": False}
    failures += compare(
        "encode with the prompt left out",
        on_device.encode(texts, "mean@last", **options),
        on_cpu.encode(texts, "mean@last", **options),
    )
    failures += compare(
        "encode_tokens last2:mean",
        on_device.encode_tokens(texts, "last2:mean"),
        on_cpu.encode_tokens(texts, "last2:mean"),
    )
    failures += compare(
        "encode_words max", on_device.encode_words(texts, "max"), on_cpu.encode_words(texts, "max")
    )
    failures += compare(
        "encode_chunks across 3 windows",
        on_device.encode_chunks(long_text, chunk_tokens=4),
        on_cpu.encode_chunks(long_text, chunk_tokens=4),
    )
    return failures


if __name__ == "__main__":
    sys.exit(main())
