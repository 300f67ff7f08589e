"""HiddenPooling inside sentence-transformers: the four model families, prompts left out,
the flattened (unpadded) input, learned layer weights with their gradients, and saving as
a stock Pooling where one can pool the same way. References: the stock Pooling module,
the models' own outputs, finite differences."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import tiny_models

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer  # noqa: E402

from hiddenpool.sentence_transformers import HiddenPooling, save_portable  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog", "the quick brown fox jumps over the lazy dog"]


def saved_family(name: str, folder) -> str:
    model, tokenizer = {
        "bert": tiny_models.bert,
        "gpt2": lambda: tiny_models.gpt2("left"),
        "t5": tiny_models.t5,
        "clip": lambda: tiny_models.clip(False),
    }[name]()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def features_of(model: SentenceTransformer, texts: list[str]) -> dict:
    """What the Transformer module hands the pooling module."""
    features = model.tokenize(texts)
    with torch.inference_mode():
        return model[0](dict(features))


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "clip"])
def test_each_family_pools_as_the_stock_module_and_the_model(family, tmp_path):
    folder = saved_family(family, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = SentenceTransformer(
            modules=[Transformer(folder), Pooling(16, "mean")], device="cpu"
        )
        ours = SentenceTransformer(
            modules=[Transformer(folder), HiddenPooling("mean+max@last")], device="cpu"
        )
    assert ours.get_embedding_dimension() == 32
    assert ours[1].get_embedding_dimension() == 32
    vectors = ours.encode(TEXTS)
    np.testing.assert_allclose(vectors[:, :16], stock.encode(TEXTS), atol=1e-6)
    # max against the same forward pass, read here with numpy.
    features = features_of(ours, TEXTS)
    tokens = features["token_embeddings"].numpy()
    real = features["attention_mask"].numpy() != 0
    for row in range(len(TEXTS)):
        np.testing.assert_allclose(vectors[row, 16:], tokens[row][real[row]].max(0), atol=1e-6)
    if family == "clip":
        # eos@last is CLIP's pooled output.
        eos = SentenceTransformer(
            modules=[Transformer(folder), HiddenPooling("eos@last")], device="cpu"
        )
        inputs = eos.tokenize(TEXTS)
        with torch.inference_mode():
            pooled = (
                eos[0]
                .auto_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                .pooler_output
            )
        np.testing.assert_allclose(eos.encode(TEXTS), pooled.numpy(), atol=1e-6)
    if family == "gpt2":
        # Left padding: the last real token is the row's last position, never padding.
        last = SentenceTransformer(
            modules=[Transformer(folder), HiddenPooling("last@last")], device="cpu"
        )
        assert last.tokenizer.padding_side == "left"
        expected = [tokens[row][real[row]][-1] for row in range(len(TEXTS))]
        np.testing.assert_allclose(last.encode(TEXTS), np.stack(expected), atol=1e-6)


def with_module(path: str, module) -> SentenceTransformer:
    return SentenceTransformer(
        modules=[Transformer(path, max_seq_length=256), module], device="cpu"
    )


@pytest.mark.parametrize("padding", ["right", "left"])
def test_prompt_left_out_as_the_stock_module_does(minilm_path, padding):
    stock = with_module(minilm_path, Pooling(384, ["cls", "mean"], include_prompt=False))
    ours = with_module(minilm_path, HiddenPooling("cls+mean@last", include_prompt=False))
    for model in (stock, ours):
        model.tokenizer.padding_side = padding
    expected = stock.encode(TEXTS, prompt="query: ")
    np.testing.assert_allclose(ours.encode(TEXTS, prompt="query: "), expected, atol=1e-5)
    included = with_module(minilm_path, HiddenPooling("cls+mean@last"))
    included.tokenizer.padding_side = padding
    assert np.abs(included.encode(TEXTS, prompt="query: ") - expected).max() > 1e-2


def flattened(features: dict) -> dict:
    """The unpadded form of right-padded features: [1, N, H] tokens and cu_seq_lens_q."""
    real = features["attention_mask"].bool()
    lengths = real.sum(1)
    flat = {
        "token_embeddings": features["token_embeddings"][real].unsqueeze(0),
        "input_ids": features["input_ids"][real].unsqueeze(0),
        "cu_seq_lens_q": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
    }
    if "all_layer_embeddings" in features:
        flat["all_layer_embeddings"] = [
            state[real].unsqueeze(0) for state in features["all_layer_embeddings"]
        ]
    return flat


@pytest.mark.parametrize("prompt_length", [0, 3])
def test_flattened_input_equals_padded_and_the_stock_module(minilm_path, prompt_length):
    model = with_module(minilm_path, HiddenPooling("mean+max@last4:sum", include_prompt=False))
    padded = features_of(model, TEXTS)
    flat = flattened(padded)
    if prompt_length:
        padded["prompt_length"] = prompt_length
        flat["prompt_length"] = torch.tensor([prompt_length])
    module = model[1]
    expected = module(dict(padded))["sentence_embedding"]
    got = module(dict(flat))["sentence_embedding"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    stock = Pooling(384, ["cls", "max", "mean"], include_prompt=False)
    ours = HiddenPooling("cls+max+mean@last", include_prompt=False)
    torch.testing.assert_close(
        ours(dict(flat))["sentence_embedding"],
        stock(dict(flat))["sentence_embedding"],
        atol=1e-5,
        rtol=0,
    )


def test_learned_layer_weights_train_save_and_load(minilm_path, tmp_path):
    module = HiddenPooling("mean@all:weighted")
    model = with_module(minilm_path, module)
    assert module.layer_weights == [0.0] * 6  # sized when the model is built
    uniform = model.encode(TEXTS)
    plain = with_module(minilm_path, HiddenPooling("mean@all:mean")).encode(TEXTS)
    np.testing.assert_allclose(uniform, plain, atol=1e-5)
    with torch.no_grad():
        module.mix_weights.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3, -0.2]))
        module.mix_scale.fill_(1.7)
    trained = model.encode(TEXTS)
    features = features_of(model, TEXTS)
    states = features["all_layer_embeddings"][1:]
    mix = 1.7 * torch.softmax(torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3, -0.2]), 0)
    mixed = sum(w * s for w, s in zip(mix, states, strict=True)).numpy()
    real = features["attention_mask"].numpy() != 0
    expected = np.stack([mixed[row][real[row]].mean(0) for row in range(len(TEXTS))])
    np.testing.assert_allclose(trained, expected, atol=1e-5)
    model.save(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu", trust_remote_code=True)
    assert loaded[1].layer_weights == pytest.approx([0.5, -1.0, 2.0, 0.0, 0.3, -0.2])
    assert loaded[1].layer_scale == pytest.approx(1.7)
    np.testing.assert_allclose(loaded.encode(TEXTS), trained, atol=1e-6)


def test_gradients_reach_the_layer_weights():
    """The learned mix's gradients (through the module, in training) against finite
    differences, float64; its values against the ScalarMix formula written here."""
    module = HiddenPooling(
        "mean+max@last4:weighted", embedding_dimension=4, layer_weights=[0.1, -0.3, 0.2, 0.0]
    )
    module.double().train()
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 5, 4, dtype=torch.float64, generator=generator) for _ in range(5)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])

    def through_module(weights: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        features = {
            "token_embeddings": states[-1],
            "all_layer_embeddings": states,
            "attention_mask": mask,
        }
        parameters = {"mix_weights": weights, "mix_scale": scale}
        return torch.func.functional_call(module, parameters, (features,))["sentence_embedding"]

    def formula(weights: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        mix = scale * weights.softmax(0)
        mixed = sum(mix[i] * states[i + 1] for i in range(4))
        real = mask.bool().unsqueeze(2)
        mean = torch.where(real, mixed, 0).sum(1) / real.sum(1)
        return torch.cat([mean, torch.where(real, mixed, float("-inf")).amax(1)], 1)

    weights = torch.tensor([0.1, -0.3, 0.2, 0.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(through_module(weights, scale), formula(weights, scale))
    assert torch.autograd.gradcheck(through_module, (weights, scale))
    ours = torch.autograd.grad(through_module(weights, scale).square().sum(), (weights, scale))
    theirs = torch.autograd.grad(formula(weights, scale).square().sum(), (weights, scale))
    for got, expected in zip(ours, theirs, strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, expected)


def test_save_portable_writes_a_stock_pooling_where_it_can(minilm_path, tmp_path):
    model = with_module(minilm_path, HiddenPooling("cls+mean@last", embedding_dimension=384))
    expected = model.encode(TEXTS)
    assert save_portable(model, tmp_path / "portable") == [1]
    loaded = SentenceTransformer(str(tmp_path / "portable"), device="cpu")  # no remote code
    assert type(loaded[1]).__name__ == "Pooling"
    np.testing.assert_allclose(loaded.encode(TEXTS), expected, atol=1e-6)
    # Named as the stock module's folder, not 1_HiddenPooling.
    assert (tmp_path / "portable" / "1_Pooling" / "config.json").is_file()
    assert not (tmp_path / "portable" / "1_HiddenPooling").exists()
    layered = with_module(minilm_path, HiddenPooling("mean@last4:concat"))
    with pytest.warns(UserWarning) as said:
        assert save_portable(layered, tmp_path / "layered") == []
    assert [str(w.message) for w in said] == [
        "module 1 stays HiddenPooling('mean@last4:concat'): strategy mean@last4:concat: the "
        "stock Pooling module reads the last layer only"
    ]
    again = SentenceTransformer(str(tmp_path / "layered"), device="cpu", trust_remote_code=True)
    assert type(again[1]).__name__ == "HiddenPooling"
    np.testing.assert_allclose(again.encode(TEXTS), layered.encode(TEXTS), atol=1e-6)


@pytest.mark.parametrize(
    ("family", "mode"), [("bert", "cls"), ("gpt2", "lasttoken"), ("t5", "mean"), ("clip", "max")]
)
def test_encoder_equals_sentence_transformers_on_family_folders(family, mode, tmp_path):
    """A sentence-transformers folder of each family: Encoder's default ("model") equals
    SentenceTransformer.encode on the folder."""
    from hiddenpool import Encoder

    folder = saved_family(family, tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(modules=[Transformer(folder), Pooling(16, mode)], device="cpu")
    model.save(str(tmp_path / "st"))
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    ours = Encoder.from_pretrained(str(tmp_path / "st"), device="cpu").encode(TEXTS)
    if family == "gpt2":
        # sentence-transformers gives a left-padded GPT-2 no position ids, so its padded rows
        # see shifted positions; each text alone (no padding) is the reference there.
        expected = np.concatenate([reloaded.encode([text]) for text in TEXTS])
        assert np.abs(reloaded.encode(TEXTS) - expected).max() > 1e-3
    else:
        expected = reloaded.encode(TEXTS)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def saved_hidden_pooling(folder, minilm_path, strategy, include_prompt=True, weights=None):
    """all-MiniLM-L6-v2 with HiddenPooling then Normalize, saved as its users save it."""
    from sentence_transformers.sentence_transformer.modules import Normalize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pooling = HiddenPooling(strategy, embedding_dimension=384, include_prompt=include_prompt)
        model = SentenceTransformer(
            modules=[Transformer(minilm_path), pooling, Normalize()], device="cpu"
        )
        if weights is not None:
            with torch.no_grad():
                pooling.mix_weights.data = torch.tensor(weights, dtype=torch.float32)
                pooling.mix_scale.data = torch.tensor(1.7)
        model.save(str(folder))
    return model


@pytest.mark.parametrize(
    ("strategy", "include_prompt", "weights"),
    [
        ("mean@last", True, None),
        ("mean+max@first_last:mean", True, None),
        ("mean@last4:weighted", True, [0.3, -0.2, 1.0, 0.5]),
        ("mean@last", False, None),
    ],
)
def test_our_own_saved_pipelines_run_as_model(
    tmp_path, minilm_path, strategy, include_prompt, weights
):
    from hiddenpool import Encoder, export_onnx

    model = saved_hidden_pooling(tmp_path / "st", minilm_path, strategy, include_prompt, weights)
    prompt = None if include_prompt else "query: "
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = SentenceTransformer(str(tmp_path / "st"), device="cpu", trust_remote_code=True)
        expected = loaded.encode(TEXTS, prompt=prompt)
    np.testing.assert_allclose(expected, model.encode(TEXTS, prompt=prompt), atol=1e-6)
    encoder = Encoder.from_pretrained(str(tmp_path / "st"))
    got = encoder.encode(TEXTS, "model", prompt=prompt)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    onnx = Encoder.from_pretrained(export_onnx(str(tmp_path / "st"), tmp_path / "onnx"))
    np.testing.assert_allclose(onnx.encode(TEXTS, "model", prompt=prompt), expected, atol=1e-5)
    if weights is not None:
        assert "layer weights 0.3, -0.2, 1, 0.5, scale 1.7" in encoder.describe_model_strategy()


def test_weighted_mean_without_the_prompt_keeps_each_tokens_weight(minilm_path, tmp_path):
    """The stock module weighs each token by its own position when the prompt is left out
    (x = 1, 3, 5 with a one-token prompt: (2*3 + 3*5) / 5 = 4.2, not 4.333)."""
    hidden = torch.tensor([[[1.0], [3.0], [5.0]]])
    features = {
        "token_embeddings": hidden,
        "attention_mask": torch.ones(1, 3, dtype=torch.int64),
        "prompt_length": torch.tensor([1]),
    }
    stock = Pooling(1, "weightedmean", include_prompt=False)
    ours = HiddenPooling("weighted_mean@last", include_prompt=False)
    expected = stock(dict(features))["sentence_embedding"]
    np.testing.assert_allclose(expected.numpy(), [[4.2]], atol=1e-6)
    np.testing.assert_allclose(
        ours(dict(features))["sentence_embedding"].numpy(), [[4.2]], atol=1e-6
    )
    # On a real model, through sentence-transformers, the Encoder (torch and ONNX Runtime).
    from hiddenpool import Encoder, export_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = SentenceTransformer(
            modules=[Transformer(minilm_path), Pooling(384, "weightedmean", include_prompt=False)],
            device="cpu",
        )
        ours_model = SentenceTransformer(
            modules=[
                Transformer(minilm_path),
                HiddenPooling("weighted_mean+mean@last", include_prompt=False),
            ],
            device="cpu",
        )
    expected = reference.encode(TEXTS, prompt="query: ")
    got = ours_model.encode(TEXTS, prompt="query: ")
    np.testing.assert_allclose(got[:, :384], expected, atol=1e-5)
    encoder = Encoder.from_pretrained(minilm_path, device="cpu")
    options = {"prompt": "query: ", "include_prompt": False}
    rows = encoder.encode(TEXTS, "weighted_mean@last", **options)
    np.testing.assert_allclose(rows, expected, atol=1e-5)
    onnx = Encoder.from_pretrained(export_onnx(minilm_path, tmp_path / "onnx"))
    np.testing.assert_allclose(
        onnx.encode(TEXTS, "weighted_mean@last", **options), expected, atol=1e-5
    )
    # Layers combined first: the same rule on the mixed layer, against numpy on the tokens.
    mixed = encoder.encode(TEXTS, "weighted_mean+max@last2:mean", **options)
    left_out = encoder.runner.tokenizer.prompt_tokens("query: ")
    for row, text in zip(mixed, TEXTS, strict=True):
        tokens = encoder.encode_tokens(["query: " + text], "last2:mean")[0].astype(np.float64)
        ranks = np.arange(1, len(tokens) + 1, dtype=np.float64)
        kept = ranks > left_out
        reference = (ranks[kept, None] * tokens[kept]).sum(0) / ranks[kept].sum()
        np.testing.assert_allclose(row[:384], reference, atol=1e-5)
        np.testing.assert_allclose(row[384:], tokens[kept].max(0), atol=1e-5)


STOCK_MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]


def stock_features(side: str, prompt: int, seed: int = 0) -> dict:
    """Random token embeddings of 3 rows of different lengths, padded on ``side``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 5, generator=generator)
    lengths = [7, 4, 5]
    mask = torch.zeros(3, 7, dtype=torch.int64)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, 7 - length :] = 1
    features = {"token_embeddings": hidden, "attention_mask": mask}
    if prompt:
        features["prompt_length"] = torch.tensor([prompt])
    return features


@pytest.mark.parametrize("mode", [*STOCK_MODES, ("cls", "mean"), ("max", "weightedmean")])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("prompt", [0, 2])
def test_the_stock_constructor_and_every_mode_pool_as_the_stock_module(mode, side, prompt):
    stock = Pooling(5, pooling_mode=mode, include_prompt=not prompt)
    ours = HiddenPooling(5, pooling_mode=mode, include_prompt=not prompt)
    assert isinstance(ours, Pooling)
    assert ours.pooling_mode == stock.pooling_mode
    assert ours.pooling_output_dimension == stock.pooling_output_dimension
    features = stock_features(side, prompt)
    expected = stock(dict(features))["sentence_embedding"]
    got = ours(dict(features))["sentence_embedding"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The config round-trips: a module made from it pools the same.
    again = HiddenPooling(**ours.get_config_dict())
    torch.testing.assert_close(again(dict(features))["sentence_embedding"], expected)


def test_legacy_flags_warn_as_the_stock_module_does():
    with pytest.warns(FutureWarning, match="pooling_mode_mean_tokens.*deprecated"):
        ours = HiddenPooling(8, pooling_mode_mean_tokens=True, pooling_mode_max_tokens=True)
    with pytest.warns(FutureWarning):
        stock = Pooling(8, pooling_mode_mean_tokens=True, pooling_mode_max_tokens=True)
    assert ours.pooling_mode == stock.pooling_mode == ("max", "mean")
    with pytest.raises(TypeError, match="not both"):
        HiddenPooling("mean@last", pooling_mode="max")
    with pytest.raises(TypeError, match="unexpected keyword argument 'pooling_mode_median'"):
        HiddenPooling(8, pooling_mode_median=True)


def test_cls_token_embeddings_and_token_weights_sum_are_read():
    features = stock_features("right", 0)
    features["cls_token_embeddings"] = torch.full((3, 5), 7.0)
    features["token_weights_sum"] = torch.tensor([2.0, 3.0, 0.5])
    for mode in ["cls", "mean", "mean_sqrt_len_tokens", ("cls", "mean")]:
        stock = Pooling(5, pooling_mode=mode)(dict(features))["sentence_embedding"]
        ours = HiddenPooling(5, pooling_mode=mode)(dict(features))["sentence_embedding"]
        torch.testing.assert_close(ours, stock)


def test_set_pooling_include_prompt_reaches_hidden_pooling(minilm_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = SentenceTransformer(
            modules=[Transformer(minilm_path), Pooling(384, "mean")], device="cpu"
        )
        ours = SentenceTransformer(
            modules=[Transformer(minilm_path), HiddenPooling("mean@last")], device="cpu"
        )
    for model in (stock, ours):
        model.set_pooling_include_prompt(False)
    assert ours[1].include_prompt is False
    np.testing.assert_allclose(
        ours.encode(TEXTS, prompt="query: "), stock.encode(TEXTS, prompt="query: "), atol=1e-6
    )
