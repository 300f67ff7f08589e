"""The OpenVINO runner against ONNX Runtime on the same exported folders (every strategy,
the four families, GPT-2 under both padding sides, CLIP under both EOS rules), bf16
against fp32 on all-MiniLM-L6-v2, and the precision checks (a CPU without bf16 simulated
by its flags)."""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from cli_runner import run_cli
from hiddenpool import Encoder, export_onnx
from hiddenpool.runners import openvino_runner
from test_onnx import STRATEGIES, TEXTS  # the same strategies and texts as ONNX Runtime

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")


def assert_runtimes_agree(folder, strategies, texts=TEXTS, project=False):
    onnx = Encoder.from_pretrained(folder, project=project)
    vino = Encoder.from_pretrained(folder, backend="openvino", project=project)
    assert onnx.backend == "onnx" and vino.backend == "openvino" and vino.precision == "fp32"
    expected = onnx.encode(texts, strategies)
    got = vino.encode(texts, strategies)
    for strategy in strategies:
        assert got[strategy].shape == expected[strategy].shape, strategy
        np.testing.assert_allclose(got[strategy], expected[strategy], atol=1e-5, err_msg=strategy)


def test_bert(tmp_path):
    model, tokenizer = tiny_models.bert()
    folder = export_onnx(Encoder(model, tokenizer), tmp_path / "bert")
    assert_runtimes_agree(folder, STRATEGIES)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_gpt2_both_padding_sides(tmp_path, padding_side):
    model, tokenizer = tiny_models.gpt2(padding_side)
    folder = export_onnx(Encoder(model, tokenizer), tmp_path / "gpt2")
    assert_runtimes_agree(folder, STRATEGIES, TEXTS[:-2])


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_clip_both_eos_rules(tmp_path, legacy_eos):
    model, tokenizer = tiny_models.clip(legacy_eos, with_projection=True)
    folder = export_onnx(Encoder(model, tokenizer, project=True), tmp_path / "clip")
    assert_runtimes_agree(folder, ["eos@last", "mean@last", "cls@-2"], project=True)
    assert_runtimes_agree(folder, [*STRATEGIES, "eos@last"])


def test_t5_encoder(tmp_path):
    model, tokenizer = tiny_models.t5()
    folder = export_onnx(Encoder(model, tokenizer), tmp_path / "t5")
    assert_runtimes_agree(folder, [*STRATEGIES, "eos@last"])


def test_only_the_states_asked_for_are_compiled(minilm_onnx):
    vino = Encoder.from_pretrained(minilm_onnx, backend="openvino")
    vino.encode(["a cat"], "mean@last")
    assert list(vino.runner._compiled) == [("last_hidden_state",)]
    vino.encode(["a cat"], "mean@first_last:mean")
    assert ("hidden_state_1", "last_hidden_state") in vino.runner._compiled


def test_bf16_rows_are_within_cosine_0999_of_fp32(minilm_onnx):
    if not any(flag in openvino_runner.cpu_flags() for flag in openvino_runner.BF16_FEATURES):
        pytest.skip("this CPU has neither AVX512_BF16 nor AMX")
    texts = [*TEXTS, "A man is playing a guitar on the street.", "Stocks fell sharply."]
    fp32 = Encoder.from_pretrained(minilm_onnx).encode(texts, "model")
    bf16 = Encoder.from_pretrained(minilm_onnx, precision="bf16")
    assert bf16.backend == "openvino" and bf16.precision == "bf16"
    rows = bf16.encode(texts, "model")
    cosines = (rows * fp32).sum(1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosines.min() > 0.999
    assert np.abs(rows - fp32).max() > 1e-6  # bf16 really ran


def test_bf16_is_refused_on_a_cpu_without_it(minilm_onnx, monkeypatch):
    monkeypatch.setattr(openvino_runner, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    with pytest.raises(ValueError, match="bf16 needs a CPU with AVX512_BF16 or AMX"):
        Encoder.from_pretrained(minilm_onnx, precision="bf16")
    with pytest.raises(ValueError, match="AVX512_BF16"):
        openvino_runner.check_precision("bf16", frozenset({"avx2"}))
    openvino_runner.check_precision("bf16", frozenset({"amx_bf16"}))
    with pytest.raises(ValueError, match="bf16 runs on OpenVINO"):
        Encoder.from_pretrained(minilm_onnx, precision="bf16", backend="onnx")


def test_precision_on_the_command_line(minilm_onnx, tmp_path):
    result = run_cli("compare", "--model", minilm_onnx, "--backend", "torch", "--precision", "bf16")
    assert result.returncode == 2 and "--precision bf16" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    output = tmp_path / "out.json"
    result = run_cli(
        "compare",
        "--model",
        minilm_onnx,
        "--backend",
        "openvino",
        "--strategies",
        "mean@last",
        "--bootstrap",
        "0",
        "--json",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    assert "runtime: OpenVINO, precision fp32" in result.stdout
    import json

    document = json.loads(output.read_text())
    assert document["runtime"] == "OpenVINO" and document["precision"] == "fp32"
