"""Hidden states from an ONNX graph on ONNX Runtime: onnxruntime, the ``tokenizers``
package and numpy only; neither torch nor transformers is imported.

Folders it loads:

- made by ``hiddenpool export`` (``hiddenpool-onnx.json`` beside the graph): outputs
  ``last_hidden_state`` and ``hidden_state_0`` .. ``hidden_state_{L-1}``, so every strategy
  works;
- made by others (sentence-transformers' ``onnx/model.onnx``, optimum exports): a
  ``model.onnx`` whose only hidden-state output is ``last_hidden_state`` (or
  ``token_embeddings``), with ``tokenizer.json`` and ``config.json`` beside it. Strategies
  on the last layer work; others are refused with the outputs the graph has.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hiddenpool import _native
from hiddenpool.runners.base import (
    EosRule,
    Family,
    check_max_length,
    decoder_positions,
    position_limit,
)
from hiddenpool.runners.tokens import JsonTokenizer, TokenBatch
from hiddenpool.strategy import Strategy

MANIFEST = "hiddenpool-onnx.json"
FORMAT = 1
LAST_OUTPUTS = ("last_hidden_state", "token_embeddings")


def state_output(index: int, state_count: int) -> str:
    """The graph output holding hidden state ``index`` (0..L) in an exported folder."""
    return "last_hidden_state" if index == state_count - 1 else f"hidden_state_{index}"


@dataclass
class Manifest:
    """What the runner needs to know about an ONNX folder besides the graph."""

    family: Family
    graph: str  # file name inside the folder
    state_count: int | None  # L + 1; None when unknown (a foreign graph without config)
    max_length: int
    pad_token_id: int
    padding_side: Literal["left", "right"]
    truncation_side: Literal["left", "right"]
    unk_token_id: int | None
    eos_token_id: int | None
    eos_rule: EosRule
    positions_from_mask: bool
    projection: str | None = None  # .npy file of the CLIP text projection, [P, H]
    weights: str = "float32"
    hidden_size: int | None = None
    model_type: str = ""
    source_pooling: dict[str, Any] | None = None
    # Tokens the position table can place (``runners.base.position_limit``); None for
    # relative positions and for folders exported before it was recorded.
    max_positions: int | None = None
    exported: bool = True  # False: a foreign graph with only the last state

    def as_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: v for k, v in self.__dict__.items() if k != "exported"}}


def is_onnx_folder(path: str) -> bool:
    """True for a folder the ONNX runner loads without an export."""
    return os.path.isfile(os.path.join(path, MANIFEST)) or _foreign_graph(path) is not None


def _foreign_graph(path: str) -> str | None:
    for relative in ("model.onnx", os.path.join("onnx", "model.onnx")):
        if os.path.isfile(os.path.join(path, relative)):
            return relative
    return None


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        value = json.load(handle)
    return value if isinstance(value, dict) else {}


def read_manifest(folder: str) -> Manifest:
    path = os.path.join(folder, MANIFEST)
    if os.path.isfile(path):
        data = _read_json(path)
        if data.get("format") != FORMAT:
            raise ValueError(
                f"model: {path} has format {data.get('format')!r}; this hiddenpool reads "
                f"format {FORMAT} (export the model again with this version)"
            )
        fields = {k: v for k, v in data.items() if k in Manifest.__dataclass_fields__}
        try:
            return Manifest(**fields)
        except TypeError as error:
            raise ValueError(
                f"model: {path} is incomplete ({error}); export the model again"
            ) from None
    graph = _foreign_graph(folder)
    if graph is None:
        raise ValueError(
            f"model: {folder} holds neither {MANIFEST} nor model.onnx; make one with "
            "`hiddenpool export MODEL --output DIR`"
        )
    return _foreign_manifest(folder, graph)


def _token_id(vocabulary: Any, value: Any) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        return None
    token_id = vocabulary.token_to_id(value)
    return int(token_id) if token_id is not None else None


def _foreign_manifest(folder: str, graph: str) -> Manifest:
    """A manifest inferred from config.json, tokenizer_config.json and the graph's place."""
    from tokenizers import Tokenizer

    config = _read_json(os.path.join(folder, "config.json"))
    tokenizer_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    special = _read_json(os.path.join(folder, "special_tokens_map.json"))
    tokenizer = Tokenizer.from_file(_tokenizer_path(folder))
    model_type = str(config.get("model_type", ""))
    text_config = config.get("text_config") or config
    architectures = " ".join(config.get("architectures") or [])
    if model_type in ("clip", "clip_text_model"):
        family: Family = "clip"
    elif config.get("is_encoder_decoder"):
        family = "encoder-decoder"
    elif "CausalLM" in architectures or "LMHead" in architectures:
        family = "decoder"
    else:
        family = "encoder"

    def token(name: str) -> int | None:
        return _token_id(tokenizer, tokenizer_config.get(name) or special.get(name))

    pad = token("pad_token")
    eos_token = token("eos_token")
    eos = (
        text_config.get("eos_token_id")
        if family == "clip"
        else (eos_token if eos_token is not None else config.get("eos_token_id"))
    )
    if pad is None:
        pad = eos if family == "decoder" and isinstance(eos, int) else 0
    limits = [
        tokenizer_config.get("model_max_length"),
        text_config.get("max_position_embeddings"),
        _read_json(os.path.join(folder, "sentence_bert_config.json")).get("max_seq_length"),
    ]
    usable = [
        int(limit)
        for limit in limits
        if isinstance(limit, (int, float)) and math.isfinite(limit) and 0 < limit < 1_000_000
    ]
    layers = text_config.get("num_hidden_layers") or text_config.get("num_layers")
    return Manifest(
        family=family,
        graph=graph,
        state_count=int(layers) + 1 if isinstance(layers, int) else None,
        max_length=min(usable) if usable else 512,
        pad_token_id=int(pad),
        padding_side="left" if tokenizer_config.get("padding_side") == "left" else "right",
        truncation_side="left" if tokenizer_config.get("truncation_side") == "left" else "right",
        unk_token_id=token("unk_token"),
        eos_token_id=int(eos) if isinstance(eos, int) else None,
        eos_rule="argmax" if family == "clip" and eos == 2 else "first",
        positions_from_mask=family == "decoder",
        model_type=model_type,
        hidden_size=text_config.get("hidden_size"),
        max_positions=position_limit(config),
        exported=False,
    )


def _tokenizer_path(folder: str) -> str:
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"model: {folder} has no tokenizer.json; the ONNX runner needs a fast tokenizer "
            "saved beside the graph"
        )
    return path


class GraphRunner:
    """An ONNX folder (see the module docstring) behind the runner seam: the manifest, the
    tokenizer, the projection and the checks, with the runtime left to a subclass
    (``OnnxRunner`` here, ``OpenVinoRunner`` in ``runners.openvino_runner``), which gives
    the graph's inputs and outputs and computes the named outputs of a feed."""

    runtime = "a runtime"

    def __init__(self, folder: str, *, max_length: int | None = None, project: bool = False):
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError(
                f"the {self.runtime} runner needs the tokenizers package ({error.name} is "
                "missing): pip install tokenizers"
            ) from None
        self.folder = folder
        self.manifest = manifest = read_manifest(folder)
        self.graph_path = os.path.join(folder, manifest.graph)
        if not os.path.isfile(self.graph_path):
            raise ValueError(f"model: {self.graph_path} does not exist")
        self.family = manifest.family
        check_max_length(max_length, manifest.max_positions, manifest.model_type or folder)
        self.max_length = max_length or manifest.max_length
        if self.max_length < 1:
            raise ValueError(f"max_length: expected a positive integer, got {self.max_length}")
        self.eos_token_id = manifest.eos_token_id
        self.eos_rule = manifest.eos_rule
        self.projection: np.ndarray | None = None
        if project:
            if manifest.projection is None:
                raise ValueError(
                    f"project: {folder} has no text projection (export a CLIPModel or "
                    "CLIPTextModelWithProjection to get one)"
                )
            self.projection = np.load(os.path.join(folder, manifest.projection))
        self.projects = self.projection is not None
        self._open()
        self.input_types = self._graph_inputs()
        self.input_names = list(self.input_types)
        self.output_names = self._graph_outputs()
        for required in ("input_ids", "attention_mask"):
            if required not in self.input_names:
                raise ValueError(
                    f"model: {self.graph_path} takes inputs {self.input_names}; expected "
                    "input_ids and attention_mask"
                )
        if manifest.exported:
            self.last_output = "last_hidden_state"
        else:
            found = [name for name in LAST_OUTPUTS if name in self.output_names]
            if not found:
                raise ValueError(
                    f"model: {self.graph_path} outputs {self.output_names}; none of them is a "
                    f"hidden state ({' or '.join(LAST_OUTPUTS)})"
                )
            self.last_output = found[0]
        self.tokenizer = JsonTokenizer(
            Tokenizer.from_file(_tokenizer_path(folder)),
            self.max_length,
            pad_id=manifest.pad_token_id,
            padding_side=manifest.padding_side,
            truncation_side=manifest.truncation_side,
            unknown_id=manifest.unk_token_id,
            wants_type_ids="token_type_ids" in self.input_names,
        )

    # What a runtime gives.

    def _open(self) -> None:
        """Reads ``self.graph_path`` where the runtime wants it read at once."""

    def _graph_inputs(self) -> dict[str, str]:
        """Input names and element types ("tensor(int64)", "tensor(int32)")."""
        raise NotImplementedError

    def _graph_outputs(self) -> list[str]:
        raise NotImplementedError

    def _compute(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs ``names`` of the graph on ``feed``."""
        raise NotImplementedError

    # The runner seam.

    def state_count(self) -> int:
        # A foreign graph of unknown depth exposes one state, which strategies can only
        # reach as "last" (checked in `check`).
        return self.manifest.state_count or 1

    def available(self) -> frozenset[int]:
        count = self.state_count()
        return frozenset(range(count)) if self.manifest.exported else frozenset({count - 1})

    def check(self, strategies: Mapping[str, Strategy]) -> None:
        count = self.state_count()
        available = self.available()
        for key, strategy in strategies.items():
            needed = {index % count for index in strategy.resolve_layers(count)}
            unknown_depth = self.manifest.state_count is None and strategy.layers != ("last",)
            if unknown_depth or not needed <= available:
                raise ValueError(
                    f"strategy {key}: needs hidden states other than the last, but "
                    f"{self.graph_path} outputs only {self.output_names}; export the "
                    "transformers model with `hiddenpool export MODEL --output DIR` to get "
                    "every layer"
                )

    def run(self, batch: TokenBatch, states: frozenset[int]) -> Any:
        count = self.state_count()
        wanted = sorted(states)
        names = [
            self.last_output if index == count - 1 else state_output(index, count)
            for index in wanted
        ]
        feed: dict[str, np.ndarray] = {"input_ids": batch.ids, "attention_mask": batch.mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = (
                batch.type_ids if batch.type_ids is not None else np.zeros_like(batch.ids)
            )
        if "position_ids" in self.input_names:
            feed["position_ids"] = decoder_positions(batch.mask)
        for name, value in feed.items():
            if self.input_types.get(name) == "tensor(int32)":
                feed[name] = value.astype(np.int32)
        outputs = self._compute(names, feed)
        hidden: list[Any] = [None] * count
        for index, value in zip(wanted, outputs, strict=True):
            hidden[index] = value
        return hidden

    def finish(self, pooled: Any) -> np.ndarray:
        result = np.asarray(pooled, dtype=np.float32)
        if self.projection is not None:
            result = result @ self.projection.T.astype(np.float32)
        return result


class OnnxRunner(GraphRunner):
    """Runs an ONNX folder on ONNX Runtime's CPU provider with
    ``hiddenpool.get_num_threads()`` threads (the session is rebuilt when that changes)."""

    backend = "onnx"
    runtime = "ONNX Runtime"
    precision = "fp32"  # of the computation; the weights may be int8 (manifest.weights)

    def __init__(self, folder: str, *, max_length: int | None = None, project: bool = False):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as error:
            raise ImportError(
                f"the ONNX runner needs onnxruntime and tokenizers ({error.name} is missing): "
                'pip install ".[onnx]" in a hiddenpool checkout'
            ) from None
        self._session: Any = None
        self._threads = 0
        self._spin = True
        self._arena = True
        super().__init__(folder, max_length=max_length, project=project)

    def _graph_inputs(self) -> dict[str, str]:
        return {item.name: item.type for item in self._current_session().get_inputs()}

    def _graph_outputs(self) -> list[str]:
        return [item.name for item in self._current_session().get_outputs()]

    def _compute(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._current_session().run(names, feed))

    @property
    def spin(self) -> bool:
        """Whether ONNX Runtime's threads spin between runs (its default: fastest for
        back-to-back batches). False makes them sleep, for a process whose other threads
        need the cores between runs (``hiddenpool serve``); the session is rebuilt."""
        return self._spin

    @spin.setter
    def spin(self, value: bool) -> None:
        if bool(value) != self._spin:
            self._spin = bool(value)
            self._session = None

    @property
    def memory_arena(self) -> bool:
        """Whether ONNX Runtime keeps freed buffers in its own arena (its default), which
        grows in steps to the largest batch shapes met and never shrinks. False allocates
        from the system each run, which with ``hiddenpool serve``'s trimming keeps a long-
        running server's memory flat, at no measured cost in speed (``benches/arena.py``,
        BENCHMARKS.md "Serving under load and faults"); the session is rebuilt."""
        return self._arena

    @memory_arena.setter
    def memory_arena(self, value: bool) -> None:
        if bool(value) != self._arena:
            self._arena = bool(value)
            self._session = None

    def _current_session(self) -> Any:
        threads = _native.get_num_threads()
        if self._session is None or threads != self._threads:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3  # errors only
            options.enable_cpu_mem_arena = self._arena
            if not self._spin:
                # Threads that sleep between runs instead of spinning: a server's event
                # loop shares the cores with them (spinning threads took its CPU between
                # small batches; benches/serve.py).
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = onnxruntime.InferenceSession(
                self.graph_path, options, providers=["CPUExecutionProvider"]
            )
            self._threads = threads
        return self._session
