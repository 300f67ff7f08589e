"""``pool_packed``: unpadded ``[N, H]`` hidden states with cu_seqlens offsets, as
unpadded (flash) attention produces them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hiddenpool import _native
from hiddenpool.ops.common import (
    StrategyLike,
    _as_numpy,
    _check_shapes,
    _effective_combine,
    _host_arrays,
    _is_torch,
    _kernel_pools,
    _mixing_weights,
    _states_from,
)
from hiddenpool.strategy import Strategy


def pool_packed(
    hidden_states: Any,
    offsets: Any,
    strategy: StrategyLike = "mean@last",
    *,
    layer_weights: Sequence[float] | None = None,
    layer_scale: float = 1.0,
) -> Any:
    """Pools packed hidden states: ``[N, H]`` values (one array, or one per layer) whose rows
    are ``values[offsets[b]:offsets[b + 1]]`` (cu_seqlens, ``[B + 1]`` ints from 0 to N), as
    unpadded attention produces. Every pool but ``eos`` works here. Returns ``[B, D]``.

    >>> import numpy as np
    >>> values = np.arange(6, dtype=np.float32).reshape(3, 2)
    >>> pool_packed(values, np.array([0, 1, 3]), "mean")
    array([[0., 1.],
           [3., 4.]], dtype=float32)
    """
    parsed = Strategy.parse(strategy)
    if "eos" in parsed.pools:
        raise ValueError("strategy: the eos pool needs input_ids; use pool() on padded input")
    states = _states_from(hidden_states)
    indices = parsed.resolve_layers(len(states))
    combine = _effective_combine(parsed, len(indices))
    weights = _mixing_weights(parsed, combine, len(indices), layer_weights, layer_scale)
    torch_output = _is_torch(states[0])
    arrays, is_bfloat16 = _host_arrays([states[index] for index in indices])
    _check_shapes(arrays, None, packed=True)
    offset_array = _as_numpy(offsets, "offsets")[0]
    result = _native.pool_packed(
        arrays,
        offset_array,
        _kernel_pools(parsed.pools),
        combine,
        list(weights) if weights else None,
        None,
        is_bfloat16,
    )
    if torch_output:
        import torch

        return torch.from_numpy(result)
    return result
