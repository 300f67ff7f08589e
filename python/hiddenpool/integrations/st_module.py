"""``HiddenPooling``: a sentence-transformers module that pools with hiddenpool. Imported
on first use of ``hiddenpool.sentence_transformers.HiddenPooling`` (it needs torch and
sentence-transformers, which ``import hiddenpool`` never imports)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

try:  # sentence-transformers 6.x
    from sentence_transformers.base.modules.module import Module
    from sentence_transformers.sentence_transformer.modules import Pooling
except ImportError:  # 5.x
    from sentence_transformers.models import Module, Pooling  # type: ignore[no-redef]

from hiddenpool.ops import keep_prompt_weights, pool, without_leading_tokens
from hiddenpool.pooling_modes import MODES, config_pools
from hiddenpool.strategy import Strategy

# The stock constructor's legacy boolean arguments (pooling_mode_mean_tokens=True, ...).
LEGACY_FLAGS = tuple(flag for _, flag, _ in MODES)


# Typed as Any: the stock class's annotations (its mode literals, an int width) describe
# what it can pool, which HiddenPooling widens.
_StockPooling: Any = Pooling


class HiddenPooling(_StockPooling):  # type: ignore[misc]
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
    where one can pool the same way.

    A drop-in for the stock module: it subclasses it (so ``set_pooling_include_prompt``
    finds it), takes its constructor's arguments (``HiddenPooling(384, pooling_mode=
    "mean")``, the legacy ``pooling_mode_mean_tokens=True`` with the stock deprecation
    warning, ``word_embedding_dimension``), has its ``pooling_mode`` and
    ``pooling_output_dimension``, and reads ``features["cls_token_embeddings"]`` for
    ``cls`` and ``features["token_weights_sum"]`` (WordWeights) for ``mean`` and
    ``mean_sqrt_len`` on the last layer, as the stock module does."""

    config_keys: list[str] = [  # noqa: RUF012 (the base's type)
        "strategy",
        "embedding_dimension",
        "include_prompt",
        "layer_weights",
        "layer_scale",
    ]

    def __init__(
        self,
        strategy: str | int | None = None,
        embedding_dimension: int | None = None,
        include_prompt: bool = True,
        layer_weights: Sequence[float] | None = None,
        layer_scale: float = 1.0,
        *,
        pooling_mode: str | Sequence[str] | None = None,
        word_embedding_dimension: int | None = None,
        **legacy_flags: bool,
    ):
        # The stock Pooling's checks know only its own modes: the base Module is set up
        # directly, and the stock attributes are filled in below.
        Module.__init__(self)  # type: ignore[no-untyped-call]
        import torch

        strategy, embedding_dimension = _stock_arguments(
            strategy, embedding_dimension, pooling_mode, word_embedding_dimension, legacy_flags
        )
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
        stock = {pool: name for name, _, pool in MODES}
        stock["first"] = "cls"
        names = [stock.get(pool, pool) for pool in parsed.pools]
        # The stock attribute: one mode name, or a tuple of them (hiddenpool's pool names
        # where the stock module has none).
        self.pooling_mode: str | tuple[str, ...] = names[0] if len(names) == 1 else tuple(names)
        if parsed.combine == "weighted":
            # The layer count may be unknown until the model is built: weights start empty
            # (uniform) and take their size in on_model_ready unless given.
            initial = torch.tensor(list(layer_weights or []), dtype=torch.float32)
            self.mix_weights = torch.nn.Parameter(initial)
            self.mix_scale = torch.nn.Parameter(torch.tensor(float(layer_scale)))

    @property
    def pooling_output_dimension(self) -> int | None:
        """The stock attribute: the width of the pooled rows (None until it is known)."""
        return self.get_sentence_embedding_dimension()

    @pooling_output_dimension.setter
    def pooling_output_dimension(self, value: int | None) -> None:
        pass  # computed from the strategy and the model; the stock module assigns it

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
        pooled = self._stock_features(pooled, mask, features)
        features["sentence_embedding"] = pooled.to(last.dtype)
        return features

    def _stock_features(self, pooled: Any, mask: Any, features: dict[str, Any]) -> Any:
        """What other modules hand the stock Pooling, used as it uses them (last layer
        only): ``cls_token_embeddings`` is the ``cls`` part; ``token_weights_sum`` replaces
        the token count of ``mean`` and ``mean_sqrt_len``."""
        import torch

        cls_rows = features.get("cls_token_embeddings")
        weights_sum = features.get("token_weights_sum")
        if (cls_rows is None and weights_sum is None) or self._parsed.layers != ("last",):
            return pooled
        width = pooled.shape[1] // len(self._parsed.pools)
        count = (mask != 0).sum(dim=1, keepdim=True).to(torch.float32).clamp(min=1e-9)
        parts = []
        for index, name in enumerate(self._parsed.pools):
            part = pooled[:, index * width : (index + 1) * width]
            if name == "first" and cls_rows is not None:
                part = cls_rows.to(part.dtype)
            elif name in ("mean", "mean_sqrt_len") and weights_sum is not None:
                weights = weights_sum.reshape(-1, 1).to(torch.float32).clamp(min=1e-9)
                if name == "mean":
                    part = (part.float() * count / weights).to(part.dtype)
                else:
                    part = (part.float() * count.sqrt() / weights.sqrt()).to(part.dtype)
            parts.append(part)
        return torch.cat(parts, dim=1)

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


def _stock_arguments(
    strategy: str | int | None,
    embedding_dimension: int | None,
    pooling_mode: str | Sequence[str] | None,
    word_embedding_dimension: int | None,
    legacy_flags: dict[str, bool],
) -> tuple[str, int | None]:
    """The strategy and width from either constructor: hiddenpool's
    (``HiddenPooling("mean@last4:sum", 384)``) or the stock module's (``(384,
    pooling_mode="mean")``, legacy ``pooling_mode_*_tokens=True`` flags)."""
    unknown = [name for name in legacy_flags if name not in LEGACY_FLAGS]
    if unknown:
        raise TypeError(f"HiddenPooling() got an unexpected keyword argument {unknown[0]!r}")
    if isinstance(strategy, int) and not isinstance(strategy, bool):
        if embedding_dimension is not None:
            raise TypeError("embedding_dimension: given twice (first argument and keyword)")
        embedding_dimension, strategy = strategy, None
    if word_embedding_dimension is not None:
        if embedding_dimension is not None:
            raise TypeError("word_embedding_dimension: given with embedding_dimension")
        embedding_dimension = word_embedding_dimension
    stock = pooling_mode is not None or bool(legacy_flags)
    if stock and strategy is not None:
        raise TypeError(
            f"strategy {strategy!r}: give a hiddenpool strategy or the stock pooling_mode, not both"
        )
    if legacy_flags:
        names = ", ".join(f"`{name}`" for name in legacy_flags)
        warnings.warn(
            f"The {names} argument(s) are deprecated. Please use `pooling_mode` instead.",
            FutureWarning,
            stacklevel=3,
        )
        if pooling_mode is None:
            pools = [pool for _, flag, pool in MODES if legacy_flags.get(flag)] or ["mean"]
            return "+".join(pools) + "@last", embedding_dimension
    if pooling_mode is not None:
        return "+".join(config_pools({"pooling_mode": pooling_mode})) + "@last", embedding_dimension
    if strategy is None:
        return "mean@last", embedding_dimension
    if not isinstance(strategy, str):
        raise TypeError(f"strategy: expected a string, got {type(strategy).__name__}")
    return strategy, embedding_dimension


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
