"""The functional API: pool hidden states given as numpy arrays, torch tensors or a
transformers ModelOutput.

numpy arrays (and anything with ``__array__``) and torch CPU tensors go to the Rust kernels
without a copy; tensors on other devices (CUDA) take a pure-torch path with the same
semantics. ``backend="torch"`` (or ``with hiddenpool.use_backend("torch")``) forces the
torch path, which is how CI tests the CUDA code path without a GPU.

By concern, each a module: ``padded`` (``pool`` on ``[B, T, H]`` under a mask), ``packed``
(``pool_packed`` on cu_seqlens input), ``spans`` (``pool_spans``), ``gathers`` (one pool of
the last layer, ``eos``, ``gather``) and ``common`` (reading inputs, the argument checks,
the backend, the plan of a pass). This module is their one public surface.
"""

from hiddenpool.ops.common import Array, Backend, StrategyLike, state_list, use_backend
from hiddenpool.ops.gathers import (
    cls,
    eos,
    first,
    gather,
    last,
    max,
    mean,
    mean_sqrt_len,
    sum,
    weighted_mean,
)
from hiddenpool.ops.packed import pool_packed
from hiddenpool.ops.padded import keep_prompt_weights, pool, without_leading_tokens
from hiddenpool.ops.spans import pool_spans

__all__ = [
    "Array",
    "Backend",
    "StrategyLike",
    "cls",
    "eos",
    "first",
    "gather",
    "keep_prompt_weights",
    "last",
    "max",
    "mean",
    "mean_sqrt_len",
    "pool",
    "pool_packed",
    "pool_spans",
    "state_list",
    "sum",
    "use_backend",
    "weighted_mean",
    "without_leading_tokens",
]
