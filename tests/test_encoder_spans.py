"""Encoder spans: token vectors, word vectors, prompt exclusion and late chunking, each
against a reference written here from one forward pass of each text (or window) alone."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import tiny_models
from hiddenpool import Encoder
from hiddenpool.text_spans import late_chunking_windows


def alone(model, tokenizer, text: str, **extra) -> list[np.ndarray]:
    """Every hidden state of one text run by itself, ``[n, H]`` float64 each (the last one
    is the model's last_hidden_state)."""
    encoded = tokenizer([text], return_tensors="pt", **extra)
    with torch.inference_mode():
        output = model(**encoded, output_hidden_states=True)
    states = [state[0].double().numpy() for state in output.hidden_states]
    states[-1] = output.last_hidden_state[0].double().numpy()
    return states


@pytest.mark.parametrize("family", ["bert-right", "gpt2-left", "gpt2-right"])
def test_token_vectors_equal_each_text_alone(family):
    if family == "bert-right":
        model, tokenizer = tiny_models.bert()
    else:
        model, tokenizer = tiny_models.gpt2(padding_side=family.split("-")[1])
    encoder = Encoder(model, tokenizer)
    texts = [t for t in tiny_models.TEXTS if t]
    for layers, combine in [("last", None), ("-2", None), ("last2:mean", "mean")]:
        got = encoder.encode_tokens(texts, layers, batch_size=3)
        assert len(got) == len(texts)
        for text, vectors in zip(texts, got, strict=True):
            states = alone(encoder.model, encoder.tokenizer, text)
            if combine == "mean":
                expected = (states[-2] + states[-1]) / 2
            else:
                expected = states[-2] if layers == "-2" else states[-1]
            assert vectors.dtype == np.float32
            assert vectors.shape == expected.shape, (family, text)
            np.testing.assert_allclose(vectors, expected, atol=2e-5, err_msg=f"{family} {text}")


def test_word_vectors_pool_subtokens(minilm):
    texts = ["unbelievably good weather", "a cat", "tokenization of antidisestablishmentarianism"]
    for pool in ("mean", "first", "last", "max"):
        got = minilm.encode_words(texts, pool, return_offsets=True, batch_size=2)
        for text, (vectors, offsets) in zip(texts, got, strict=True):
            encoded = minilm.tokenizer(text)
            state = alone(minilm.model, minilm.tokenizer, text)[-1]
            words = encoded.word_ids()
            count = max(w for w in words if w is not None) + 1
            assert vectors.shape == (count, 384)
            for word in range(count):
                tokens = [p for p, w in enumerate(words) if w == word]
                picked = state[tokens]
                expected = {
                    "mean": picked.mean(0),
                    "first": picked[0],
                    "last": picked[-1],
                    "max": picked.max(0),
                }[pool]
                np.testing.assert_allclose(vectors[word], expected, atol=2e-5)
                start, end = offsets[word]
                assert text[start:end] == text.split()[word]


def test_word_vectors_under_left_padding_follow_the_text():
    model, tokenizer = tiny_models.gpt2(padding_side="left")
    encoder = Encoder(model, tokenizer)
    texts = ["the cat sat", "a big red dog ran in the park", "bird"]
    got = encoder.encode_words(texts, "mean", batch_size=3)
    for text, vectors in zip(texts, got, strict=True):
        np.testing.assert_allclose(vectors, alone(model, tokenizer, text)[-1], atol=2e-5)


def test_slow_tokenizers_are_told_to_use_a_fast_one(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *tiny_models.WORDS]))
    # transformers 5 names the Python (slow) BERT tokenizer BertTokenizerLegacy.
    slow_class = getattr(transformers, "BertTokenizerLegacy", None)
    if slow_class is None:
        pytest.skip("this transformers has no slow BERT tokenizer class")
    slow = slow_class(str(vocab))
    assert not slow.is_fast
    model, _ = tiny_models.bert()
    encoder = Encoder(model, slow)
    with pytest.raises(ValueError, match="tokenizer: BertTokenizerLegacy is a slow tokenizer"):
        encoder.encode_words(["the cat"])
    with pytest.raises(ValueError, match="tokenizer: BertTokenizerLegacy is a slow tokenizer"):
        encoder.encode_chunks("the cat", chunk_tokens=1)


def test_prompt_exclusion_equals_sentence_transformers(minilm, minilm_path):
    st = pytest.importorskip("sentence_transformers")
    texts = ["a cat sat on the mat", "unbelievably good weather today", "hi"]
    model = st.SentenceTransformer(minilm_path, device="cpu")
    model[1].include_prompt = False
    side = minilm.runner.tokenizer.padding_side
    try:
        for padding in ("right", "left"):
            model.tokenizer.padding_side = padding
            minilm.runner.tokenizer.padding_side = padding
            expected = model.encode(texts, prompt="query: ")
            ours = minilm.encode(texts, "mean@last", prompt="query: ", include_prompt=False)
            ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
            np.testing.assert_allclose(ours, expected, atol=1e-6, err_msg=padding)
            included = minilm.encode(texts, "model", prompt="query: ")
            assert np.abs(included - expected).max() > 0.05  # the prompt does count
    finally:
        minilm.runner.tokenizer.padding_side = side


def test_prompt_is_prepended(minilm):
    texts = ["a cat", "hi there"]
    np.testing.assert_allclose(
        minilm.encode(texts, "mean@last", prompt="query: "),
        minilm.encode(["query: " + t for t in texts], "mean@last"),
        atol=1e-6,
    )
    with pytest.raises(TypeError, match="prompt: expected str"):
        minilm.encode(texts, prompt=3)  # type: ignore[arg-type]


def test_chunks_equal_pooling_token_slices_of_one_pass(minilm):
    text = (
        "Berlin is the capital of Germany. It has about 3.7 million people. "
        "The city is known for its museums, and its river is the Spree."
    )
    sentences = [(0, 33), (34, 66), (67, len(text))]
    encoded = minilm.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    state = alone(minilm.model, minilm.tokenizer, text)[-1]
    starts = np.array([start for start, _ in encoded["offset_mapping"]])
    special = np.array(encoded["special_tokens_mask"])
    for strategy in ("mean@last", "max@last", "first@last"):
        got = minilm.encode_chunks(text, sentences, strategy=strategy)
        for index, (start, end) in enumerate(sentences):
            tokens = np.flatnonzero((starts >= start) & (starts < end) & (special == 0))
            picked = state[tokens]
            expected = {"mean@last": picked.mean(0), "max@last": picked.max(0)}.get(
                strategy, picked[0]
            )
            np.testing.assert_allclose(got[index], expected, atol=2e-5, err_msg=strategy)
    fixed, spans = minilm.encode_chunks(text, chunk_tokens=8, return_spans=True)
    content = state[1:-1]
    assert fixed.shape == (-(-len(content) // 8), 384)
    for index in range(len(fixed)):
        np.testing.assert_allclose(
            fixed[index], content[index * 8 : index * 8 + 8].mean(0), atol=2e-5
        )
    assert spans[0][0] == 0 and spans[-1][1] == len(text)


@pytest.mark.parametrize(("tokens", "window"), [(1, 5), (10, 4), (31, 10), (100, 7), (64, 64)])
def test_window_choice_gives_each_token_the_most_context(tokens, window):
    starts, chosen = late_chunking_windows(tokens, window)
    assert starts[0] == 0 and starts[-1] + window >= tokens
    assert all(b > a for a, b in itertools.pairwise(starts))
    for token in range(tokens):
        best = max(
            min(token - start, start + window - 1 - token)
            for start in starts
            if start <= token < start + window
        )
        start = starts[chosen[token]]
        assert start <= token < start + window
        assert min(token - start, start + window - 1 - token) == best


def test_long_text_runs_in_windows_each_token_from_its_window():
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer, max_length=12)  # 10 text tokens a window
    words = (tiny_models.WORDS * 2)[:33]
    text = " ".join(words)  # 33 tokens: about 3x max_length
    starts, chosen = late_chunking_windows(len(words), 10)
    assert len(starts) >= 3
    per_window = [
        alone(model, tokenizer, " ".join(words[start : start + 10]))[-1][1:-1] for start in starts
    ]
    token_vectors = np.stack(
        [per_window[chosen[p]][p - starts[chosen[p]]] for p in range(len(words))]
    )
    # Chunks of one word each: every vector comes from exactly one window.
    offsets, position = [], 0
    for word in words:
        offsets.append((position, position + len(word)))
        position += len(word) + 1
    got = encoder.encode_chunks(text, offsets, strategy="mean@last")
    np.testing.assert_allclose(got, token_vectors, atol=2e-5)
    # One window a batch (a 12-token budget): stitched across batches, the same vectors.
    one_by_one = encoder.encode_chunks(text, offsets, strategy="mean@last", max_batch_tokens=12)
    np.testing.assert_allclose(one_by_one, token_vectors, atol=2e-5)
    # A chunk across a window boundary pools tokens taken from two windows.
    both = encoder.encode_chunks(text, [(0, len(text))], strategy="mean@last")
    np.testing.assert_allclose(both[0], token_vectors.mean(0), atol=2e-5)
    # The same text through one window of the full length differs: the windows matter.
    whole = Encoder(model, tokenizer).encode_chunks(text, offsets)
    assert np.abs(whole - got).max() > 1e-3


def test_chunk_errors_name_the_chunk(minilm):
    text = "Berlin is a city.   It is big."
    with pytest.raises(ValueError, match=r"spans\[1\] = \(17, 20\): covers no token"):
        minilm.encode_chunks(text, [(0, 17), (17, 20)])
    with pytest.raises(ValueError, match=r"spans\[0\] = \(5, 99\): needs 0 <= start < end <= 30"):
        minilm.encode_chunks(text, [(5, 99)])
    with pytest.raises(ValueError, match="spans: give either spans or chunk_tokens"):
        minilm.encode_chunks(text)
    with pytest.raises(ValueError, match="chunk_tokens: expected a positive integer"):
        minilm.encode_chunks(text, chunk_tokens=0)
    with pytest.raises(ValueError, match="the eos pool finds one token"):
        minilm.encode_chunks(text, chunk_tokens=3, strategy="eos@last")
    with pytest.raises(ValueError, match=r"layers: 'last9:mean': .*needs 9 hidden states"):
        minilm.encode_tokens(["a"], "last9:mean")
    with pytest.raises(ValueError, match=r"pool: 'median': strategy: unknown pool 'median'"):
        minilm.encode_words(["a"], "median")
