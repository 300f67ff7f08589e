"""Static int8 (`export --quantize int8-static`): NNCF's graph against the float32 export it
came from (the four families, every runtime that runs it), STS-B dev Spearman within 0.003
of fp32 on all-MiniLM-L6-v2 calibrated on the packaged texts (which share no sentence with
STS-B), the runtime chosen for it, the checks on calibration texts, and nncf's telemetry
kept off."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import tiny_models
from cli_runner import run_cli
from hiddenpool import Encoder, export_onnx
from hiddenpool.evaluation import evaluate
from hiddenpool.export import default_calibration_texts
from test_onnx import STSB_DEV, TEXTS

pytest.importorskip("nncf")
pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")


def cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return np.asarray((first * second).sum(1) / norms)


def graph_ops(folder: str) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(os.path.join(folder, "model.onnx")).graph.node}


FAMILIES = {
    "bert": (tiny_models.bert, {}),
    "gpt2": (lambda: tiny_models.gpt2("left"), {}),
    "clip": (lambda: tiny_models.clip(False, with_projection=True), {"project": True}),
    "t5": (tiny_models.t5, {}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_quantizes_and_stays_near_its_float32_export(tmp_path, family):
    make, options = FAMILIES[family]
    model, tokenizer = make()
    encoder = Encoder(model, tokenizer, **options)
    exact = export_onnx(encoder, tmp_path / "float32")
    static = export_onnx(
        encoder, tmp_path / "static", quantize="int8-static", calibration=TEXTS * 3
    )
    assert "QuantizeLinear" in graph_ops(static) and "QuantizeLinear" not in graph_ops(exact)
    manifest = json.loads((tmp_path / "static" / "hiddenpool-onnx.json").read_text())
    assert manifest["weights"] == "int8-static"
    texts = TEXTS[:-2]
    expected = Encoder.from_pretrained(exact, **options).encode(texts, "mean@last")
    for backend in ("openvino", "onnx"):
        quantized = Encoder.from_pretrained(static, backend=backend, **options)
        assert quantized.precision == "int8" and quantized.backend == backend
        rows = quantized.encode(texts, "mean@last")
        assert cosines(rows, expected).min() > 0.99, backend


@pytest.fixture(scope="module")
def minilm_static(minilm_path, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("static") / "minilm-int8-static"
    return str(export_onnx(minilm_path, folder, quantize="int8-static"))


def test_auto_runs_a_static_folder_on_openvino(minilm_static):
    encoder = Encoder.from_pretrained(minilm_static)
    assert (encoder.backend, encoder.runtime, encoder.precision) == ("openvino", "OpenVINO", "int8")
    assert Encoder.from_pretrained(minilm_static, precision="int8").backend == "openvino"
    assert Encoder.from_pretrained(minilm_static, backend="onnx").backend == "onnx"
    with pytest.raises(ValueError, match="bf16 runs a float32 export"):
        Encoder.from_pretrained(minilm_static, precision="bf16")


def test_static_rows_do_not_depend_on_the_batch(minilm_static):
    """Activation scales are fixed at export, so a text's row is the same alone and among
    others (up to float summation order), unlike dynamic int8's per-batch scales."""
    encoder = Encoder.from_pretrained(minilm_static)
    texts = ["a cat", "A man is playing a guitar on a crowded street corner at night.", "hi"]
    together = encoder.encode(texts, "mean@last")
    for index, text in enumerate(texts):
        alone = encoder.encode([text], "mean@last")[0]
        np.testing.assert_allclose(alone, together[index], atol=1e-4)


def test_minilm_rows_near_fp32_on_the_packaged_pairs(minilm_static, minilm_onnx):
    pairs = evaluate.read_pairs(evaluate.default_data_path())
    texts = sorted(set(pairs.first) | set(pairs.second))
    assert not set(texts) & set(default_calibration_texts())  # calibrated on other texts
    exact = Encoder.from_pretrained(minilm_onnx).encode(texts, "model")
    rows = Encoder.from_pretrained(minilm_static).encode(texts, "model")
    assert cosines(rows, exact).min() > 0.98
    assert np.abs(rows - exact).max() > 1e-4  # int8 really ran


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(STSB_DEV), reason="STS-B dev is not beside the project")
def test_stsb_dev_spearman_within_0_003_of_fp32(minilm_static, minilm_onnx):
    pairs = evaluate.read_pairs(STSB_DEV)
    assert not (set(pairs.first) | set(pairs.second)) & set(default_calibration_texts())
    exact, static = (
        evaluate.compare(Encoder.from_pretrained(folder), pairs, ["mean@last"]).results[0]
        for folder in (minilm_onnx, minilm_static)
    )
    assert exact.spearman == pytest.approx(0.8672, abs=5e-4)
    assert abs(static.spearman - exact.spearman) < 0.003


def test_calibration_is_checked_before_the_export(minilm_path, tmp_path):
    output = tmp_path / "never"
    with pytest.raises(TypeError, match="calibration: expected a list of texts, got str"):
        export_onnx(minilm_path, output, quantize="int8-static", calibration="a text")
    with pytest.raises(TypeError, match=r"calibration\[1\]: expected str, got int"):
        export_onnx(minilm_path, output, quantize="int8-static", calibration=["a", 1])
    with pytest.raises(ValueError, match="calibration: no texts"):
        export_onnx(minilm_path, output, quantize="int8-static", calibration=[])
    with pytest.raises(ValueError, match="applies to quantize='int8-static' only"):
        export_onnx(minilm_path, output, quantize="int8", calibration=["a"])
    with pytest.raises(ValueError, match="quantize: expected None, 'int8' or 'int8-static'"):
        export_onnx(minilm_path, output, quantize="int4")  # type: ignore[arg-type]
    assert not output.exists()


def test_command_line_calibration(tiny_bert_folder, tmp_path):
    texts = tmp_path / "calibration.txt"
    texts.write_text("a cat sat\n\nthe dog ran off into the woods\n", encoding="utf-8")
    output = tmp_path / "out"
    result = run_cli(
        "export", tiny_bert_folder, "--output", str(output), "--quantize", "int8-static",
        "--calibration", str(texts),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(int8-static)" in result.stdout
    assert json.loads((output / "hiddenpool-onnx.json").read_text())["weights"] == "int8-static"
    assert "QuantizeLinear" in graph_ops(str(output))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    for arguments, message in [
        (["--calibration", str(texts)], "applies to --quantize int8-static only"),
        (["--quantize", "int8-static", "--calibration", str(blank)], "no texts in it"),
        (["--quantize", "int8-static", "--calibration", str(latin)], "not UTF-8 text"),
        (["--quantize", "int8-static", "--calibration", str(tmp_path / "no")], "no such file"),
    ]:
        result = run_cli("export", tiny_bert_folder, "--output", str(tmp_path / "x"), *arguments)
        assert result.returncode == 2 and message in result.stderr, (arguments, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()


def test_precision_int8_checks_the_folder_on_the_command_line(minilm_onnx, minilm_static, tmp_path):
    result = run_cli("compare", "--model", minilm_onnx, "--precision", "int8")
    assert result.returncode == 2 and "holds float32 weights" in result.stderr
    report = tmp_path / "ranking.json"
    result = run_cli(
        "compare", "--model", minilm_static, "--precision", "int8", "--strategies", "mean@last",
        "--bootstrap", "0", "--json", str(report),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "runtime: OpenVINO, precision int8 (static quantization)" in result.stdout
    document = json.loads(report.read_text())
    assert (document["runtime"], document["precision"], document["quantization"]) == (
        "OpenVINO",
        "int8",
        "static",
    )


def test_nncf_telemetry_stays_off():
    """Outside pytest (which nncf detects and silences itself), the export's import of nncf
    picks nncf's telemetry stub, and the NNCF_CI it sets for that is taken away again."""
    import subprocess

    code = (
        "import os, sys; from hiddenpool.export import _import_nncf; _import_nncf(); "
        "from nncf.telemetry import wrapper; "
        "stub = isinstance(wrapper.telemetry, wrapper.NNCFTelemetryStub); "
        "print(stub, 'NNCF_CI' in os.environ, 'pytest' in sys.modules)"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("NNCF_CI", "NNCF_DEV")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    assert result.stdout.split() == ["True", "False", "False"]


def test_a_transformers_folder_quantized_statically_on_load(
    tiny_bert_folder, tmp_path, monkeypatch
):
    monkeypatch.setenv("HIDDENPOOL_CACHE", str(tmp_path / "cache"))
    static = Encoder.from_pretrained(tiny_bert_folder, backend="onnx", quantize="int8-static")
    assert static.precision == "int8" and static.runner.manifest.weights == "int8-static"
    exact = Encoder.from_pretrained(tiny_bert_folder, backend="onnx")
    assert (static.quantization, exact.quantization) == ("static", None)
    texts = TEXTS[:-2]
    assert cosines(static.encode(texts, "mean@last"), exact.encode(texts, "mean@last")).min() > 0.99


def test_the_server_on_a_static_int8_folder(minilm_static):
    """``hiddenpool serve`` on the folder runs it where ``Encoder`` does (OpenVINO), says
    so in /info, and answers with the encoder's rows (static int8 rows do not depend on
    the batch beyond 1e-4)."""
    import httpx

    from test_server import Server

    texts = ["A man is playing a guitar.", "two dogs run", "x", "Ünïcödé and emoji 🙂"]
    expected = Encoder.from_pretrained(minilm_static).encode(texts)
    server = Server("--model", minilm_static)
    try:
        info = httpx.get(f"{server.url}/info").json()
        assert (info["backend"], info["precision"], info["quantization"]) == (
            "openvino",
            "int8",
            "static",
        )
        response = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": server.model, "input": texts}, timeout=120
        )
        assert response.status_code == 200, response.text
        got = np.array([item["embedding"] for item in response.json()["data"]])
        np.testing.assert_allclose(got, expected, atol=1e-4)
    finally:
        assert server.stop() == 0
