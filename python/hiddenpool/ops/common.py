"""What the functional API shares: reading hidden states (arrays, tensors, sequences, a
ModelOutput), the argument checks that name the argument and its shape, the choice of
backend (the Rust kernels or the torch path), and the plan that groups strategies sharing
one pass over the layers."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from hiddenpool import _native
from hiddenpool.strategy import Strategy

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


def _rows_text(rows: Sequence[int]) -> str:
    shown = ", ".join(str(row) for row in rows[:20])
    return shown + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")


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
