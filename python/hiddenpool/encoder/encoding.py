"""The encode path: texts to pooled rows. ``encode`` checks its arguments, resolves the
``"model"`` strategy into its pooling and pipeline, then tokenizes once, plans batches by
token budget, runs them and pools every strategy from each batch's hidden states, and
finishes the rows (normalize, Matryoshka cut, numpy or torch), in input order."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hiddenpool.encoder.base import EncoderBase, Progress, _given_strategies, _is_model
from hiddenpool.ops import StrategyLike
from hiddenpool.pipelines import truncate_dimensions
from hiddenpool.runners.base import needed_states
from hiddenpool.runners.tokens import DEFAULT_MAX_BATCH_TOKENS, pad_batch
from hiddenpool.strategy import strategy_list


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


class Encoding(EncoderBase):
    """``Encoder.encode`` and ``Encoder.token_report``."""

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
        common: dict[str, Any] = {
            "batch_size": batch_size,
            "max_batch_tokens": max_batch_tokens,
            "progress": progress,
            "missing_eos": missing_eos,
            "timings": timings,
            "prompt": prompt,
            "include_prompt": include_prompt,
        }
        if dimensions is not None:
            return self._encode_cut(
                texts, strategy, dimensions, normalize, output, layer_weights, layer_scale, common
            )
        texts = _checked_texts(texts)
        _check_limits(batch_size, max_batch_tokens)
        _check_options(output, missing_eos, prompt, include_prompt)
        several, given = _given_strategies(strategy)
        if any(_is_model(item) for item in given):
            return self._encode_model(
                texts, given, several, normalize, output, layer_weights, layer_scale, common
            )
        several, keys, parsed = strategy_list(strategy)
        self.check(strategy, layer_weights=layer_weights)
        results = self._encode_keys(texts, keys, parsed, layer_weights, layer_scale, common)
        return self._finish(results, keys, several, output, normalize)

    def _encode_cut(
        self,
        texts: Sequence[str],
        strategy: StrategyLike | Sequence[StrategyLike],
        dimensions: int,
        normalize: bool,
        output: str,
        layer_weights: Sequence[float] | None,
        layer_scale: float,
        common: dict[str, Any],
    ) -> Any:
        """``dimensions=k``: the rows encoded whole, then cut to their first ``k`` values
        (and renormalized where they were normalized)."""
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise ValueError(f"dimensions: expected a positive integer, got {dimensions!r}")
        result = self.encode(
            texts,
            strategy,
            normalize=normalize,
            output="numpy",
            layer_weights=layer_weights,
            layer_scale=layer_scale,
            **common,
        )
        several = isinstance(result, dict)
        rows = result if several else {"": result}
        normalized = {
            key: normalize or (_is_model(key if several else str(strategy)) and self._normalizes())
            for key in rows
        }
        cut = {
            key: truncate_dimensions(value, dimensions, normalized[key])
            for key, value in rows.items()
        }
        return self._finish(cut, list(cut), several, output, normalize=False)

    def _encode_model(
        self,
        texts: list[str],
        given: list[StrategyLike],
        several: bool,
        normalize: bool,
        output: str,
        layer_weights: Sequence[float] | None,
        layer_scale: float,
        common: dict[str, Any],
    ) -> Any:
        """Strategies among which is ``"model"``: its pooling runs beside the others (with
        its own learned layer mix, where the pipeline has one), then its Dense layers and
        Normalize."""
        pipeline = self._model_pipeline()
        prompted = common["prompt"] is not None
        if common["include_prompt"] is None and pipeline is not None and prompted:
            common = {**common, "include_prompt": pipeline.include_prompt}
        inner = [self.model_strategy() if _is_model(item) else item for item in given]
        timings = common["timings"]
        mix = self.model_mix()
        pooled: dict[str, np.ndarray] = {}
        if mix is not None:
            # The pipeline's learned layer mix: its pooling runs with its own weights, apart
            # from the other strategies (which may bring theirs).
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

    def _encode_keys(
        self,
        texts: list[str],
        keys: list[str],
        parsed: Sequence[Any],
        layer_weights: Sequence[float] | None,
        layer_scale: float,
        common: dict[str, Any],
    ) -> dict[str, np.ndarray]:
        """Every strategy's rows, in input order: texts tokenized once (the prompt before
        each), batched by token budget, each batch run once and pooled for all of them."""
        states = needed_states(parsed, self.runner.state_count())
        tokenizer = self.runner.tokenizer
        if not texts:
            # One forward pass on an empty text gives each strategy's width.
            probe = tokenizer.tokenize([""])
            pooled = self._pool(
                pad_batch(probe, [0], tokenizer), states, keys, "last", None, layer_weights,
                layer_scale,
            )  # fmt: skip
            return {key: np.zeros((0, value.shape[1]), np.float32) for key, value in pooled.items()}
        prompt, prompt_tokens = common["prompt"], 0
        if prompt is not None:
            texts = [prompt + text for text in texts]
            if common["include_prompt"] is False:
                prompt_tokens = tokenizer.prompt_tokens(prompt)
        tokenized = tokenizer.tokenize(texts)
        results: dict[str, np.ndarray] = {}
        batches = self._batches(
            tokenized, common["batch_size"], common["max_batch_tokens"], common["progress"]
        )
        for batch in batches:
            pooled = self._pool(
                batch, states, keys, common["missing_eos"], common["timings"], layer_weights,
                layer_scale, prompt_tokens,
            )  # fmt: skip
            for key, value in pooled.items():
                if key not in results:
                    results[key] = np.empty((len(texts), value.shape[1]), dtype=np.float32)
                results[key][batch.rows] = value
        if tokenized.truncated:
            warnings.warn(
                f"{tokenized.truncated} of {len(texts)} texts were longer than max_length="
                f"{self.max_length} tokens and were truncated",
                stacklevel=3,
            )
        return results

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


def _check_options(
    output: str, missing_eos: str, prompt: str | None, include_prompt: bool | None
) -> None:
    if output not in ("numpy", "torch"):
        raise ValueError(f"output: expected 'numpy' or 'torch', got {output!r}")
    if missing_eos not in ("raise", "last"):
        raise ValueError(f"missing_eos: expected 'raise' or 'last', got {missing_eos!r}")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt: expected str or None, got {type(prompt).__name__}")
    if include_prompt not in (None, True, False):
        raise ValueError(f"include_prompt: expected True, False or None, got {include_prompt!r}")


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
