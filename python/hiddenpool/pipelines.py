"""Reading a sentence-transformers folder's own pipeline (``modules.json``): its pooling as
a hiddenpool strategy, then its Dense layers and Normalize, so ``Encoder.encode(texts,
"model")`` gives what the model's authors configured.

Both ``modules.json`` type spellings (``sentence_transformers.models.Pooling`` and the
5.4+ module paths) and both pooling config formats (one boolean per mode, or
``pooling_mode`` as a string or a list) are read. Dense weights are read from
``model.safetensors`` here, without torch (``pytorch_model.bin`` needs torch). A module
hiddenpool cannot run is an error naming it, never a silent fallback.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hiddenpool.pooling_modes import MODES
from hiddenpool.strategy import Strategy

ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Tanh": np.tanh,
    "Identity": lambda x: x,
    "ReLU": lambda x: np.maximum(x, 0),
    "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
}


def pooling_strategy(config: Mapping[str, Any]) -> Strategy:
    """The hiddenpool strategy of a sentence-transformers Pooling config, either format.

    >>> str(pooling_strategy({"pooling_mode": ["mean", "max"]}))
    'mean+max@last'
    >>> str(pooling_strategy({"pooling_mode_cls_token": True}))
    'first@last'
    """
    return Strategy.from_sentence_transformers(config)


@dataclass(frozen=True)
class Dense:
    """A Dense module: ``activation(x @ weight.T + bias)`` (+ the residual where set)."""

    weight: np.ndarray  # [out, in] float32
    bias: np.ndarray | None
    activation: str
    residual: np.ndarray | bool = False  # True: add x; an array: add x @ residual.T

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = x @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        out = ACTIVATIONS[self.activation](out)
        if isinstance(self.residual, np.ndarray):
            out = out + x @ self.residual.T
        elif self.residual:
            out = out + x
        return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class Pipeline:
    """What a sentence-transformers folder does after its Transformer module."""

    strategy: Strategy
    dense: tuple[Dense, ...] = ()
    normalize: bool = False
    include_prompt: bool = True
    # A HiddenPooling module's learned ScalarMix (":weighted" strategies): the weights
    # (empty: uniform, sized when the model's layer count is known) and the scale.
    layer_weights: tuple[float, ...] | None = None
    layer_scale: float = 1.0

    def describe(self) -> str:
        """e.g. ``mean@last, normalized`` or ``first@last, Dense 384->128 Tanh``."""
        parts = [str(self.strategy)]
        if self.layer_weights:
            weights = ", ".join(f"{weight:.3g}" for weight in self.layer_weights)
            parts[0] += f" (layer weights {weights}, scale {self.layer_scale:.3g})"
        parts += [
            f"Dense {d.weight.shape[1]}->{d.weight.shape[0]} {d.activation}" for d in self.dense
        ]
        if self.normalize:
            parts.append("normalized")
        return ", ".join(parts)

    def apply(self, pooled: np.ndarray) -> np.ndarray:
        """Dense layers then Normalize on pooled ``[N, D]`` float32 rows."""
        result = pooled
        for dense in self.dense:
            result = dense.apply(result)
        if self.normalize:
            result = normalize_rows(result)
        return np.asarray(result, dtype=np.float32)


def normalize_rows(rows: np.ndarray) -> np.ndarray:
    """``[N, D]`` rows scaled to unit L2 norm, as sentence-transformers' Normalize does
    (torch's ``F.normalize``: norms below 1e-12 count as 1e-12, so zero rows stay zero).

    >>> normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    array([[0.6, 0.8],
           [0. , 0. ]])
    """
    norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    scaled: np.ndarray = rows / norms
    return scaled


def truncate_dimensions(rows: np.ndarray, dimensions: int, renormalize: bool) -> np.ndarray:
    """The first ``dimensions`` values of each ``[N, D]`` row, scaled back to unit length
    when ``renormalize`` (rows that were normalized before the cut); ValueError when
    ``dimensions`` exceeds ``D``.

    >>> truncate_dimensions(np.array([[0.6, 0.0, 0.8]], np.float32), 2, True)
    array([[1., 0.]], dtype=float32)
    """
    width = rows.shape[1]
    if dimensions > width:
        raise ValueError(f"dimensions: {dimensions} is more than the embedding's {width} values")
    cut = np.ascontiguousarray(rows[:, :dimensions], dtype=np.float32)
    return normalize_rows(cut) if renormalize else cut


# The type names modules.json gives hiddenpool's own HiddenPooling (the first before the
# package had its integrations/ folder).
HIDDEN_POOLING_TYPES = (
    "hiddenpool._st_module.HiddenPooling",
    "hiddenpool.integrations.st_module.HiddenPooling",
)


def _kind(type_name: str) -> str:
    """The module kind from either spelling of its type (last dotted component)."""
    return type_name.rsplit(".", 1)[-1]


def read_pipeline(folder: str | os.PathLike[str]) -> Pipeline | None:
    """The pipeline of a sentence-transformers folder, or None without ``modules.json``."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "modules.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        modules = json.load(handle)
    if not isinstance(modules, list):
        raise ValueError(f"model: {path} is not a list of modules")
    strategy: Strategy | None = None
    include_prompt = True
    dense: list[Dense] = []
    normalize = False
    mix: tuple[tuple[float, ...] | None, float] = (None, 1.0)
    for position, module in enumerate(sorted(modules, key=lambda item: item.get("idx", 0))):
        kind = _kind(str(module.get("type", "")))
        module_path = os.path.join(folder, str(module.get("path", "")))
        if kind == "Transformer" and position == 0:
            continue
        if kind == "Pooling" and strategy is None and not dense and not normalize:
            config = _read_json(os.path.join(module_path, "config.json"))
            strategy = pooling_strategy(config)
            include_prompt = bool(config.get("include_prompt", True))
        elif (
            str(module.get("type")) in HIDDEN_POOLING_TYPES
            and strategy is None
            and not dense
            and not normalize
        ):
            config = _read_json(os.path.join(module_path, "config.json"))
            strategy, mix = _hidden_pooling(config, path)
            include_prompt = bool(config.get("include_prompt", True))
        elif kind == "Dense" and strategy is not None and not normalize:
            dense.append(_read_dense(module_path))
        elif kind == "Normalize" and strategy is not None:
            normalize = True
        else:
            raise ValueError(
                f"model: {path} lists {module.get('type')!r} at position {position}, which "
                "hiddenpool cannot run there; it runs Transformer, then Pooling, then any "
                "Dense modules, then Normalize"
            )
    if strategy is None:
        raise ValueError(f"model: {path} has no Pooling module")
    return Pipeline(strategy, tuple(dense), normalize, include_prompt, mix[0], mix[1])


def _hidden_pooling(
    config: dict[str, Any], path: str
) -> tuple[Strategy, tuple[tuple[float, ...] | None, float]]:
    """The strategy and ScalarMix of a saved HiddenPooling module's config."""
    text = config.get("strategy", "mean@last")
    if not isinstance(text, str):
        raise ValueError(f"model: {path}: HiddenPooling's strategy is not a string")
    strategy = Strategy.parse(text)
    weights = config.get("layer_weights")
    scale = config.get("layer_scale", 1.0)
    if strategy.combine != "weighted":
        return strategy, (None, 1.0)
    if weights is None:
        weights = []
    if not isinstance(weights, list) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights
    ):
        raise ValueError(f"model: {path}: HiddenPooling's layer_weights is not a list of numbers")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"model: {path}: HiddenPooling's layer_scale is not a number")
    return strategy, (tuple(float(w) for w in weights), float(scale))


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        value = json.load(handle)
    if not isinstance(value, dict):
        raise ValueError(f"model: {path} is not a JSON object")
    return value


def _read_dense(folder: str) -> Dense:
    config = _read_json(os.path.join(folder, "config.json"))
    activation_path = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    activation = activation_path.rsplit(".", 1)[-1]
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"model: {folder} uses activation {activation_path}; hiddenpool runs "
            f"{', '.join(ACTIVATIONS)}"
        )
    tensors = _read_weights(folder)
    weight = tensors["linear.weight"].astype(np.float32)
    bias = tensors.get("linear.bias")
    residual: np.ndarray | bool = False
    if config.get("use_residual"):
        residual = (
            tensors["residual.weight"].astype(np.float32) if "residual.weight" in tensors else True
        )
    return Dense(weight, None if bias is None else bias.astype(np.float32), activation, residual)


def _read_weights(folder: str) -> dict[str, np.ndarray]:
    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        return read_safetensors(path)
    legacy = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(legacy):
        import torch

        state = torch.load(legacy, map_location="cpu", weights_only=True)
        return {name: value.float().numpy() for name, value in state.items()}
    raise ValueError(f"model: {folder} holds neither model.safetensors nor pytorch_model.bin")


_SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file as numpy arrays (bfloat16 widened to float32):
    an 8-byte little-endian header length, a JSON header of names, dtypes, shapes and byte
    offsets, then the data."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        data = handle.read()
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"model: {path}: tensor {name} has dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=dtype).reshape(entry["shape"])
        if entry["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array.copy()
    return tensors


def pooling_config(strategy: str | Strategy, embedding_dimension: int) -> dict[str, Any]:
    """The stock sentence-transformers Pooling config (legacy boolean keys, which every
    sentence-transformers version, TEI and vLLM read) that pools as ``strategy`` does, or
    a ValueError saying why none can: the stock module pools the last layer only, and
    concatenates its modes in a fixed order (cls, max, mean, mean_sqrt_len, weighted_mean,
    last).

    >>> pooling_config("cls+mean@last", 384)["pooling_mode_cls_token"]
    True
    """
    parsed = Strategy.parse(strategy) if isinstance(strategy, str) else strategy
    if parsed.layers != ("last",) or parsed.combine is not None:
        raise ValueError(f"strategy {parsed}: the stock Pooling module reads the last layer only")
    flag_of = {pool: flag for _, flag, pool in MODES}
    flag_of["first"] = flag_of["cls"]
    unknown = [pool for pool in parsed.pools if pool not in flag_of]
    if unknown:
        raise ValueError(f"strategy {parsed}: the stock Pooling module has no {unknown[0]!r} mode")
    order = [flag for _, flag, _ in MODES]
    flags = [flag_of[pool] for pool in parsed.pools]
    if flags != sorted(flags, key=order.index) or len(set(flags)) != len(flags):
        raise ValueError(
            f"strategy {parsed}: the stock Pooling module concatenates in the order cls, max, "
            "mean, mean_sqrt_len, weighted_mean, last; write the pools in that order"
        )
    config: dict[str, Any] = {"word_embedding_dimension": int(embedding_dimension)}
    config.update({flag: flag in flags for _, flag, _ in MODES})
    return config
