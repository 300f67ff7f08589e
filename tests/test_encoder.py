"""The encoder against each family's own outputs: sentence-transformers for the real
all-MiniLM-L6-v2, pooler_output for CLIP, the T5 encoder alone, GPT-2 texts alone."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import reference
import tiny_models
from hiddenpool.encoder import Encoder

VARIED_TEXTS = [
    "A man is playing a guitar.",
    "hi",
    "",
    "The quick brown fox jumps over the lazy dog. " * 30,  # over 256 tokens: truncated
    "Ünïcödé, emoji 🙂 and\ttabs\nnewlines",
    "A woman is slicing an onion in a small kitchen while the radio plays.",
    "Stocks fell sharply on Tuesday.",
] * 5


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_minilm_equals_sentence_transformers(minilm, minilm_path, batch_size):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path, device="cpu")
    expected = model.encode(VARIED_TEXTS, batch_size=batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = minilm.encode(VARIED_TEXTS, "mean@last", normalize=True, batch_size=batch_size)
    assert any("5 of 35 texts were longer than max_length=256" in str(w.message) for w in caught)
    assert ours.shape == (len(VARIED_TEXTS), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_several_strategies_in_one_pass_equal_each_alone_in_input_order(minilm):
    strategies = ["mean@last", "cls@last", "max@last", "mean@last4:sum", "mean@first_last:mean"]
    texts = VARIED_TEXTS[:7]
    together = minilm.encode(texts, strategies, batch_size=2)
    for strategy in strategies:
        alone = minilm.encode(texts, strategy, batch_size=2)
        np.testing.assert_allclose(together[strategy], alone, atol=1e-6)
        # Input order survives length sorting: each text encoded by itself gives its row.
        for index in (0, 2, 3):
            single = minilm.encode([texts[index]], strategy)
            np.testing.assert_allclose(together[strategy][index], single[0], atol=1e-5)


def test_minilm_pooling_equals_hidden_states_pooled_by_hand(minilm):
    texts = ["a short one", "a somewhat longer sentence about nothing at all"]
    inputs = minilm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        outputs = minilm.model(**inputs, output_hidden_states=True)
    states = [state.numpy() for state in outputs.hidden_states]
    mask = inputs["attention_mask"].numpy()
    expected = reference.pool(states[-4:], mask, ["mean"], "sum")
    np.testing.assert_allclose(minilm.encode(texts, "mean@last4:sum"), expected, atol=1e-5)


@pytest.mark.parametrize("legacy_eos", [True, False])
def test_clip_eos_equals_pooler_output(legacy_eos):
    model, tokenizer = tiny_models.clip(legacy_eos)
    encoder = Encoder(model, tokenizer)
    texts = tiny_models.TEXTS
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**inputs).pooler_output.numpy()
    ours = encoder.encode(texts, "eos@last", batch_size=len(texts))
    np.testing.assert_array_equal(ours, expected)
    # Length-sorted batches of other sizes give the same vectors up to float noise.
    np.testing.assert_allclose(encoder.encode(texts, "eos@last", batch_size=2), expected, atol=1e-6)


def test_clip_last_means_last_hidden_state_and_projection():
    model, tokenizer = tiny_models.clip(False, with_projection=True)
    texts = tiny_models.TEXTS[:3]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs, output_hidden_states=True)
    mask = inputs["attention_mask"].numpy()
    plain = Encoder(model, tokenizer)
    expected_mean = reference.pool([outputs.last_hidden_state.numpy()], mask, ["mean"])
    np.testing.assert_allclose(
        plain.encode(texts, "mean@last", batch_size=3), expected_mean, atol=1e-6
    )
    expected_previous = reference.pool([outputs.hidden_states[-2].numpy()], mask, ["mean"])
    np.testing.assert_allclose(
        plain.encode(texts, "mean@-2", batch_size=3), expected_previous, atol=1e-6
    )
    projected = Encoder(model, tokenizer, project=True).encode(texts, "eos@last", batch_size=3)
    np.testing.assert_allclose(projected, outputs.text_embeds.numpy(), atol=1e-6)
    assert projected.shape == (3, 8)


def test_clip_row_without_eos_raises_unless_last():
    model, tokenizer = tiny_models.clip(False, template=False)  # the tokenizer adds no EOS
    encoder = Encoder(model, tokenizer)
    texts = ["the cat", "a dog sat"]
    with pytest.raises(ValueError, match=r"eos_token_id=37 in 2 row\(s\): 0, 1"):
        encoder.encode(texts, "eos@last")
    fallback = encoder.encode(texts, "eos@last", missing_eos="last")
    np.testing.assert_allclose(fallback, encoder.encode(texts, "last@last"), atol=1e-7)


def test_t5_uses_the_encoder_only():
    model, tokenizer = tiny_models.t5()
    calls = []
    model.decoder.register_forward_pre_hook(lambda *args, **kwargs: calls.append(1))
    encoder = Encoder(model, tokenizer)
    assert encoder.family == "encoder-decoder"
    texts = tiny_models.TEXTS
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model.encoder(**inputs).last_hidden_state.numpy()
    mask = inputs["attention_mask"].numpy()
    expected = np.stack([hidden[row][mask[row] == 1].mean(axis=0) for row in range(len(texts))])
    np.testing.assert_allclose(
        encoder.encode(texts, "mean@last", batch_size=7), expected, atol=1e-6
    )
    assert calls == []


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_gpt2_last_token_equals_each_text_alone(padding_side):
    model, tokenizer = tiny_models.gpt2(padding_side)
    encoder = Encoder(model, tokenizer)
    assert tokenizer.pad_token is not None and encoder.family == "decoder"
    texts = [text for text in tiny_models.TEXTS if text]
    batched = encoder.encode(texts, "last@last", batch_size=len(texts))
    for index, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            alone = model(input_ids=ids).last_hidden_state[0, -1].numpy()
        np.testing.assert_allclose(batched[index], alone, atol=1e-5)


def test_input_checks_and_edge_cases():
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    empty = encoder.encode([], ["mean@last", "mean+max@last2:concat"])
    assert empty["mean@last"].shape == (0, 16) and empty["mean+max@last2:concat"].shape == (0, 64)
    with pytest.raises(TypeError, match=r"texts\[2\]: expected str, got int"):
        encoder.encode(["a", "b", 3])
    with pytest.raises(TypeError, match="single str"):
        encoder.encode("the cat")
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a"], batch_size=0)
    blank = encoder.encode(["", " "], "cls@last")  # [CLS] [SEP] only: a real vector each
    assert blank.shape == (2, 16) and np.isfinite(blank).all()
    torch_output = encoder.encode(["the cat"], output="torch", normalize=True)
    assert isinstance(torch_output, torch.Tensor)
    torch.testing.assert_close(torch_output.norm(dim=1), torch.ones(1))


def test_token_report_counts_unknown_and_truncated():
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer, max_length=8)
    report = encoder.token_report(tiny_models.TEXTS)
    expected_tokens = sum(len(text.split()) for text in tiny_models.TEXTS)
    assert report.tokens == expected_tokens
    assert report.unknown_tokens == 1  # "and"
    assert report.unknown_rate == pytest.approx(1 / expected_tokens)
    too_long = sum(1 for text in tiny_models.TEXTS if len(text.split()) + 2 > 8)
    assert report.truncated_texts == too_long == 2
    with pytest.warns(UserWarning, match=f"{too_long} of 7 texts were longer than max_length=8"):
        encoder.encode(tiny_models.TEXTS)


def test_models_without_text_input_are_refused_by_name():
    import transformers

    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
    )
    _, tokenizer = tiny_models.bert()
    with pytest.raises(ValueError, match=r"ViTModel .*model_type 'vit'.* takes no input_ids"):
        Encoder(transformers.ViTModel(config), tokenizer)


def test_truncation_is_counted_for_tokenizers_without_encodings():
    """Slow (Python) tokenizers return no `encodings`; truncation is measured instead."""
    import transformers

    model, fast = tiny_models.bert()

    class WithoutEncodings:
        def __init__(self, tokenizer):
            self._tokenizer = tokenizer

        def __call__(self, *args, **kwargs):
            return transformers.BatchEncoding(dict(self._tokenizer(*args, **kwargs)))

        def __getattr__(self, name):
            return getattr(self._tokenizer, name)

    encoder = Encoder(model, WithoutEncodings(fast), max_length=6)
    texts = ["the cat", "the cat sat on the mat", "a b c d e"]  # 4, 8 and 7 tokens
    with pytest.warns(UserWarning, match="2 of 3 texts were longer than max_length=6"):
        result = encoder.encode(texts)
    np.testing.assert_allclose(result, Encoder(model, fast, max_length=6).encode(texts), atol=1e-6)


def test_the_last_state_named_by_its_index_runs_on_torch():
    """``mean@4`` on four layers is ``mean@last``: the torch runner, which skips the other
    states when only the last is needed, failed to resolve it ("out of range for 1 hidden
    state"); now equal to the states pooled by hand."""
    model, tokenizer = tiny_models.bert(layers=4)
    encoder = Encoder(model, tokenizer)
    texts = ["the cat sat", "a dog ran on the mat"]
    rows = encoder.encode(texts, ["mean@4", "cls@4", "mean@last"])
    np.testing.assert_array_equal(rows["mean@4"], rows["mean@last"])
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = model(**inputs, output_hidden_states=True).hidden_states
    mask = inputs["attention_mask"].numpy()
    expected = reference.pool([states[4].numpy()], mask, ["mean"])
    np.testing.assert_allclose(rows["mean@4"], expected, atol=1e-5)
