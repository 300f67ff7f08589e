"""The operations the benchmarks time: hiddenpool and its peers, on the same inputs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import hiddenpool

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Pooling

EOS = 2
OPERATIONS = ["mean", "max", "first", "last", "eos", "mean@last4:sum", "mean@last4:concat", "mean+max@last"]


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
        return lambda: hiddenpool.pool(inputs.last, mask, f"{operation}@last")
    if operation == "eos":
        return lambda: hiddenpool.pool(
            inputs.last, mask, "eos@last", input_ids=inputs.input_ids, eos_token_id=EOS
        )
    return lambda: hiddenpool.pool(layers, mask, operation)


def _bmm_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(1)
    summed = torch.bmm(weights, hidden).squeeze(1).float()
    return summed / mask.sum(1, keepdim=True).clamp(min=1)


def _masked_max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(mask.unsqueeze(2) == 0, float("-inf")).amax(1)


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    index = positions.view(-1, 1, 1).expand(-1, 1, hidden.shape[2])
    return hidden.gather(1, index).squeeze(1)


def _sentence_transformers(hidden_size: int, modes: tuple[str, ...]):
    module = Pooling(hidden_size, pooling_mode=modes)

    def run(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
        result["torch.bmm+amax"] = lambda: torch.cat([_bmm_mean(last, mask), _masked_max(last, mask)], 1)
    return result


def floor(inputs: Inputs, operation: str) -> Callable[[], object]:
    """torch.sum over a contiguous tensor holding the bytes the operation must read."""
    elements = max(1, bytes_read(inputs, operation) // inputs.last.element_size())
    block = torch.ones(elements, dtype=inputs.last.dtype)
    return lambda: torch.sum(block)
