"""The functional API: pool hidden states given as numpy arrays, torch tensors or a
transformers ModelOutput.

numpy arrays (and anything with ``__array__``) and torch CPU tensors go to the Rust kernels
without a copy; tensors on other devices (CUDA) take a pure-torch path with the same
semantics. ``backend="torch"`` (or ``with hiddenpool.use_backend("torch")``) forces the
torch path, which is how CI tests the CUDA code path without a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hiddenpool import _native
from hiddenpool.strategy import Strategy, strategy_list

if TYPE_CHECKING:
    pass

Array = Any  # numpy.ndarray, torch.Tensor, or anything with __array__
StrategyLike = str | Strategy
Backend = Literal["auto", "rust", "torch"]

_BACKEND: contextvars.ContextVar[Backend] = contextvars.ContextVar(
    "hiddenpool_backend", default="auto"
)


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Within the block, pool with ``backend``: ``"torch"`` sends even CPU tensors (and numpy
    arrays) through the torch path, ``"rust"`` refuses tensors the kernels cannot read,
    ``"auto"`` picks by device.

    >>> with use_backend("torch"):
    ...     pass
    """
    if backend not in ("auto", "rust", "torch"):
        raise ValueError(f"backend: expected 'auto', 'rust' or 'torch', got {backend!r}")
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def _is_torch(value: object) -> bool:
    module = type(value).__module__
    return module.startswith("torch") and hasattr(value, "device") and hasattr(value, "dtype")


def _states_from(hidden_states: object) -> list[Any]:
    """One array, a sequence of arrays, or a ModelOutput, as a list of hidden states."""
    if isinstance(hidden_states, Mapping) or hasattr(hidden_states, "last_hidden_state"):
        # ModelOutput is a mapping with attributes; a plain dict has only the mapping.
        if isinstance(hidden_states, Mapping):
            all_states = hidden_states.get("hidden_states")
            last = hidden_states.get("last_hidden_state")
        else:
            all_states = getattr(hidden_states, "hidden_states", None)
            last = getattr(hidden_states, "last_hidden_state", None)
        if all_states is not None:
            states = list(all_states)
            # last_hidden_state is the model's final output (after CLIP's final layer norm),
            # which is what "@last" means; for BERT, T5 and GPT-2 it is hidden_states[-1].
            if last is not None:
                states[-1] = last
            return states
        if last is not None:
            return [last]
        raise ValueError(
            "hidden_states: the model output has neither hidden_states nor last_hidden_state"
        )
    if isinstance(hidden_states, (list, tuple)):
        if not hidden_states:
            raise ValueError("hidden_states: empty sequence; expected at least one layer")
        return list(hidden_states)
    if isinstance(hidden_states, (str, bytes)) or hidden_states is None:
        raise TypeError(
            "hidden_states: expected an array [B, T, H], a sequence of them or a ModelOutput, "
            f"got {type(hidden_states).__name__}"
        )
    return [hidden_states]


def state_list(hidden_states: object) -> list[Any]:
    """Hidden states in any form ``pool`` reads (one array, a sequence, a ModelOutput) as a
    list indexed like ``output_hidden_states`` (a ModelOutput's ``last_hidden_state`` in
    the last place), so rows can be picked from each state.

    >>> [state.shape for state in state_list(np.zeros((2, 3, 4)))]
    [(2, 3, 4)]
    """
    return _states_from(hidden_states)


def _describe(value: Any) -> str:
    shape = tuple(getattr(value, "shape", ()))
    return f"shape {list(shape)} and dtype {getattr(value, 'dtype', type(value).__name__)}"


def _as_numpy(value: Any, argument: str) -> tuple[np.ndarray, bool]:
    """A zero-copy numpy view of a CPU tensor or array; True when it holds bfloat16 bits."""
    if _is_torch(value):
        import torch

        tensor = value.detach()
        if tensor.device.type != "cpu":
            raise ValueError(f"{argument}: tensor on {tensor.device} cannot go to the Rust kernels")
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy(), True
        if tensor.is_complex() or tensor.dtype not in _numpy_compatible_torch_dtypes():
            raise TypeError(f"{argument}: unsupported dtype {tensor.dtype} ({_describe(value)})")
        return tensor.resolve_conj().resolve_neg().numpy(), False
    if isinstance(value, np.ndarray):
        return value, False
    if hasattr(value, "__array__") or isinstance(value, (list, tuple)):
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"{argument}: could not be read as a numeric array")
        return array, False
    raise TypeError(f"{argument}: expected an array or tensor, got {type(value).__name__}")


@functools.cache
def _numpy_compatible_torch_dtypes() -> frozenset[Any]:
    """torch dtypes whose CPU tensors ``.numpy()`` shares without conversion."""
    import torch

    return frozenset(
        {
            torch.float32,
            torch.float64,
            torch.float16,
            torch.bool,
            torch.int8,
            torch.uint8,
            torch.int16,
            torch.int32,
            torch.int64,
        }
    )


def _check_shapes(states: Sequence[Any], mask: Any, packed: bool = False) -> tuple[int, int, int]:
    rank = 2 if packed else 3
    first_shape = tuple(states[0].shape)
    for position, state in enumerate(states):
        name = "hidden_states" if len(states) == 1 else f"hidden_states[{position}]"
        shape = tuple(state.shape)
        if len(shape) != rank:
            expected = "[N, H]" if packed else "[B, T, H]"
            raise ValueError(
                f"{name}: expected {rank} dimensions {expected}, got {_describe(state)}"
            )
        if shape != first_shape:
            raise ValueError(
                f"{name}: shape {list(shape)} differs from hidden_states[0] shape "
                f"{list(first_shape)}"
            )
    if packed:
        return 0, first_shape[0], first_shape[1]
    batch, tokens, hidden = first_shape
    mask_shape = tuple(mask.shape)
    if mask_shape != (batch, tokens):
        raise ValueError(
            f"attention_mask: shape {list(mask_shape)} does not match hidden_states shape "
            f"{list(first_shape)} (expected [{batch}, {tokens}])"
        )
    return batch, tokens, hidden


def _scalar_mix(layer_weights: Sequence[float], layer_scale: float, count: int) -> list[float]:
    weights = np.asarray(layer_weights, dtype=np.float64).reshape(-1)
    if weights.size != count:
        raise ValueError(f"layer_weights: has {weights.size} weights for {count} chosen layers")
    if not np.all(np.isfinite(weights)) or not math.isfinite(layer_scale):
        raise ValueError("layer_weights: weights and layer_scale must be finite")
    exponent = np.exp(weights - weights.max())
    return [float(w) for w in layer_scale * exponent / exponent.sum()]


class _Backend:
    """One of the two implementations, chosen per call."""

    def __init__(self, use_torch: bool, torch_output: bool, device: Any) -> None:
        self.use_torch = use_torch
        self.torch_output = torch_output
        self.device = device

    def mask(self, attention_mask: Any, like: Any) -> Any:
        """The mask in this backend's form; None means every token of ``like`` is real."""
        if attention_mask is None:
            shape = tuple(like.shape[:2]) if len(like.shape) >= 2 else (0, 0)
            if self.use_torch:
                import torch

                return torch.ones(shape, dtype=torch.bool, device=self.device)
            return np.ones(shape, dtype=np.bool_)
        if self.use_torch:
            return _to_tensor(attention_mask, self.device)
        mask, _ = _as_numpy(attention_mask, "attention_mask")
        if mask.dtype == np.float16:
            mask = mask.astype(np.float32)
        return mask

    def states(self, states: Sequence[Any]) -> tuple[list[Any], bool]:
        if self.use_torch:
            tensors = [_to_tensor(state, self.device) for state in states]
            return tensors, False
        return _host_arrays(states)

    def ids(self, input_ids: Any) -> Any:
        if self.use_torch:
            return _to_tensor(input_ids, self.device)
        return _as_numpy(input_ids, "input_ids")[0]

    def find_token(self, input_ids: Any, mask: Any, token_id: int) -> Any:
        if self.use_torch:
            from hiddenpool import torch_backend

            return torch_backend.find_token(input_ids, mask, token_id)
        return _native.find_token(input_ids, mask, token_id)

    def output(self, result: Any) -> Any:
        if self.use_torch or not self.torch_output:
            if self.use_torch and not self.torch_output:
                return result.cpu().numpy()
            return result
        import torch

        return torch.from_numpy(result)


def _host_arrays(states: Sequence[Any]) -> tuple[list[np.ndarray], bool]:
    """Zero-copy numpy views of host layers, and whether they hold bfloat16 bits (all or
    none may)."""
    arrays: list[np.ndarray] = []
    flags = set()
    for position, state in enumerate(states):
        name = "hidden_states" if len(states) == 1 else f"hidden_states[{position}]"
        array, is_bfloat16 = _as_numpy(state, name)
        arrays.append(array)
        flags.add(is_bfloat16)
    if len(flags) > 1:
        raise TypeError("hidden_states: layers mix bfloat16 with other dtypes")
    return arrays, flags.pop()


def _to_tensor(value: Any, device: Any) -> Any:
    import torch

    if _is_torch(value):
        # Not detached: the torch path keeps autograd (HiddenPooling trains through it).
        return value.to(device)
    array = np.asarray(value)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.bool_:
        # numpy bool arrays may hold any byte (``.view(np.bool_)``); torch reads bools as
        # 0/1 only. Normalise to numpy's reading: nonzero is True.
        array = array.view(np.uint8) != 0
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        # torch tensors cannot be read-only; a copy keeps the caller's array out of reach.
        array = array.copy()
    return torch.from_numpy(array).to(device)


def _choose_backend(first_state: Any, backend: Backend | None) -> _Backend:
    chosen = backend or _BACKEND.get()
    if chosen not in ("auto", "rust", "torch"):
        raise ValueError(f"backend: expected 'auto', 'rust' or 'torch', got {chosen!r}")
    if _is_torch(first_state):
        on_cpu = first_state.device.type == "cpu"
        if chosen == "rust" and not on_cpu:
            raise ValueError(
                f"backend: 'rust' reads host memory only; hidden_states is on {first_state.device}"
            )
        return _Backend(chosen == "torch" or not on_cpu, True, first_state.device)
    if chosen == "torch":
        return _Backend(True, False, "cpu")
    return _Backend(False, False, None)


def _effective_combine(strategy: Strategy, layer_count: int) -> str:
    """The combine the kernels get: the strategy's, or ``sum`` (a no-op) for one layer."""
    if strategy.combine is not None and (layer_count > 1 or strategy.combine == "weighted"):
        return strategy.combine
    return "sum"


def _mixing_weights(
    strategy: Strategy,
    combine: str,
    layer_count: int,
    layer_weights: Sequence[float] | None,
    layer_scale: float,
) -> tuple[float, ...] | None:
    """Each layer's weight for ``:weighted`` (ScalarMix), None for the other combines."""
    if combine != "weighted":
        return None
    if layer_weights is None:
        raise ValueError(
            f"layer_weights: strategy {strategy} combines layers by weight; pass layer_weights"
        )
    return tuple(_scalar_mix(layer_weights, layer_scale, layer_count))


def _kernel_pools(pools: Sequence[str]) -> list[str]:
    return ["index" if pool == "eos" else pool for pool in pools]


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


def _rows_text(rows: Sequence[int]) -> str:
    shown = ", ".join(str(row) for row in rows[:20])
    return shown + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")


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


class _Plan:
    """What a call computes: each strategy's layer indices, combine and weights, and the
    groups of strategies that share one pass (same layers and combine, their pools merged)."""

    def __init__(
        self,
        strategies: Sequence[Strategy],
        state_count: int,
        layer_weights: Sequence[float] | None,
        layer_scale: float,
    ) -> None:
        if layer_weights is not None and not any(s.combine == "weighted" for s in strategies):
            raise ValueError("layer_weights: given, but no strategy uses ':weighted'")
        self.items: list[tuple[tuple[int, ...], str, tuple[float, ...] | None, list[str]]] = []
        for parsed in strategies:
            resolved = parsed.resolve_layers(state_count)
            combine = _effective_combine(parsed, len(resolved))
            weights = _mixing_weights(parsed, combine, len(resolved), layer_weights, layer_scale)
            self.items.append((tuple(resolved), combine, weights, _kernel_pools(parsed.pools)))
        self.used = sorted({index for indices, _, _, _ in self.items for index in indices})
        # Strategies on the same layers and combine share one pass over the data.
        self.groups: dict[tuple[Any, ...], list[str]] = {}
        for indices, combine, weights, pools in self.items:
            merged = self.groups.setdefault((indices, combine, weights), [])
            merged.extend(p for p in pools if p not in merged)

    def states_used(self, states: Sequence[Any]) -> list[Any]:
        """The states the strategies read, in ``used`` order."""
        for position in self.used:
            if states[position] is None:
                # Runners leave the states no strategy reads as None.
                raise ValueError(f"hidden_states[{position}]: is None but strategies read it")
        return [states[index] for index in self.used]

    def run(
        self,
        keys: Sequence[str],
        converted: Sequence[Any],
        compute: Any,
        chosen: _Backend,
    ) -> dict[str, Any]:
        """Each key's result: ``compute(layers, pools, combine, weights)`` once per group,
        then each strategy's pools cut out of its group's result, in its own order."""
        by_index = dict(zip(self.used, converted, strict=True))
        results = {
            group: compute([by_index[i] for i in group[0]], pools, group[1], group[2])
            for group, pools in self.groups.items()
        }
        outputs: dict[str, Any] = {}
        for key, (indices, combine, weights, wanted) in zip(keys, self.items, strict=True):
            group = (indices, combine, weights)
            computed = results[group]
            group_pools = self.groups[group]
            if wanted == group_pools:
                selected = computed
            else:
                block = computed.shape[1] // len(group_pools)
                parts = [
                    computed[:, group_pools.index(p) * block : (group_pools.index(p) + 1) * block]
                    for p in wanted
                ]
                if chosen.use_torch:
                    import torch

                    selected = torch.cat(parts, dim=1)
                else:
                    selected = np.concatenate(parts, axis=1)
            outputs[key] = chosen.output(selected)
        return outputs


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


def pool_spans(
    hidden_states: Any,
    spans: Any,
    strategy: StrategyLike | Sequence[StrategyLike] = "mean@last",
    *,
    attention_mask: Any = None,
    offsets: Any = None,
    layer_weights: Sequence[float] | None = None,
    layer_scale: float = 1.0,
    empty: Literal["zero", "raise"] = "zero",
    backend: Backend | None = None,
) -> Any:
    """Pools spans of tokens into one vector each, as ``strategy`` says.

    ``spans``: ``[S, 3]`` integers, each ``(row, start, end)``: token positions
    ``start..end`` (end exclusive) of row ``row``. Positions count every position of the
    padded row, padding included; only the real tokens inside a span are pooled, so the
    same span means the same tokens under left and right padding only when the caller
    shifts it (``Encoder.encode_tokens`` and ``encode_words`` do). Spans may overlap and
    share rows. ``hidden_states`` and ``attention_mask`` are as for ``pool`` (``[B, T, H]``
    and ``[B, T]``; no mask: every token is real); with ``offsets`` ``[B + 1]`` instead,
    ``hidden_states`` are packed ``[N, H]`` (``pool_packed``) and positions count from each
    row's first token. Every pool but ``eos`` works (``first``/``last`` are the first and
    last real token inside the span); a span with no real token pools to zeros, or raises
    with ``empty="raise"``. Returns ``[S, D]`` (a dict for a list of strategies), float32
    (float64 for float64 input); torch in gives torch out on the same device.

    >>> import numpy as np
    >>> hidden = np.arange(12, dtype=np.float32).reshape(1, 6, 2)
    >>> pool_spans(hidden, np.array([[0, 0, 2], [0, 2, 6]]), "mean@last")
    array([[1., 2.],
           [7., 8.]], dtype=float32)
    """
    if empty not in ("zero", "raise"):
        raise ValueError(f"empty: expected 'zero' or 'raise', got {empty!r}")
    several, keys, strategies = strategy_list(strategy)
    for key, parsed in zip(keys, strategies, strict=True):
        if "eos" in parsed.pools:
            raise ValueError(
                f"strategy {key}: the eos pool finds one token per row; within spans use "
                "first or last"
            )
    if attention_mask is not None and offsets is not None:
        raise ValueError(
            "offsets: give attention_mask (padded [B, T, H] input) or offsets (packed [N, H] "
            "input), not both"
        )
    states = _states_from(hidden_states)
    plan = _Plan(strategies, len(states), layer_weights, layer_scale)
    packed = offsets is not None
    if packed:
        first = states[plan.used[0]]
        if (backend or _BACKEND.get()) == "torch" or (
            _is_torch(first) and first.device.type != "cpu"
        ):
            raise ValueError(
                "offsets: packed input is pooled by the Rust kernels, on the host only; pass "
                "padded [B, T, H] states with attention_mask for the torch path"
            )
    chosen = _choose_backend(states[plan.used[0]], "rust" if packed else backend)
    converted, is_bfloat16 = chosen.states(plan.states_used(states))
    host_spans = _checked_spans(spans)
    if packed:
        _check_shapes(converted, None, packed=True)
        offset_array = _as_numpy(offsets, "offsets")[0]
        row_lengths = _row_lengths(offset_array, converted[0].shape[0])
        mask = None
    else:
        mask = chosen.mask(attention_mask, converted[0])
        _check_shapes(converted, mask)
        rows, tokens = tuple(mask.shape)
        row_lengths = np.full(rows, tokens)
    _check_span_bounds(host_spans, row_lengths)
    if empty == "raise":
        row, start, end = host_spans.T
        if mask is None:
            counts = end - start  # packed rows: every position is real
        else:
            # Read on the host only here: a device mask costs a copy and a synchronisation.
            real = np.asarray(mask.cpu() if chosen.use_torch else mask) != 0
            before = np.zeros((real.shape[0], real.shape[1] + 1), dtype=np.int64)
            np.cumsum(real, axis=1, out=before[:, 1:])
            counts = before[row, end] - before[row, start]
        empty_spans = [int(span) for span in np.flatnonzero(counts == 0)]
        if empty_spans:
            raise ValueError(
                f"spans: {len(empty_spans)} span(s) hold no real token: "
                f"{_rows_text(empty_spans)} (pass empty='zero' to pool them to zeros)"
            )

    def compute(layers: list[Any], pools: list[str], combine: str, weights: Any) -> Any:
        if chosen.use_torch:
            from hiddenpool import torch_backend

            assert mask is not None  # packed input always takes the Rust kernels
            return torch_backend.pool_spans(
                layers, mask, _to_tensor(host_spans, chosen.device), pools, combine, weights
            )
        return _native.pool_spans(
            layers,
            host_spans,
            pools,
            combine,
            list(weights) if weights else None,
            attention_mask=mask,
            offsets=offset_array if packed else None,
            bfloat16=is_bfloat16,
        )

    outputs = plan.run(keys, converted, compute, chosen)
    return outputs if several else outputs[keys[0]]


def _row_lengths(offsets: np.ndarray, tokens: int) -> np.ndarray:
    """Each packed row's length from cu_seqlens ``offsets``, or a ValueError naming them."""
    if offsets.ndim != 1 or offsets.size == 0 or offsets.dtype.kind not in "iu":
        raise ValueError(
            f"offsets: expected [B + 1] integers starting at 0, got {_describe(offsets)}"
        )
    values = offsets.astype(np.int64)
    lengths = np.diff(values)
    if values[0] != 0 or values[-1] != tokens or (lengths < 0).any():
        raise ValueError(
            f"offsets: must start at 0, never decrease and end at the {tokens} packed tokens; "
            f"got {values[:8].tolist()}{' ...' if values.size > 8 else ''}"
        )
    return lengths


def _checked_spans(spans: Any) -> np.ndarray:
    """``spans`` as a host ``[S, 3]`` int64 array, or a TypeError/ValueError naming it."""
    if _is_torch(spans):
        spans = spans.detach().cpu()
    array = np.asarray(spans)
    if array.size == 0 and array.dtype.kind == "f":
        array = array.astype(np.int64)  # np.asarray([]) is float64
    if array.dtype.kind not in "iu":
        raise TypeError(f"spans: expected integer (row, start, end) triples, got {array.dtype}")
    if array.size == 0:
        array = array.reshape(0, 3)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"spans: expected shape [S, 3] (row, start, end), got {list(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _check_span_bounds(spans: np.ndarray, row_lengths: np.ndarray) -> None:
    """A ValueError naming the first span whose row or positions fall outside the input."""
    rows = row_lengths.shape[0]
    row, start, end = spans[:, 0], spans[:, 1], spans[:, 2]
    bad_row = np.flatnonzero((row < 0) | (row >= rows))
    if bad_row.size:
        at = int(bad_row[0])
        raise ValueError(
            f"spans[{at}] = ({row[at]}, {start[at]}, {end[at]}): row {row[at]} is outside 0..{rows}"
        )
    limit = row_lengths[row]
    bad = np.flatnonzero((start < 0) | (end < start) | (end > limit))
    if bad.size:
        at = int(bad[0])
        raise ValueError(
            f"spans[{at}] = ({row[at]}, {start[at]}, {end[at]}): needs 0 <= start <= end <= "
            f"{limit[at]} (the row's token positions)"
        )


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
