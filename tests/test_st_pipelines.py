"""The "model" strategy: a sentence-transformers folder's own pipeline (pooling in either
config format, Dense, Normalize) equals SentenceTransformer.encode on the same folder, on
the torch runner and on an ONNX export; what hiddenpool cannot run is refused by name."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import tiny_models
from hiddenpool.encoder import Encoder
from hiddenpool.export import export_onnx
from hiddenpool.sentence_transformers import pooling_strategy, read_pipeline, read_safetensors

TEXTS = [
    "A man is playing a guitar.",
    "hi",
    "",
    "A woman is slicing an onion in a small kitchen while the radio plays.",
    "Stocks fell sharply on Tuesday.",
]


def variant(source: str, folder, *, pooling: dict | None = None, normalize: bool = True) -> str:
    """A copy of all-MiniLM-L6-v2 (weights linked, not copied) with another pooling config
    and with or without its Normalize module."""
    shutil.copytree(source, folder, copy_function=os.symlink)
    if pooling is not None:
        os.remove(folder / "1_Pooling" / "config.json")
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if not normalize:
        modules = json.loads((folder / "modules.json").read_text())
        os.remove(folder / "modules.json")
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
        (folder / "modules.json").write_text(json.dumps(modules))
    return str(folder)


def assert_equals_sentence_transformers(folder: str) -> Encoder:
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(folder, device="cpu").encode(TEXTS)
    encoder = Encoder.from_pretrained(folder, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "model" must resolve without the fallback warning
        ours = encoder.encode(TEXTS)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    return encoder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "pooling", "normalize", "resolved"),
    [
        ("compact cls", {"embedding_dimension": 384, "pooling_mode": "cls"}, True,
         "first@last, normalized"),
        ("compact mean and max", {"embedding_dimension": 384, "pooling_mode": ["mean", "max"],
                                  "include_prompt": True}, True, "mean+max@last, normalized"),
        ("legacy max", {"word_embedding_dimension": 384, "pooling_mode_max_tokens": True,
                        "pooling_mode_mean_tokens": False}, True, "max@last, normalized"),
        ("legacy mean without Normalize", None, False, "mean@last"),
    ],
)  # fmt: skip
def test_pooling_variants_equal_sentence_transformers(
    minilm_path, tmp_path, name, pooling, normalize, resolved
):
    folder = variant(minilm_path, tmp_path / "m", pooling=pooling, normalize=normalize)
    encoder = assert_equals_sentence_transformers(folder)
    assert encoder.describe_model_strategy() == resolved, name


@pytest.mark.slow
def test_include_prompt_false_leaves_the_prompt_out_as_sentence_transformers(minilm_path, tmp_path):
    """A folder whose pooling says include_prompt: false, encoded with a prompt."""
    from sentence_transformers import SentenceTransformer

    pooling = {"embedding_dimension": 384, "pooling_mode": "mean", "include_prompt": False}
    folder = variant(minilm_path, tmp_path / "m", pooling=pooling)
    expected = SentenceTransformer(folder, device="cpu").encode(TEXTS, prompt="query: ")
    encoder = Encoder.from_pretrained(folder, device="cpu")
    assert encoder.pipeline is not None and not encoder.pipeline.include_prompt
    np.testing.assert_allclose(encoder.encode(TEXTS, prompt="query: "), expected, atol=1e-5)
    # Asked for explicitly, the prompt counts.
    included = encoder.encode(TEXTS, prompt="query: ", include_prompt=True)
    assert np.abs(included - expected).max() > 1e-2


@pytest.fixture(scope="module")
def dense_folder(minilm_path, tmp_path_factory) -> str:
    """all-MiniLM-L6-v2 + Dense(384 -> 128, tanh, seeded) + Normalize, saved by
    sentence-transformers itself (its current module type spelling)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
    )

    torch.manual_seed(0)
    model = SentenceTransformer(
        modules=[
            Transformer(minilm_path, max_seq_length=256),
            Pooling(384, "mean"),
            Dense(384, 128, activation_function=torch.nn.Tanh()),
            Normalize(),
        ],
        device="cpu",
    )
    folder = tmp_path_factory.mktemp("dense") / "model"
    model.save(str(folder))
    return str(folder)


@pytest.mark.slow
def test_dense_head_equals_sentence_transformers_on_torch_and_onnx(dense_folder, tmp_path):
    from sentence_transformers import SentenceTransformer

    with open(os.path.join(dense_folder, "modules.json")) as handle:
        modules = json.load(handle)
    assert any(m["type"].endswith("Dense") for m in modules)
    encoder = assert_equals_sentence_transformers(dense_folder)
    assert encoder.describe_model_strategy() == "mean@last, Dense 384->128 Tanh, normalized"
    exported = export_onnx(dense_folder, tmp_path / "onnx")
    onnx_encoder = Encoder.from_pretrained(exported)
    assert onnx_encoder.backend == "onnx"
    expected = SentenceTransformer(dense_folder, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(onnx_encoder.encode(TEXTS), expected, atol=1e-5)
    together = onnx_encoder.encode(TEXTS, ["model", "mean@last"])
    assert together["model"].shape == (5, 128) and together["mean@last"].shape == (5, 384)


def test_folders_without_a_pipeline_say_model_means_mean_last_once():
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    with pytest.warns(UserWarning, match="no sentence-transformers pipeline .* means mean@last"):
        first = encoder.encode(["the cat", "a dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = encoder.encode(["the cat", "a dog"], "model")
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, encoder.encode(["the cat", "a dog"], "mean@last"))
    with pytest.raises(ValueError, match="output: expected 'numpy' or 'torch'"):
        encoder.encode(["the cat"], "model", output="banana")
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["the cat"], ["model", "cls@last"], batch_size=0)


def test_unknown_modules_and_modes_are_refused_by_name(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    modules = [
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"lists 'sentence_transformers.models.LayerNorm'"):
        read_pipeline(tmp_path)
    with pytest.raises(ValueError, match="pooling_mode: unknown mode 'median'"):
        pooling_strategy({"pooling_mode": ["mean", "median"]})
    with pytest.raises(ValueError, match="no pooling mode is switched on"):
        pooling_strategy({"pooling_mode_mean_tokens": False})


def test_safetensors_reader_equals_the_safetensors_package(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.float16),
        "c": torch.randn(2, 2).to(torch.bfloat16),
    }
    path = str(tmp_path / "t.safetensors")
    safetensors_torch.save_file(tensors, path)
    ours = read_safetensors(path)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(ours[name], tensor.float().numpy())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["cls+mean@last", "max+mean_sqrt_len@last", "last@last"])
def test_pooling_config_round_trips_through_sentence_transformers(minilm_path, tmp_path, strategy):
    from hiddenpool.sentence_transformers import pooling_config
    from hiddenpool.strategy import Strategy

    config = pooling_config(strategy, 384)
    assert Strategy.from_sentence_transformers(config) == Strategy.parse(strategy)
    folder = variant(minilm_path, tmp_path / "m", pooling=config)
    encoder = assert_equals_sentence_transformers(folder)
    assert encoder.pipeline is not None and encoder.pipeline.strategy == Strategy.parse(strategy)


def test_pooling_config_says_why_a_strategy_has_none():
    from hiddenpool.sentence_transformers import pooling_config

    for strategy, reason in [
        ("mean@last4:sum", "last layer only"),
        ("eos@last", "no 'eos' mode"),
        ("mean+cls@last", "in the order cls, max, mean"),
    ]:
        with pytest.raises(ValueError, match=reason):
            pooling_config(strategy, 384)


def hidden_pooling_model(minilm_path: str, last_module):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Transformer

    return SentenceTransformer(
        modules=[Transformer(minilm_path, max_seq_length=256), last_module], device="cpu"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "strategy"),
    [
        ("cls", "cls@last"),
        ("max", "max@last"),
        ("mean", "mean@last"),
        ("mean_sqrt_len_tokens", "mean_sqrt_len@last"),
        ("weightedmean", "weighted_mean@last"),
        ("lasttoken", "last@last"),
        (["cls", "max", "mean"], "cls+max+mean@last"),
    ],
)
def test_hidden_pooling_equals_the_stock_module(minilm_path, mode, strategy):
    from sentence_transformers.sentence_transformer.modules import Pooling

    from hiddenpool.sentence_transformers import HiddenPooling

    stock = hidden_pooling_model(minilm_path, Pooling(384, mode)).encode(TEXTS)
    module = HiddenPooling(strategy, embedding_dimension=384)
    ours = hidden_pooling_model(minilm_path, module)
    assert ours.get_sentence_embedding_dimension() == stock.shape[1]
    np.testing.assert_allclose(ours.encode(TEXTS), stock, atol=1e-5)


@pytest.mark.slow
def test_hidden_pooling_layers_turn_hidden_states_on_and_round_trip(minilm_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    from hiddenpool.sentence_transformers import HiddenPooling

    model = hidden_pooling_model(minilm_path, HiddenPooling("mean@last4:concat"))
    assert model.get_sentence_embedding_dimension() == 4 * 384
    vectors = model.encode(TEXTS)
    expected = Encoder.from_pretrained(minilm_path, device="cpu").encode(TEXTS, "mean@last4:concat")
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    model.save(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu", trust_remote_code=True)
    np.testing.assert_allclose(loaded.encode(TEXTS), vectors, atol=1e-6)


def test_hidden_pooling_keeps_gradients_on_the_torch_path():
    from hiddenpool.sentence_transformers import HiddenPooling

    module = HiddenPooling("mean+max@last", embedding_dimension=4)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    features = module({"token_embeddings": hidden, "attention_mask": mask})
    features["sentence_embedding"].sum().backward()
    expected = torch.zeros(2, 3, 4)
    for row, real in enumerate(mask.bool()):
        count = int(real.sum())
        expected[row, real] += 1.0 / count  # mean's gradient
        chosen = torch.where(real)[0]
        best = hidden[row, chosen].detach().argmax(dim=0)
        for column in range(4):
            expected[row, chosen[best[column]], column] += 1.0  # max's gradient
    torch.testing.assert_close(hidden.grad, expected)
