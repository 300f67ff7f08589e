"""``HiddenPooling``: a sentence-transformers module that pools with hiddenpool. Imported
on first use of ``hiddenpool.sentence_transformers.HiddenPooling`` (it needs torch and
sentence-transformers, which ``import hiddenpool`` never imports)."""

from __future__ import annotations

from typing import Any, Literal

from sentence_transformers.base.modules.module import Module

from hiddenpool.ops import pool
from hiddenpool.strategy import Strategy


class HiddenPooling(Module):
    """Pools the Transformer module's output with a hiddenpool strategy, in place of the
    stock ``Pooling``: ``SentenceTransformer(modules=[Transformer(path),
    HiddenPooling("mean@last4:concat", embedding_dimension=384)])``.

    CPU tensors without gradients go to the Rust kernels; other devices and tensors that
    require grad take the torch path (autograd kept). Strategies on layers other than the
    last turn the Transformer's hidden states on when the model is built. ``eos`` uses the
    tokenizer's EOS token. Saved as this module with its strategy (loads back with
    ``trust_remote_code=True``)."""

    config_keys: list[str] = ["strategy", "embedding_dimension"]  # noqa: RUF012 (the base's type)

    def __init__(self, strategy: str = "mean@last", embedding_dimension: int | None = None):
        super().__init__()  # type: ignore[no-untyped-call]
        parsed = Strategy.parse(strategy)
        if parsed.combine == "weighted":
            raise ValueError(
                f"strategy {strategy}: ':weighted' needs layer weights, which this module "
                "does not hold; use sum, mean or concat"
            )
        self.strategy = strategy
        self.embedding_dimension = embedding_dimension
        self._parsed = parsed
        self._eos_token_id: int | None = None
        self._state_count: int | None = None

    def on_model_ready(self, model: Any) -> None:
        first = model[0]
        inner = getattr(first, "auto_model", None) or getattr(first, "model", None)
        config = getattr(inner, "config", None)
        if self._parsed.layers != ("last",) and config is not None:
            config.output_hidden_states = True
        if self.embedding_dimension is None and config is not None:
            self.embedding_dimension = getattr(config, "hidden_size", None)
        layers = getattr(config, "num_hidden_layers", None)
        self._state_count = layers + 1 if isinstance(layers, int) else None
        if self._state_count is not None:
            self._parsed.resolve_layers(self._state_count)  # a bad layer index fails here
        tokenizer = getattr(model, "tokenizer", None)
        self._eos_token_id = getattr(tokenizer, "eos_token_id", None)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        last = features["token_embeddings"]
        mask = features["attention_mask"]
        if self._parsed.layers == ("last",):
            states: Any = [last]
        else:
            every = features.get("all_layer_embeddings")
            if every is None:
                raise ValueError(
                    f"strategy {self.strategy}: the Transformer module returned no hidden "
                    "states; build the model with this module in it (the hidden states are "
                    "turned on then) or set output_hidden_states in its config"
                )
            states = [*list(every)[:-1], last]
        backend: Literal["auto", "torch"] = (
            "torch" if last.requires_grad or last.device.type != "cpu" else "auto"
        )
        pooled = pool(
            states,
            mask,
            self.strategy,
            input_ids=features.get("input_ids"),
            eos_token_id=self._eos_token_id,
            backend=backend,
        )
        features["sentence_embedding"] = pooled.to(last.dtype)
        return features

    def get_sentence_embedding_dimension(self) -> int | None:
        if self.embedding_dimension is None:
            return None
        width = len(self._parsed.pools) * self.embedding_dimension
        if self._parsed.combine == "concat":
            if self._state_count is None:
                return None  # known once the model is built
            width *= len(self._parsed.resolve_layers(self._state_count))
        return width

    def get_embedding_dimension(self) -> int | None:
        return self.get_sentence_embedding_dimension()

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        self.save_config(output_path)


__all__ = ["HiddenPooling"]
