"""``pool``: padded ``[B, T, H]`` hidden states under an attention mask, every strategy
in one pass per group of layers; the prompt helpers (``without_leading_tokens``,
``keep_prompt_weights``) and the EOS positions it needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from hiddenpool import _native
from hiddenpool.ops.common import (
    Backend,
    StrategyLike,
    _Backend,
    _check_shapes,
    _choose_backend,
    _is_torch,
    _Plan,
    _rows_text,
    _states_from,
)
from hiddenpool.strategy import Strategy, strategy_list


def _last_positions(mask: Any, use_torch: bool) -> Any:
    if use_torch:
        import torch

        from hiddenpool.torch_backend import last_real

        real = mask != 0
        last = last_real(real)
        return torch.where(real.any(dim=1), last, torch.full_like(last, -1))
    real = np.asarray(mask) != 0
    tokens = real.shape[1]
    if tokens == 0:
        return np.full(real.shape[0], -1, dtype=np.int64)
    last = tokens - 1 - np.argmax(real[:, ::-1], axis=1)
    return np.where(real.any(axis=1), last, -1).astype(np.int64)


def without_leading_tokens(attention_mask: Any, count: int) -> Any:
    """``attention_mask`` (numpy or torch, ``[B, T]``) as bools with each row's first
    ``count`` real tokens counted as padding, under either padding side: how a prompt is
    left out of pooling (sentence-transformers' ``include_prompt=False``).

    >>> without_leading_tokens(np.array([[0, 1, 1, 1], [1, 1, 1, 0]]), 2).astype(int)
    array([[0, 0, 0, 1],
           [0, 0, 1, 0]])
    """
    real = attention_mask != 0
    rank = real.cumsum(dim=1) if _is_torch(real) else np.cumsum(real, axis=1)
    return real & (rank > count)


def keep_prompt_weights(
    pooled: Any,
    hidden_states: Any,
    pooled_mask: Any,
    full_mask: Any,
    strategy: StrategyLike,
    **options: Any,
) -> Any:
    """``strategy``'s rows pooled under ``pooled_mask`` (a prompt's leading tokens left
    out of ``full_mask``), with each ``weighted_mean`` part made to weigh the pooled tokens
    by their rank in ``full_mask``: the i-th real token weighs i whether or not the tokens
    before it are pooled, as sentence-transformers' ``include_prompt=False`` keeps each
    token's own weight. Other pools are returned as they are.

    With ``n`` pooled tokens of rank ``o + 1 .. o + n`` (``o`` left out before them), the
    weighted mean is ``(W * S + o * n * M) / (S + o * n)`` where ``W`` is the weighted
    mean by rank among the pooled tokens, ``M`` their mean and ``S = n (n + 1) / 2``: exact,
    from two pools the kernels already give. ``options`` are ``pool``'s (layer weights...).

    >>> hidden = np.array([[[1.0], [3.0], [5.0]]], dtype=np.float32)
    >>> full = np.ones((1, 3), dtype=np.int64)
    >>> pooled_mask = without_leading_tokens(full, 1)
    >>> rows = pool(hidden, pooled_mask, "weighted_mean")  # 4.333: ranks restarted
    >>> keep_prompt_weights(rows, hidden, pooled_mask, full, "weighted_mean").round(4)
    array([[4.2]], dtype=float32)
    """
    parsed = Strategy.parse(strategy) if isinstance(strategy, str) else strategy
    if "weighted_mean" not in parsed.pools:
        return pooled
    text = str(parsed)
    means = pool(hidden_states, pooled_mask, "mean@" + text.split("@", 1)[1], **options)
    width = means.shape[1]
    count = ((pooled_mask != 0) * 1.0).sum(1)
    left_out = ((full_mask != 0) * 1.0).sum(1) - count
    ranks = count * (count + 1) / 2
    denominator = ranks + left_out * count
    scale_weighted = (ranks / (denominator + (denominator == 0)))[:, None]
    scale_mean = (left_out * count / (denominator + (denominator == 0)))[:, None]
    pieces = []
    for index, name in enumerate(parsed.pools):
        part = pooled[:, index * width : (index + 1) * width]
        if name == "weighted_mean":
            part = part * scale_weighted + means * scale_mean
        pieces.append(part)
    if _is_torch(pooled):
        import torch

        return torch.cat([piece.to(pooled.dtype) for piece in pieces], dim=1)
    return np.concatenate(pieces, axis=1).astype(pooled.dtype, copy=False)


def pool(
    hidden_states: Any,
    attention_mask: Any,
    strategy: StrategyLike | Sequence[StrategyLike] = "mean@last",
    *,
    input_ids: Any = None,
    eos_token_id: int | None = None,
    layer_weights: Sequence[float] | None = None,
    layer_scale: float = 1.0,
    empty: Literal["zero", "raise"] = "zero",
    missing_eos: Literal["raise", "last"] = "raise",
    backend: Backend | None = None,
) -> Any:
    """Pools hidden states into one vector per row, as ``strategy`` says.

    ``hidden_states``: one ``[B, T, H]`` array or tensor, the sequence transformers returns
    with ``output_hidden_states=True`` (index 0 = embeddings), or a ModelOutput (its
    ``hidden_states`` with ``last_hidden_state`` as the last entry, else
    ``last_hidden_state`` alone). float32, float64, float16 or bfloat16.
    ``attention_mask``: ``[B, T]``, nonzero = real token; padding on either side, holes
    allowed; None means every token is real.
    ``strategy``: ``POOL[+POOL...]@LAYERS[:COMBINE]`` (see ``hiddenpool.strategy``) or a
    ``Strategy``; a list of them returns ``{str(strategy as given): result}``, with strategies
    on the same layers computed in one pass.
    ``input_ids`` and ``eos_token_id`` are needed by ``eos``. ``layer_weights`` (with
    ``layer_scale``) are ScalarMix parameters for ``:weighted``: each layer weighs
    ``layer_scale * softmax(layer_weights)``.
    ``empty="raise"`` refuses rows without real tokens (default: they pool to zeros).
    ``missing_eos="last"`` pools rows without EOS at their last real token (default: raise).

    Returns ``[B, D]``, float32 (float64 for float64 input); torch in gives torch out on the
    same device.

    >>> import numpy as np
    >>> hidden = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    >>> pool(hidden, np.array([[1, 1, 0]]), "mean@last")
    array([[2., 3., 4., 5.]], dtype=float32)
    """
    if empty not in ("zero", "raise"):
        raise ValueError(f"empty: expected 'zero' or 'raise', got {empty!r}")
    if missing_eos not in ("raise", "last"):
        raise ValueError(f"missing_eos: expected 'raise' or 'last', got {missing_eos!r}")
    several, keys, strategies = strategy_list(strategy)
    states = _states_from(hidden_states)
    plan = _Plan(strategies, len(states), layer_weights, layer_scale)
    chosen = _choose_backend(states[plan.used[0]], backend)
    converted, is_bfloat16 = chosen.states(plan.states_used(states))
    mask = chosen.mask(attention_mask, converted[0])
    _check_shapes(converted, mask)

    if empty == "raise":
        counts = np.asarray((mask != 0).sum(1).cpu() if chosen.use_torch else (mask != 0).sum(1))
        empty_rows = [int(row) for row in np.flatnonzero(counts == 0)]
        if empty_rows:
            raise ValueError(
                f"attention_mask: {len(empty_rows)} row(s) have no real token: "
                f"{_rows_text(empty_rows)} (pass empty='zero' to pool them to zeros)"
            )

    index = None
    if any("eos" in parsed.pools for parsed in strategies):
        index = _eos_positions(chosen, input_ids, eos_token_id, mask, missing_eos)

    def compute(layers: list[Any], pools: list[str], combine: str, weights: Any) -> Any:
        uses_index = "index" in pools
        if chosen.use_torch:
            from hiddenpool import torch_backend

            return torch_backend.pool(
                layers, mask, pools, combine, weights, index if uses_index else None
            )
        return _native.pool(
            layers,
            mask,
            pools,
            combine,
            list(weights) if weights else None,
            index if uses_index else None,
            is_bfloat16,
        )

    outputs = plan.run(keys, converted, compute, chosen)
    return outputs if several else outputs[keys[0]]


def _eos_positions(
    chosen: _Backend, input_ids: Any, eos_token_id: int | None, mask: Any, missing_eos: str
) -> Any:
    if input_ids is None or eos_token_id is None:
        raise ValueError(
            "input_ids: the eos pool needs input_ids and eos_token_id "
            f"(got input_ids={'None' if input_ids is None else 'given'}, "
            f"eos_token_id={eos_token_id!r})"
        )
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, (int, np.integer)):
        raise TypeError(f"eos_token_id: expected an int, got {type(eos_token_id).__name__}")
    ids = chosen.ids(input_ids)
    if tuple(ids.shape) != tuple(mask.shape):
        raise ValueError(
            f"input_ids: shape {list(ids.shape)} does not match attention_mask shape "
            f"{list(mask.shape)}"
        )
    if chosen.use_torch and (ids.is_floating_point() or ids.is_complex() or ids.dtype == _bool()):
        raise TypeError(f"input_ids: expected int32 or int64 token ids, got {ids.dtype}")
    positions: Any = chosen.find_token(ids, mask, int(eos_token_id))
    missing: Any = positions < 0
    missing_rows = np.flatnonzero(np.asarray(missing.cpu() if chosen.use_torch else missing))
    if missing_rows.size:
        real: Any = mask != 0
        has_tokens = np.asarray(real.any(1).cpu() if chosen.use_torch else real.any(1))
        # Rows with no real token at all are "empty", handled by `empty`, not missing EOS.
        missing_rows = missing_rows[has_tokens[missing_rows]]
    if missing_rows.size:
        if missing_eos == "raise":
            rows = [int(row) for row in missing_rows]
            raise ValueError(
                f"input_ids: no real token equals eos_token_id={eos_token_id} in "
                f"{len(rows)} row(s): {_rows_text(rows)} (pass missing_eos='last' to pool "
                "those rows at their last real token)"
            )
        last = _last_positions(mask, chosen.use_torch)
        if chosen.use_torch:
            import torch

            positions = torch.where(missing, last, positions)
        else:
            positions = np.where(missing, last, positions)
    return positions


def _bool() -> Any:
    import torch

    return torch.bool
