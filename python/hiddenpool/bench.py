"""Kernel benchmarks: hiddenpool against its peers on the same inputs, as a table with
shape, dtype, operation, ours, each peer, ratio and GB/s of real-token bytes.

Peers: sentence-transformers' ``Pooling`` (when installed), ``torch.bmm`` with the mask,
``numpy.einsum``, ``masked_fill(...).amax``, ``torch.stack``/``torch.cat`` of layers
followed by the pool, and the floor: ``torch.sum`` over as many bytes as the real tokens.
Used by ``hiddenpool bench`` and ``benches/run.py``; needs torch.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hiddenpool import _native, ops

try:
    import torch
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "hiddenpool bench times the kernels against torch, which is not installed: "
        'pip install ".[torch]" in a hiddenpool checkout'
    ) from error

EOS = 2
OPERATIONS = [
    "mean",
    "max",
    "first",
    "last",
    "eos",
    "mean@last4:sum",
    "mean@last4:concat",
    "mean+max@last",
]


@dataclass
class Inputs:
    layers: list[torch.Tensor]  # four layers [B, T, H]
    mask: torch.Tensor  # int64 [B, T], right padding
    input_ids: torch.Tensor  # EOS at each row's last real token
    real_tokens: int

    @property
    def last(self) -> torch.Tensor:
        return self.layers[-1]


def make_inputs(batch: int, tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> Inputs:
    generator = torch.Generator().manual_seed(seed)
    layers = [torch.randn(batch, tokens, hidden, generator=generator).to(dtype) for _ in range(4)]
    low = max(1, tokens // 5)
    lengths = torch.randint(low, tokens + 1, (batch,), generator=generator)
    positions = torch.arange(tokens)
    mask = (positions[None, :] < lengths[:, None]).to(torch.int64)
    input_ids = torch.randint(5, 1000, (batch, tokens), generator=generator)
    input_ids[torch.arange(batch), lengths - 1] = EOS
    input_ids[mask == 0] = 0
    return Inputs(layers, mask, input_ids, int(lengths.sum()))


def bytes_read(inputs: Inputs, operation: str) -> int:
    """Bytes of real tokens an operation must read (one token per row for gathers)."""
    itemsize = inputs.last.element_size()
    hidden = inputs.last.shape[2]
    if operation in ("first", "last", "eos"):
        return inputs.last.shape[0] * hidden * itemsize
    layers = 4 if "last4" in operation else 1
    return inputs.real_tokens * hidden * itemsize * layers


def ours(inputs: Inputs, operation: str) -> Callable[[], object]:
    mask, layers = inputs.mask, inputs.layers
    if operation in ("mean", "max", "first", "last"):
        return lambda: ops.pool(inputs.last, mask, f"{operation}@last")
    if operation == "eos":
        return lambda: ops.pool(
            inputs.last, mask, "eos@last", input_ids=inputs.input_ids, eos_token_id=EOS
        )
    return lambda: ops.pool(layers, mask, operation)


def _bmm_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(1)
    summed = torch.bmm(weights, hidden).squeeze(1).float()
    return summed / mask.sum(1, keepdim=True).clamp(min=1)


def _masked_max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(mask.unsqueeze(2) == 0, float("-inf")).amax(1)


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    index = positions.view(-1, 1, 1).expand(-1, 1, hidden.shape[2])
    return hidden.gather(1, index).squeeze(1)


def _sentence_transformers(
    hidden_size: int, modes: tuple[str, ...]
) -> Callable[[torch.Tensor, torch.Tensor], Any] | None:
    """sentence-transformers' Pooling module as a function, or None when not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from sentence_transformers.sentence_transformer.modules import Pooling
        except ImportError:
            try:
                from sentence_transformers.models import Pooling  # type: ignore[no-redef]
            except ImportError:
                return None
    module = Pooling(hidden_size, pooling_mode=modes)

    def run(hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        return module({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]

    return run


def peers(inputs: Inputs, operation: str) -> dict[str, Callable[[], object]]:
    """Each peer's way of computing the same result, by name."""
    mask, last, layers = inputs.mask, inputs.last, inputs.layers
    hidden_size = last.shape[2]
    numpy_ok = last.dtype != torch.bfloat16
    result: dict[str, Callable[[], object]] = {}
    if operation in ("mean", "max", "first", "last", "mean+max@last"):
        modes = {"mean": ("mean",), "max": ("max",), "first": ("cls",), "last": ("lasttoken",)}
        st = _sentence_transformers(hidden_size, modes.get(operation, ("mean", "max")))
        if st is not None:
            result["sentence-transformers"] = lambda: st(last, mask)
    if operation == "mean":
        result["torch.bmm"] = lambda: _bmm_mean(last, mask)
        if numpy_ok:
            hidden_np, mask_np = last.numpy(), mask.numpy().astype(last.numpy().dtype)
            counts = np.maximum(mask_np.sum(1, keepdims=True), 1)
            result["numpy.einsum"] = lambda: np.einsum("bt,bth->bh", mask_np, hidden_np) / counts
    elif operation == "max":
        result["torch.masked_fill.amax"] = lambda: _masked_max(last, mask)
    elif operation == "first":
        result["torch.gather"] = lambda: _gather(last, torch.argmax(mask, dim=1))
    elif operation == "last":
        result["torch.gather"] = lambda: _gather(last, mask.sum(1) - 1)
    elif operation == "eos":
        result["torch.gather"] = lambda: _gather(last, (inputs.input_ids == EOS).int().argmax(1))
    elif operation == "mean@last4:sum":
        result["torch.stack.sum+bmm"] = lambda: _bmm_mean(torch.stack(layers).sum(0), mask)
    elif operation == "mean@last4:concat":
        result["torch.cat+bmm"] = lambda: _bmm_mean(torch.cat(layers, dim=2), mask)
    elif operation == "mean+max@last":
        result["torch.bmm+amax"] = lambda: torch.cat(
            [_bmm_mean(last, mask), _masked_max(last, mask)], 1
        )
    return result


def floor(inputs: Inputs, operation: str) -> Callable[[], object]:
    """torch.sum over a contiguous tensor holding the bytes the operation must read."""
    elements = max(1, bytes_read(inputs, operation) // inputs.last.element_size())
    block = torch.ones(elements, dtype=inputs.last.dtype)
    return lambda: torch.sum(block)


DEFAULT_SHAPES = ["32x128x384", "32x256x768", "64x512x1024"]
DEFAULT_DTYPES = ["float32", "float16", "bfloat16"]


def median_seconds(function: Callable[[], object], repeat: int, budget: float = 2.0) -> float:
    """Median wall time of up to ``repeat`` calls (at least 3, at most ``budget`` seconds)."""
    # Let worker threads of the previous measurement (torch's and ours) go idle first, so
    # neither library is timed while the other's threads still spin on the cores.
    time.sleep(0.05)
    function()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeat and (len(times) < 3 or time.perf_counter() - started < budget):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_time(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _parse_shape(shape: str) -> tuple[int, int, int]:
    try:
        batch, tokens, hidden = (int(part) for part in shape.lower().split("x"))
    except ValueError:
        raise ValueError(f"shapes: expected BxTxH like 32x256x768, got {shape!r}") from None
    if min(batch, tokens, hidden) < 1:
        raise ValueError(f"shapes: B, T and H must be positive, got {shape!r}")
    return batch, tokens, hidden


def _parse_dtype(dtype: str) -> torch.dtype:
    torch_dtype = getattr(torch, dtype, None)
    if torch_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"dtypes: expected float32, float16, bfloat16 or float64, got {dtype!r}")
    assert isinstance(torch_dtype, torch.dtype)
    return torch_dtype


def header(threads: int, repeat: int) -> str:
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores; threads: {threads}; "
        f"torch {torch.__version__}; median of up to {repeat} runs; 'ours vs peer' = how many "
        "times faster (peer time / ours) or slower (ours / peer time); "
        "floor = torch.sum over the bytes the operation must read"
    )


def table(
    shapes: Sequence[str],
    dtypes: Sequence[str],
    operations: Sequence[str] | None = None,
    threads: int | None = None,
    repeat: int = 15,
    echo: Callable[[str], None] | None = None,
) -> list[str]:
    """Markdown table rows, one per (shape, dtype, operation, peer); ``echo`` gets each row
    as soon as it is measured."""
    operations = list(operations or OPERATIONS)
    # Every argument is checked before the first measurement, not minutes into the run.
    unknown = [operation for operation in operations if operation not in OPERATIONS]
    if unknown:
        raise ValueError(f"operations: unknown {unknown[0]!r}; valid: {', '.join(OPERATIONS)}")
    parsed_shapes = [_parse_shape(shape) for shape in shapes]
    torch_dtypes = [_parse_dtype(dtype) for dtype in dtypes]
    for name, value in (("threads", threads), ("repeat", repeat)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    _native.set_num_threads(threads)
    lines = [
        "| shape | dtype | operation | ours | peer | peer time | ours vs peer | GB/s "
        "| floor | ours / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        if echo:
            echo(line)
    for shape, (batch, tokens, hidden) in zip(shapes, parsed_shapes, strict=True):
        for dtype, torch_dtype in zip(dtypes, torch_dtypes, strict=True):
            inputs = make_inputs(batch, tokens, hidden, torch_dtype)
            # One untimed round first: the row measured right after the inputs were made
            # otherwise pays for their page faults and torch's still-busy threads.
            median_seconds(ours(inputs, "mean"), 3)
            for operation in operations:
                our_time = median_seconds(ours(inputs, operation), repeat)
                floor_time = median_seconds(floor(inputs, operation), repeat)
                rate = bytes_read(inputs, operation) / our_time / 1e9
                for name, function in peers(inputs, operation).items():
                    peer_time = median_seconds(function, repeat)
                    lines.append(
                        f"| {shape} | {dtype} | {operation} | {format_time(our_time)} | {name} | "
                        f"{format_time(peer_time)} | {speed_ratio(our_time, peer_time)} | "
                        f"{rate:.1f} | {format_time(floor_time)} | {our_time / floor_time:.2f} |"
                    )
                    if echo:
                        echo(lines[-1])
    return lines


def speed_ratio(our_time: float, peer_time: float) -> str:
    """How ours compares, always as a ratio of at least 1: "2.0x faster" or "2.0x slower"
    (never "0.5x faster").

    >>> speed_ratio(1.0, 2.0), speed_ratio(2.0, 1.0)
    ('2.0x faster', '2.0x slower')
    """
    if our_time <= peer_time:
        return f"{peer_time / our_time:.1f}x faster"
    return f"{our_time / peer_time:.1f}x slower"


def print_table(
    shapes: Sequence[str],
    dtypes: Sequence[str],
    operations: Sequence[str] | None = None,
    threads: int | None = None,
    repeat: int = 15,
) -> list[str]:
    """Prints the header and the table row by row; returns the rows."""
    threads = threads or os.cpu_count() or 1
    print(header(threads, repeat), flush=True)
    print(flush=True)
    return table(
        shapes, dtypes, operations, threads, repeat, echo=lambda line: print(line, flush=True)
    )
