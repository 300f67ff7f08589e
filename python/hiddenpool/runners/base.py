"""The seam between the encoder and whatever computes hidden states.

A runner takes padded token batches (numpy ``[B, T]`` int64 ids, mask, type ids) and
returns hidden states that ``hiddenpool.pool`` reads; tokenization, batching, ordering,
truncation counting, progress and output stay in ``Encoder``. Two runners exist:
``TorchRunner`` (transformers models) and ``OnnxRunner`` (ONNX Runtime, no torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from hiddenpool.runners.tokens import TextTokenizer, TokenBatch
from hiddenpool.strategy import Strategy

Family = Literal["encoder", "encoder-decoder", "clip", "decoder"]
EosRule = Literal["first", "argmax"]


class Runner(Protocol):
    family: Family
    max_length: int
    eos_token_id: int | None
    # "argmax": old CLIP configs (eos_token_id 2) take the highest id of each row, as
    # transformers does for them; "first": the first position of eos_token_id.
    eos_rule: EosRule
    projects: bool  # CLIP text projection applied to pooled rows

    @property
    def tokenizer(self) -> TextTokenizer: ...

    def state_count(self) -> int:
        """L + 1: the embedding output and one state per layer."""
        ...

    def check(self, strategies: Mapping[str, Strategy]) -> None:
        """Raises ValueError when a strategy (keyed by its text as given) needs a state this
        runner cannot give."""
        ...

    def run(self, batch: TokenBatch, states: frozenset[int]) -> Any:
        """Hidden states of ``batch`` as ``hiddenpool.pool`` reads them; only the state
        indices in ``states`` (0..L) need to be filled."""
        ...

    def finish(self, pooled: Any) -> np.ndarray:
        """A pooled ``[B, D]`` result as float32 numpy, projected where ``projects``."""
        ...


def decoder_positions(mask: np.ndarray) -> np.ndarray:
    """Positions counting real tokens only, so a left-padded text sees the positions it
    would see alone (``[B, T]`` int64; 0 at padding before the first real token).

    >>> decoder_positions(np.array([[0, 0, 1, 1], [1, 1, 1, 0]]))
    array([[0, 0, 0, 1],
           [0, 1, 2, 2]])
    """
    return np.maximum(np.cumsum(mask != 0, axis=1, dtype=np.int64) - 1, 0)


# Model types whose position ids start after the padding index (RoBERTa's scheme): their
# table holds max_position_embeddings rows, of which pad_token_id + 1 are never a text's.
_OFFSET_POSITIONS = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet"}
    | {"data2vec-text"}
)


def position_limit(config: Mapping[str, Any]) -> int | None:
    """How many tokens a model's position table can place (``config.json`` as a dict; a CLIP
    config's ``text_config`` is read), or None where positions are relative (T5) or the
    config does not say. A ``max_length`` above it fails inside the model's forward pass.

    >>> position_limit({"model_type": "bert", "max_position_embeddings": 512})
    512
    >>> position_limit({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1})
    512
    >>> position_limit({"model_type": "t5", "d_model": 512}) is None
    True
    """
    text = config.get("text_config") or config
    if not isinstance(text, Mapping):
        return None
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    for key in ("max_position_embeddings", "n_positions"):
        value = text.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1_000_000:
            break
    else:
        return None
    if model_type in _OFFSET_POSITIONS:
        pad = text.get("pad_token_id")
        value -= (pad if isinstance(pad, int) and 0 <= pad < value else 1) + 1
    return value


def check_max_length(max_length: int | None, limit: int | None, model: str) -> None:
    """A ``max_length`` asked for above the model's ``position_limit`` is a ValueError
    naming the limit (before any weight is loaded, where the caller can)."""
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(
            f"max_length: {max_length} is over the {limit} token positions the model ({model}) "
            f"has; give at most {limit}"
        )


def needed_states(strategies: Sequence[Strategy], state_count: int) -> frozenset[int]:
    """The state indices (0..L) the strategies read."""
    return frozenset(
        index % state_count
        for strategy in strategies
        for index in strategy.resolve_layers(state_count)
    )
