"""The ONNX Runtime runner against the torch runner (every strategy, every family), against
sentence-transformers (all-MiniLM-L6-v2), and what it must refuse; export's folder and the
cache behind backend="onnx"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import hiddenpool
import tiny_models
from hiddenpool.encoder import Encoder
from hiddenpool.evaluation import evaluate
from hiddenpool.export import export_onnx, source_pooling
from hiddenpool.runners.onnx_runner import MANIFEST, OnnxRunner

pytest.importorskip("onnxruntime")

TEXTS = [text for text in tiny_models.TEXTS if text] + ["", "the cat"]
STRATEGIES = [
    "mean@last",
    "cls@last",
    "last@last",
    "max@last",
    "sum@last",
    "mean_sqrt_len@last",
    "weighted_mean@last",
    "mean+max@last2:concat",
    "mean@all:mean",
    "max@first_last:sum",
    "mean@embeddings",
    "mean@-2",
]


def both_encoders(model, tokenizer, folder, *, project=False):
    torch_encoder = Encoder(model, tokenizer, project=project)
    export_onnx(torch_encoder, folder)
    return torch_encoder, Encoder.from_pretrained(folder, project=project)


def assert_same_rows(torch_encoder, onnx_encoder, texts, strategies, **options):
    assert onnx_encoder.backend == "onnx" and torch_encoder.backend == "torch"
    expected = torch_encoder.encode(texts, strategies, **options)
    ours = onnx_encoder.encode(texts, strategies, **options)
    for strategy in strategies:
        assert ours[strategy].shape == expected[strategy].shape, strategy
        np.testing.assert_allclose(ours[strategy], expected[strategy], atol=1e-5, err_msg=strategy)


def test_bert_every_strategy_equals_the_torch_runner(tmp_path):
    model, tokenizer = tiny_models.bert()
    attention = model.config._attn_implementation
    torch_encoder, onnx_encoder = both_encoders(model, tokenizer, tmp_path / "bert")
    # Export traces with eager attention and gives the caller's model its own back.
    assert model.config._attn_implementation == attention
    assert_same_rows(torch_encoder, onnx_encoder, TEXTS, STRATEGIES, batch_size=3)
    manifest = json.loads((tmp_path / "bert" / MANIFEST).read_text())
    assert manifest["family"] == "encoder" and manifest["state_count"] == 5
    # Type ids are an input where the tokenizer makes them (this one does not).
    makes_type_ids = "token_type_ids" in tokenizer.model_input_names
    assert manifest["inputs"] == ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if makes_type_ids else []
    )


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_gpt2_equals_the_torch_runner_and_each_text_alone(tmp_path, padding_side):
    model, tokenizer = tiny_models.gpt2(padding_side)
    torch_encoder, onnx_encoder = both_encoders(model, tokenizer, tmp_path / "gpt2")
    assert onnx_encoder.family == "decoder"
    assert onnx_encoder.runner.tokenizer.padding_side == padding_side
    assert_same_rows(torch_encoder, onnx_encoder, TEXTS[:-2], STRATEGIES)
    texts = TEXTS[:-2]
    batched = onnx_encoder.encode(texts, "last@last")
    for index, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            alone = model(input_ids=ids).last_hidden_state[0, -1].numpy()
        np.testing.assert_allclose(batched[index], alone, atol=1e-5)


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_clip_eos_under_both_rules_and_projection(tmp_path, legacy_eos):
    model, tokenizer = tiny_models.clip(legacy_eos, with_projection=True)
    torch_encoder, onnx_encoder = both_encoders(model, tokenizer, tmp_path / "clip", project=True)
    assert onnx_encoder.runner.eos_rule == ("argmax" if legacy_eos else "first")
    assert_same_rows(torch_encoder, onnx_encoder, TEXTS, ["eos@last", "mean@last", "cls@-2"])
    # eos@last projected is CLIP's text_embeds.
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        text_embeds = model(**encoded).text_embeds.numpy()
    np.testing.assert_allclose(onnx_encoder.encode(TEXTS, "eos@last"), text_embeds, atol=1e-5)
    unprojected = Encoder.from_pretrained(tmp_path / "clip")
    torch_unprojected = Encoder(model, tokenizer)
    assert_same_rows(torch_unprojected, unprojected, TEXTS, STRATEGIES)


def test_clip_without_projection_refuses_project(tmp_path):
    model, tokenizer = tiny_models.clip(False)
    export_onnx(Encoder(model, tokenizer), tmp_path / "clip")
    with pytest.raises(ValueError, match=r"project: .* has no text projection"):
        Encoder.from_pretrained(tmp_path / "clip", project=True)


def test_t5_exports_the_encoder_only(tmp_path):
    model, tokenizer = tiny_models.t5()
    torch_encoder, onnx_encoder = both_encoders(model, tokenizer, tmp_path / "t5")
    assert onnx_encoder.family == "encoder-decoder"
    assert_same_rows(torch_encoder, onnx_encoder, TEXTS, [*STRATEGIES, "eos@last"])
    with torch.inference_mode():
        encoded = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
        expected = model.get_encoder()(**encoded).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(onnx_encoder.encode(TEXTS[:3], "cls@last"), expected, atol=1e-5)


@pytest.fixture(scope="module")
def minilm_int8(minilm_path, tmp_path_factory) -> str:
    return export_onnx(
        minilm_path, tmp_path_factory.mktemp("onnx") / "minilm-int8", quantize="int8"
    )


VARIED_TEXTS = [
    "A man is playing a guitar.",
    "hi",
    "",
    "The quick brown fox jumps over the lazy dog. " * 30,  # over 256 tokens: truncated
    "Ünïcödé, emoji 🙂 and\ttabs\nnewlines",
    "A woman is slicing an onion in a small kitchen while the radio plays.",
] * 4


@pytest.mark.slow
def test_minilm_onnx_equals_sentence_transformers(minilm_path, minilm_onnx):
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(minilm_path, device="cpu").encode(VARIED_TEXTS)
    encoder = Encoder.from_pretrained(minilm_onnx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = encoder.encode(VARIED_TEXTS, normalize=True, max_batch_tokens=600)
    assert any("4 of 24 texts were longer than max_length=256" in str(w.message) for w in caught)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    with open(os.path.join(minilm_onnx, MANIFEST)) as handle:
        manifest = json.load(handle)
    assert manifest["source_pooling"] == {"strategy": "mean@last", "normalize": True}
    assert manifest["max_length"] == 256 and manifest["hidden_size"] == 384


@pytest.mark.slow
def test_int8_rows_stay_close_to_float32(minilm_onnx, minilm_int8):
    """On the sentences shipped with hiddenpool: every int8 row within cosine 0.98 of its
    float32 row, and the Spearman of mean@last within 0.01."""
    pairs = evaluate.read_pairs(evaluate.default_data_path())
    float32 = Encoder.from_pretrained(minilm_onnx)
    int8 = Encoder.from_pretrained(minilm_int8)
    with open(os.path.join(minilm_int8, MANIFEST)) as handle:
        assert json.load(handle)["weights"] == "int8"
    assert (int8.quantization, float32.quantization) == ("dynamic", None)
    sentences = list(dict.fromkeys(pairs.first + pairs.second))
    exact = float32.encode(sentences, normalize=True)
    quantized = int8.encode(sentences, normalize=True)
    assert np.min(np.sum(exact * quantized, axis=1)) > 0.98
    assert not np.allclose(exact, quantized, atol=1e-4)  # the graph really is quantized
    scores = [
        evaluate.compare(e, pairs, ["mean@last"]).results[0].spearman for e in (float32, int8)
    ]
    assert abs(scores[0] - scores[1]) < 0.01


STSB_DEV = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "stsb", "sts-dev.csv"
)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(STSB_DEV), reason="STS-B dev is not beside the project")
def test_int8_stsb_dev_spearman_within_0_005_of_float32(minilm_onnx, minilm_int8):
    pairs = evaluate.read_pairs(STSB_DEV)
    scores = [
        evaluate.compare(Encoder.from_pretrained(folder), pairs, ["mean@last"]).results[0].spearman
        for folder in (minilm_onnx, minilm_int8)
    ]
    assert scores[0] == pytest.approx(0.8672, abs=5e-4)
    assert abs(scores[0] - scores[1]) < 0.005


def foreign_folder(path, *, layout: str):
    """A folder as optimum or sentence-transformers write one: model.onnx with only
    last_hidden_state (at the top, or under onnx/), tokenizer and config beside it."""
    model, tokenizer = tiny_models.bert()
    graph_dir = path / "onnx" if layout == "sentence-transformers" else path
    graph_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    if layout == "sentence-transformers":
        model.save_pretrained(path)  # weights beside the graph, as on the hub
    else:
        model.config.save_pretrained(path)
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
    mask = (ids != 0).long()

    class LastOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LastOnly(),
            (ids, mask, torch.zeros_like(ids)),
            str(graph_dir / "model.onnx"),
            dynamo=False,
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={name: {0: "b", 1: "t"} for name in [*names, "last_hidden_state"]},
        )
    return model, tokenizer


@pytest.mark.parametrize("layout", ["optimum", "sentence-transformers"])
def test_foreign_folder_with_only_the_last_state(tmp_path, layout):
    model, tokenizer = foreign_folder(tmp_path, layout=layout)
    if layout == "sentence-transformers":
        # With weights beside the graph, "auto" keeps torch, where every layer exists.
        assert Encoder.from_pretrained(tmp_path, device="cpu").backend == "torch"
        encoder = Encoder.from_pretrained(tmp_path, backend="onnx")
    else:
        encoder = Encoder.from_pretrained(tmp_path)
    assert encoder.backend == "onnx"
    expected = Encoder(model, tokenizer).encode(TEXTS, ["mean@last", "cls@-1", "max@last"])
    ours = encoder.encode(TEXTS, ["mean@last", "cls@-1", "max@last"])
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], value, atol=1e-5)
    for strategy in ("mean@last4:sum", "mean@embeddings", "cls@-2"):
        with pytest.raises(
            ValueError,
            match=rf"strategy {strategy}: needs hidden states other than the last, but .*"
            r"outputs only \['last_hidden_state'\]; export .*hiddenpool export",
        ):
            encoder.encode(["the cat"], strategy)


def test_no_torch_or_transformers_imported_on_the_onnx_path(tmp_path):
    model, tokenizer = tiny_models.bert()
    folder = export_onnx(Encoder(model, tokenizer), tmp_path / "bert")
    expected = Encoder(model, tokenizer).encode(TEXTS, "mean@last4:sum")
    np.save(tmp_path / "expected.npy", expected)
    expected_path = str(tmp_path / "expected.npy")
    script = (
        "import sys, numpy as np, hiddenpool\n"
        f"encoder = hiddenpool.Encoder.from_pretrained({folder!r})\n"
        f"rows = encoder.encode({TEXTS!r}, 'mean@last4:sum')\n"
        f"np.testing.assert_allclose(rows, np.load({expected_path!r}), atol=1e-5)\n"
        "loaded = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_thread_count_follows_set_num_threads(tmp_path):
    model, tokenizer = tiny_models.bert()
    encoder = Encoder.from_pretrained(export_onnx(Encoder(model, tokenizer), tmp_path / "b"))
    runner = encoder.runner
    assert isinstance(runner, OnnxRunner)
    before = hiddenpool.get_num_threads()
    try:
        for threads in (1, 2):
            hiddenpool.set_num_threads(threads)
            encoder.encode(["the cat"])
            options = runner._current_session().get_session_options()
            assert options.intra_op_num_threads == threads
    finally:
        hiddenpool.set_num_threads(before)


def test_backend_onnx_exports_once_into_the_cache(tmp_path, monkeypatch):
    model, tokenizer = tiny_models.bert()
    source = tmp_path / "bert-source"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    monkeypatch.setenv("HIDDENPOOL_CACHE", str(tmp_path / "cache"))
    first = Encoder.from_pretrained(source, backend="onnx")
    cached = os.listdir(tmp_path / "cache" / "onnx")
    assert len(cached) == 1
    made = os.path.getmtime(tmp_path / "cache" / "onnx" / cached[0] / "model.onnx")
    second = Encoder.from_pretrained(source, backend="onnx")
    assert os.listdir(tmp_path / "cache" / "onnx") == cached
    assert os.path.getmtime(tmp_path / "cache" / "onnx" / cached[0] / "model.onnx") == made
    expected = Encoder(model, tokenizer).encode(TEXTS, "mean@all:mean")
    for encoder in (first, second):
        assert encoder.backend == "onnx"
        np.testing.assert_allclose(encoder.encode(TEXTS, "mean@all:mean"), expected, atol=1e-5)
    Encoder.from_pretrained(source, backend="onnx", quantize="int8")
    assert len(os.listdir(tmp_path / "cache" / "onnx")) == 2


def test_bad_arguments_are_refused_before_work(tmp_path):
    model, tokenizer = tiny_models.bert()
    folder = export_onnx(Encoder(model, tokenizer), tmp_path / "bert")
    with pytest.raises(ValueError, match=r"output_dir: .* exists and is not an empty folder"):
        export_onnx(Encoder(model, tokenizer), folder)
    with pytest.raises(ValueError, match="expected None, 'int8' or 'int8-static', got 'int4'"):
        export_onnx(Encoder(model, tokenizer), tmp_path / "other", quantize="int4")
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="device: applies to the torch backend only"):
        Encoder.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match="backend: expected 'auto', 'torch', 'onnx' or 'openvino'"):
        Encoder.from_pretrained(folder, backend="tensorrt")
    with pytest.raises(ValueError, match=r"backend: .* is an ONNX folder without transformers"):
        Encoder.from_pretrained(folder, backend="torch")
    with pytest.raises(ValueError, match=r"quantize: .* is already an ONNX folder"):
        Encoder.from_pretrained(folder, quantize="int8")
    with pytest.raises(ValueError, match=r"model: .* holds neither hiddenpool-onnx.json nor model"):
        OnnxRunner(str(tmp_path))
    # Nothing half-written beside the folders.
    assert sorted(os.listdir(tmp_path)) == ["bert"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text(json.dumps({"format": 1, "family": "encoder"}))
    with pytest.raises(ValueError, match=r"model: .*hiddenpool-onnx.json is incomplete"):
        Encoder.from_pretrained(broken)
    (broken / MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="has format 99; this hiddenpool reads format 1"):
        Encoder.from_pretrained(broken)


def test_source_pooling_reads_both_sentence_transformers_formats(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    old = {"word_embedding_dimension": 8, "pooling_mode_cls_token": True}
    old["pooling_mode_max_tokens"] = True
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(old))
    assert source_pooling(str(tmp_path)) == {"strategy": "first+max@last", "normalize": False}
    new = {"embedding_dimension": 8, "pooling_mode": ["mean", "lasttoken"], "include_prompt": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(new))
    modules.append(
        {"idx": 2, "name": "2", "path": "2", "type": "sentence_transformers.models.Normalize"}
    )
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert source_pooling(str(tmp_path)) == {"strategy": "mean+last@last", "normalize": True}


def test_token_report_and_empty_input_equal_the_torch_runner(tmp_path):
    model, tokenizer = tiny_models.bert()
    torch_encoder = Encoder(model, tokenizer, max_length=8)
    export_onnx(torch_encoder, tmp_path / "bert")
    onnx_encoder = Encoder.from_pretrained(tmp_path / "bert")
    assert onnx_encoder.max_length == 8
    assert onnx_encoder.token_report(TEXTS) == torch_encoder.token_report(TEXTS)
    assert onnx_encoder.token_report(TEXTS).truncated_texts == 2
    with pytest.warns(UserWarning, match=f"2 of {len(TEXTS)} texts were longer than max_length=8"):
        onnx_encoder.encode(TEXTS)
    empty = onnx_encoder.encode([], ["mean@last", "mean+max@last2:concat"])
    assert empty["mean@last"].shape == (0, 16) and empty["mean+max@last2:concat"].shape == (0, 64)


def test_spans_on_onnx_runtime_equal_torch(minilm_path, minilm_onnx):
    """Tokens, words, prompt exclusion and chunks read the tokenizer.json tokenizer on ONNX
    Runtime: the same values as on torch."""
    on_torch = Encoder.from_pretrained(minilm_path, backend="torch", device="cpu")
    on_onnx = Encoder.from_pretrained(minilm_onnx)
    texts = ["unbelievably good weather", "a cat"]
    for ours, theirs in zip(
        on_onnx.encode_tokens(texts, "last2:mean"),
        on_torch.encode_tokens(texts, "last2:mean"),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    for ours, theirs in zip(
        on_onnx.encode_words(texts, "max", return_offsets=True),
        on_torch.encode_words(texts, "max", return_offsets=True),
        strict=True,
    ):
        np.testing.assert_allclose(ours[0], theirs[0], atol=1e-4)
        np.testing.assert_array_equal(ours[1], theirs[1])
    options = {"prompt": "query: ", "include_prompt": False}
    np.testing.assert_allclose(
        on_onnx.encode(texts, "mean@last", **options),
        on_torch.encode(texts, "mean@last", **options),
        atol=1e-4,
    )
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)  # > 256 tokens
    np.testing.assert_allclose(
        on_onnx.encode_chunks(text, chunk_tokens=50),
        on_torch.encode_chunks(text, chunk_tokens=50),
        atol=1e-4,
    )
