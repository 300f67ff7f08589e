"""One pool of the last layer (``mean``, ``max``, ``first``/``cls``, ``last`` ...), the
EOS token (``eos``, CLIP's pooled output) and explicit positions (``gather``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from hiddenpool import _native
from hiddenpool.ops.common import (
    Backend,
    _as_numpy,
    _choose_backend,
    _describe,
    _states_from,
    _to_tensor,
)
from hiddenpool.ops.padded import pool


def _single(pool_name: str) -> Any:
    def pooled(hidden_states: Any, attention_mask: Any, **options: Any) -> Any:
        return pool(hidden_states, attention_mask, f"{pool_name}@last", **options)

    pooled.__name__ = pool_name
    pooled.__qualname__ = pool_name
    pooled.__doc__ = (
        f"``{pool_name}`` pooling of one ``[B, T, H]`` array (or the last of a sequence) under "
        "``attention_mask`` ``[B, T]``; returns ``[B, H]``. Options as for ``pool``."
    )
    return pooled


mean = _single("mean")


sum = _single("sum")


max = _single("max")


mean_sqrt_len = _single("mean_sqrt_len")


weighted_mean = _single("weighted_mean")


first = _single("first")


cls = first


last = _single("last")


def eos(
    hidden_states: Any,
    attention_mask: Any,
    input_ids: Any,
    eos_token_id: int,
    **options: Any,
) -> Any:
    """The hidden state at the first real token whose id is ``eos_token_id`` (CLIP's pooled
    output), ``[B, H]``. Rows without it raise ValueError naming them, unless
    ``missing_eos="last"``."""
    return pool(
        hidden_states,
        attention_mask,
        "eos@last",
        input_ids=input_ids,
        eos_token_id=eos_token_id,
        **options,
    )


def gather(hidden_states: Any, index: Any, *, backend: Backend | None = None) -> Any:
    """The hidden state of row b at token ``index[b]`` (``[B]`` ints; -1 gives zeros), any
    position including padding, since the caller chose it. Returns ``[B, H]``.

    >>> import numpy as np
    >>> gather(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.array([1, -1]))
    array([[2., 3.],
           [0., 0.]], dtype=float32)
    """
    states = _states_from(hidden_states)
    chosen = _choose_backend(states[0], backend)
    converted, is_bfloat16 = chosen.states(states[-1:])
    shape = tuple(converted[0].shape)
    if len(shape) != 3:
        raise ValueError(
            f"hidden_states: expected 3 dimensions [B, T, H], got {_describe(converted[0])}"
        )
    if chosen.use_torch:
        import torch

        from hiddenpool import torch_backend

        index_tensor = _to_tensor(index, chosen.device).to(torch.int64)
        _check_index(index_tensor.cpu().numpy(), shape)
        all_real = torch.ones(shape[:2], dtype=torch.bool, device=chosen.device)
        return chosen.output(
            torch_backend.pool(converted, all_real, ["index"], "sum", None, index_tensor)
        )
    positions_array = _as_numpy(index, "index")[0]
    if positions_array.dtype.kind not in "iu":
        raise TypeError(f"index: expected integer positions, got dtype {positions_array.dtype}")
    positions_array = positions_array.astype(np.int64)
    _check_index(positions_array, shape)
    mask = np.ones(shape[:2], dtype=np.bool_)
    return chosen.output(
        _native.pool(converted, mask, ["index"], "sum", None, positions_array, is_bfloat16)
    )


def _check_index(positions: np.ndarray, shape: tuple[int, ...]) -> None:
    if positions.shape != (shape[0],):
        raise ValueError(
            f"index: expected shape [{shape[0]}] (one position per row), "
            f"got {list(positions.shape)}"
        )
    bad = np.flatnonzero((positions < -1) | (positions >= shape[1]))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"index: row {row}: position {int(positions[row])} is outside 0..{shape[1]} "
            "(use -1 for no token)"
        )
