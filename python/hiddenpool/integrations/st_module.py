"""``HiddenPooling``: a sentence-transformers module that pools with hiddenpool. Imported
on first use of ``hiddenpool.sentence_transformers.HiddenPooling`` (it needs torch and
sentence-transformers, which ``import hiddenpool`` never imports)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from sentence_transformers.base.modules.module import Module

from hiddenpool.ops import keep_prompt_weights, pool, without_leading_tokens
from hiddenpool.strategy import Strategy


class HiddenPooling(Module):
    """Pools the Transformer module's output with a hiddenpool strategy, in place of the
    stock ``Pooling``: ``SentenceTransformer(modules=[Transformer(path),
    HiddenPooling("mean@last4:concat", embedding_dimension=384)])``.

    CPU tensors without gradients go to the Rust kernels; other devices and tensors that
    require grad take the torch path (autograd kept). Strategies on layers other than the
    last turn the Transformer's hidden states on when the model is built. ``eos`` uses the
    tokenizer's EOS token. ``:weighted`` strategies learn their layer weights (ScalarMix:
    ``layer_scale * softmax(layer_weights)``, both parameters, saved with the module).
    ``include_prompt=False`` leaves the prompt's tokens out (``encode(..., prompt=...)``),
    as the stock module does. The flattened input of unpadded attention
    (``cu_seq_lens_q``) is read too. Saved as this module with its strategy (loads back
    with ``trust_remote_code=True``); ``save_portable`` saves a stock ``Pooling`` instead
    where one can pool the same way."""

    config_keys: list[str] = [  # noqa: RUF012 (the base's type)
        "strategy",
        "embedding_dimension",
        "include_prompt",
        "layer_weights",
        "layer_scale",
    ]

    def __init__(
        self,
        strategy: str = "mean@last",
        embedding_dimension: int | None = None,
        include_prompt: bool = True,
        layer_weights: Sequence[float] | None = None,
        layer_scale: float = 1.0,
    ):
        super().__init__()  # type: ignore[no-untyped-call]
        import torch

        parsed = Strategy.parse(strategy)
        if parsed.combine != "weighted" and layer_weights is not None:
            raise ValueError(f"layer_weights: strategy {strategy} does not end in ':weighted'")
        self.strategy = strategy
        self.embedding_dimension = embedding_dimension
        self.include_prompt = bool(include_prompt)
        self._parsed = parsed
        self._eos_token_id: int | None = None
        self._state_count: int | None = None
        self.mix_weights: Any = None
        self.mix_scale: Any = None
        if parsed.combine == "weighted":
            # The layer count may be unknown until the model is built: weights start empty
            # (uniform) and take their size in on_model_ready unless given.
            initial = torch.tensor(list(layer_weights or []), dtype=torch.float32)
            self.mix_weights = torch.nn.Parameter(initial)
            self.mix_scale = torch.nn.Parameter(torch.tensor(float(layer_scale)))

    @property
    def layer_weights(self) -> list[float] | None:
        return None if self.mix_weights is None else [float(w) for w in self.mix_weights.detach()]

    @property
    def layer_scale(self) -> float:
        return 1.0 if self.mix_scale is None else float(self.mix_scale.detach())

    def on_model_ready(self, model: Any) -> None:
        import torch

        first = model[0]
        inner = getattr(first, "auto_model", None) or getattr(first, "model", None)
        config = getattr(inner, "config", None)
        config = getattr(config, "text_config", None) or config
        if self._parsed.layers != ("last",) and config is not None:
            config.output_hidden_states = True
        if self.embedding_dimension is None and config is not None:
            size = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
            self.embedding_dimension = size
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
        self._state_count = layers + 1 if isinstance(layers, int) else None
        if self._state_count is not None:
            chosen = self._parsed.resolve_layers(self._state_count)  # a bad index fails here
            if self.mix_weights is not None and self.mix_weights.numel() == 0:
                with torch.no_grad():
                    self.mix_weights.data = torch.zeros(len(chosen), dtype=torch.float32)
            elif self.mix_weights is not None and self.mix_weights.numel() != len(chosen):
                raise ValueError(
                    f"layer_weights: {self.mix_weights.numel()} weights for the "
                    f"{len(chosen)} layers of {self.strategy}"
                )
        tokenizer = getattr(model, "tokenizer", None)
        self._eos_token_id = getattr(tokenizer, "eos_token_id", None)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        last = features["token_embeddings"]
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
        prompt = 0
        if not self.include_prompt and "prompt_length" in features:
            length = features["prompt_length"]
            prompt = int(length.reshape(-1)[0]) if hasattr(length, "reshape") else int(length)
        input_ids = features.get("input_ids")
        if "cu_seq_lens_q" in features:
            states, mask, input_ids = _unflatten(states, features["cu_seq_lens_q"], input_ids)
        else:
            mask = features.get("attention_mask")
            if mask is None or mask.shape[-1] != last.shape[1]:
                mask = last.new_ones(last.shape[:2], dtype=_int64())
        full_mask = mask
        if prompt:
            mask = without_leading_tokens(mask, prompt)
        pooled = self._pool(states, mask, input_ids, full_mask if prompt else None)
        features["sentence_embedding"] = pooled.to(last.dtype)
        return features

    def _pool(self, states: list[Any], mask: Any, input_ids: Any, full_mask: Any = None) -> Any:
        """The strategy's rows; with ``full_mask`` (a prompt left out of ``mask``), each
        weighted mean keeps its tokens' ranks in the whole text, as the stock module
        keeps their position weights."""
        last = states[-1]
        learning = self.mix_weights is not None and self.mix_weights.requires_grad
        torch_path = last.requires_grad or last.device.type != "cpu"
        if self.mix_weights is not None and (learning and (torch_path or self.training)):
            # The layer mix as torch operations, so gradients reach the weights; the pools
            # then read one mixed layer (the pool of a weighted sum is taken per token).
            chosen = self._parsed.resolve_layers(len(states))
            weights = self.mix_scale * self.mix_weights.softmax(dim=0)
            mixed = sum(weights[i] * states[index] for i, index in enumerate(chosen))
            pools = "+".join(self._parsed.pools)
            mixed_options: dict[str, Any] = {
                "input_ids": input_ids,
                "eos_token_id": self._eos_token_id,
                "backend": "torch",
            }
            rows = pool([mixed], mask, f"{pools}@last", **mixed_options)
            if full_mask is None:
                return rows
            return keep_prompt_weights(
                rows, [mixed], mask, full_mask, f"{pools}@last", **mixed_options
            )
        backend: Literal["auto", "torch"] = "torch" if torch_path else "auto"
        options: dict[str, Any] = {}
        if self.mix_weights is not None:
            options = {"layer_weights": self.layer_weights, "layer_scale": self.layer_scale}
        options.update(input_ids=input_ids, eos_token_id=self._eos_token_id, backend=backend)
        rows = pool(states, mask, self.strategy, **options)
        if full_mask is None:
            return rows
        return keep_prompt_weights(rows, states, mask, full_mask, self.strategy, **options)

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

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "strategy": self.strategy,
            "embedding_dimension": self.embedding_dimension,
            "include_prompt": self.include_prompt,
        }
        if self.mix_weights is not None:
            config["layer_weights"] = self.layer_weights
            config["layer_scale"] = self.layer_scale
        return config

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        self.save_config(output_path)


def _int64() -> Any:
    import torch

    return torch.int64


def _unflatten(states: list[Any], offsets: Any, input_ids: Any) -> tuple[list[Any], Any, Any]:
    """Flattened ``[1, N, H]`` states (unpadded attention) and their ``cu_seq_lens_q``
    offsets as right-padded ``[B, T, H]`` states, mask and ids (a copy: the torch path and
    the eos pool read padded rows)."""
    import torch

    offsets = offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    rows, width = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(width, device=offsets.device)
    mask = positions[None, :] < lengths[:, None]
    source = (offsets[:-1, None] + positions[None, :])[mask]

    def padded(flat: Any) -> Any:
        flat = flat.reshape(-1, *flat.shape[2:]) if flat.dim() >= 2 else flat
        out = flat.new_zeros((rows, width, *flat.shape[1:]))
        out[mask.to(flat.device)] = flat[source.to(flat.device)]
        return out

    ids = padded(input_ids.reshape(1, -1)) if input_ids is not None else None
    return [padded(state) if state is not None else None for state in states], mask, ids


__all__ = ["HiddenPooling"]
