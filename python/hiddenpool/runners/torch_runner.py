"""Hidden states from Hugging Face transformers models on torch.

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
from collections.abc import Mapping
from typing import Any

import numpy as np

from hiddenpool.runners.base import (
    EosRule,
    Family,
    check_max_length,
    decoder_positions,
    position_limit,
)
from hiddenpool.runners.tokens import TokenBatch, TransformersTokenizer
from hiddenpool.strategy import Strategy


def family_of(model: Any) -> Family:
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


class TorchRunner:
    """Runs the text part of a transformers model: ``module`` is the model itself, the
    encoder of an encoder-decoder, or CLIP's text transformer."""

    backend = "torch"
    runtime = "torch"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        project: bool = False,
    ) -> None:
        self.model = model.eval()
        self.family: Family = family_of(model)
        self.projection: Any = None
        if self.family == "clip":
            self.module = getattr(model, "text_model", model)
            if project:
                self.projection = getattr(model, "text_projection", None)
                if self.projection is None:
                    raise ValueError(
                        f"project: {type(model).__name__} has no text_projection; load "
                        "CLIPModel or CLIPTextModelWithProjection"
                    )
            text_config = getattr(model.config, "text_config", model.config)
            self.eos_token_id: int | None = text_config.eos_token_id
        else:
            if project:
                raise ValueError("project: only CLIP models have a text projection")
            self.module = model.get_encoder() if self.family == "encoder-decoder" else model
            self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_rule: EosRule = (
            "argmax" if self.family == "clip" and self.eos_token_id == 2 else "first"
        )
        self.projects = self.projection is not None
        accepted = set(inspect.signature(self.module.forward).parameters)
        if "input_ids" not in accepted:
            raise ValueError(
                f"model: {type(model).__name__} (model_type "
                f"{getattr(model.config, 'model_type', '?')!r}) takes no input_ids, so it is not "
                "a text model hiddenpool can encode with; supported: encoder-only (BERT-like), "
                "encoder-decoder (T5, BART: the encoder), CLIP text towers, decoder-only (GPT-2)"
            )
        self.accepted = accepted
        if self.family == "decoder" and tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer: has neither a pad token nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        self.transformers_tokenizer = tokenizer
        config = getattr(self.module, "config", model.config)
        self.max_positions = position_limit(config.to_dict())
        check_max_length(max_length, self.max_positions, str(config.model_type or "the model"))
        self.max_length = max_length or self._default_max_length(tokenizer)
        if self.max_length < 1:
            raise ValueError(f"max_length: expected a positive integer, got {self.max_length}")
        # Type ids go in where both the model takes them and the tokenizer makes them (GPT-2
        # takes them, but would add a token embedding to every position).
        makes_type_ids = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        self.tokenizer = TransformersTokenizer(
            tokenizer,
            self.max_length,
            wants_type_ids="token_type_ids" in accepted and makes_type_ids,
        )
        self._state_count: int | None = None

    def _default_max_length(self, tokenizer: Any) -> int:
        limits = [getattr(tokenizer, "model_max_length", None)]
        config = getattr(self.module, "config", self.model.config)
        limits.append(getattr(config, "max_position_embeddings", None))
        usable = [int(limit) for limit in limits if limit and limit < 1_000_000]
        return min(usable) if usable else 512

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def state_count(self) -> int:
        if self._state_count is None:
            # Counted from one forward pass on one token: configs name the layer count
            # differently per family, and the outputs are what pooling reads.
            probe = TokenBatch(
                [0],
                np.full((1, 1), self.tokenizer.pad_id, np.int64),
                np.ones((1, 1), np.int64),
                None,
            )
            self._state_count = len(self._forward(probe, all_states=True).hidden_states)
        return self._state_count

    def check(self, strategies: Mapping[str, Strategy]) -> None:
        count = self.state_count()
        for strategy in strategies.values():
            strategy.resolve_layers(count)

    def run(self, batch: TokenBatch, states: frozenset[int]) -> Any:
        last = self.state_count() - 1
        if states - {last}:
            return self._forward(batch, all_states=True)
        # Only the last state: without the other states' outputs, but as a list of L + 1
        # (the others absent), so a strategy naming it by its index (mean@6 of six layers)
        # resolves as it does with every state; the ModelOutput alone read as one state.
        output = self._forward(batch, all_states=False)
        return [None] * last + [output.last_hidden_state]

    def _forward(self, batch: TokenBatch, all_states: bool) -> Any:
        import torch

        device = self.device
        mask = torch.from_numpy(batch.mask).to(device)
        arguments: dict[str, Any] = {
            "input_ids": torch.from_numpy(batch.ids).to(device),
            "attention_mask": mask,
            "return_dict": True,
        }
        if batch.type_ids is not None and "token_type_ids" in self.accepted:
            arguments["token_type_ids"] = torch.from_numpy(batch.type_ids).to(device)
        if self.family == "decoder" and "position_ids" in self.accepted:
            arguments["position_ids"] = torch.from_numpy(decoder_positions(batch.mask)).to(device)
        if all_states:
            arguments["output_hidden_states"] = True
        with torch.inference_mode():
            return self.module(**arguments)

    def finish(self, pooled: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self.projection is not None:
                pooled = self.projection(pooled.to(self.projection.weight.dtype))
            result: np.ndarray = pooled.float().cpu().numpy()
        return result


def load(
    path: str,
    *,
    device: str | None,
    dtype: Any,
    max_length: int | None,
    project: bool,
    model_kwargs: dict[str, Any],
) -> TorchRunner:
    """The tokenizer and the right model class for ``path``: the text tower for CLIP, the
    encoder for encoder-decoders, the model itself otherwise."""
    import torch
    import transformers

    # hiddenpool never downloads: a name is looked up in the local Hugging Face cache only
    # (transformers would otherwise retry the hub for half a minute before failing).
    local = bool(model_kwargs.pop("local_files_only", True))
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=local)
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
    elif getattr(config, "is_encoder_decoder", False) or any(
        # sentence-transformers saves T5's encoder alone (sentence-t5, GTR): the config then
        # says is_encoder_decoder false, and AutoModel would build the whole T5Model.
        name.endswith("EncoderModel")
        for name in getattr(config, "architectures", None) or []
    ):
        from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

        model_class = (
            transformers.AutoModelForTextEncoding
            if model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES
            else transformers.AutoModel
        )
    else:
        model_class = transformers.AutoModel
    model = model_class.from_pretrained(path, local_files_only=local, **model_kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=local)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    if max_length is None:
        max_length = sentence_transformers_max_length(path)
    return TorchRunner(model, tokenizer, max_length=max_length, project=project)


def sentence_transformers_max_length(path: str) -> int | None:
    """``max_seq_length`` of a sentence-transformers folder, so encodings match its own."""
    config_path = os.path.join(path, "sentence_bert_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as handle:
        value = json.load(handle).get("max_seq_length")
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
