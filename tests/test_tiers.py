"""``hiddenpool bench --tiers``: each runtime and precision this install and CPU can run,
measured on the packaged sentences, and the pick for each need."""

from __future__ import annotations

import numpy as np
import pytest

from cli_runner import run_cli
from hiddenpool import Encoder, export_onnx
from hiddenpool.evaluation import tiers
from hiddenpool.evaluation.tiers import Tier, TierResult
from hiddenpool.pipelines import normalize_rows
from test_cli_errors import assert_one_line_error


@pytest.fixture(scope="module")
def tiny_onnx(tiny_bert_folder, tmp_path_factory) -> str:
    pytest.importorskip("onnxruntime")
    return str(export_onnx(tiny_bert_folder, tmp_path_factory.mktemp("tiers") / "onnx"))


@pytest.fixture(scope="module")
def tiny_int8(tiny_bert_folder, tmp_path_factory) -> str:
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("tiers") / "int8"
    return str(export_onnx(tiny_bert_folder, folder, quantize="int8"))


def result(name: str, precision: str, speed: float | None, cosine: float | None) -> TierResult:
    return TierResult(Tier(name, "onnx", precision), speed, cosine)


def test_picks_take_the_fastest_tier_within_each_bound():
    results = [
        result("a fp32", "fp32", 100.0, 1.0),
        result("b fp32", "fp32", 120.0, 0.9999999),
        result("bf16", "bf16", 300.0, 0.99995),
        result("int8 far", "int8", 900.0, 0.97),  # fastest, but past the int8 bound
        result("int8", "int8", 500.0, 0.985),
        TierResult(Tier("skipped", "openvino", "fp32"), skipped="not installed"),
    ]
    chosen = {need: r.tier.name if r else None for need, r in tiers.picks(results).items()}
    assert chosen == {"exact": "b fp32", "fp32 quality": "bf16", "int8 bound": "int8"}
    assert tiers.picks([results[-1]]) == {"exact": None, "fp32 quality": None, "int8 bound": None}


def test_the_tiers_of_a_float32_folder_and_their_rows(tiny_onnx):
    listed = {tier.name: reason for tier, reason in tiers.tiers_for(tiny_onnx)}
    assert set(listed) == {"ONNX Runtime fp32", "OpenVINO fp32", "OpenVINO bf16"}
    assert listed["ONNX Runtime fp32"] is None
    texts = ["a cat sat on the mat", "two dogs run", "bird", "the sun is hot today"]
    results = tiers.measure(tiny_onnx, texts=texts, seconds=0.05)
    ran = {r.tier.name: r for r in results if r.sentences_per_second is not None}
    assert "ONNX Runtime fp32" in ran and all(r.sentences_per_second > 0 for r in ran.values())
    # The cosine column, recomputed in numpy from the Encoder's own rows.
    reference = normalize_rows(Encoder.from_pretrained(tiny_onnx).encode(texts, "mean@last"))
    for name, measured in ran.items():
        tier = next(t for t, _ in tiers.tiers_for(tiny_onnx) if t.name == name)
        encoder = Encoder.from_pretrained(tiny_onnx, backend=tier.backend, precision=tier.precision)  # type: ignore[arg-type]
        rows = normalize_rows(encoder.encode(texts, "mean@last"))
        expected = float(np.min(np.sum(reference * rows, axis=1)))
        assert measured.worst_cosine == pytest.approx(expected, abs=1e-6), name
        if tier.exact:
            assert measured.worst_cosine > 0.99999
    for measured in results:
        assert (measured.sentences_per_second is None) == (measured.skipped is not None)


def test_an_int8_folder_has_its_own_tier_and_no_fp32_reference(tiny_int8):
    listed = [tier.name for tier, _ in tiers.tiers_for(tiny_int8)]
    assert listed == ["ONNX Runtime int8 (dynamic)"]
    (measured,) = tiers.measure(tiny_int8, texts=["a cat", "a dog"], seconds=0.05)
    assert measured.sentences_per_second is not None and measured.worst_cosine is None


def test_bench_tiers_from_the_command_line(tiny_onnx):
    result = run_cli(
        "bench", "--tiers", "--model", tiny_onnx, "--seconds", "0.05", "--threads", "1"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"tiers of {tiny_onnx} on ") and "1 threads" in lines[0]
    assert any(line.startswith("ONNX Runtime fp32 ") for line in lines)
    assert "pick for exact rows (fp32): " in result.stdout
    assert "ONNX Runtime fp32: " in result.stderr  # progress, a line per tier
    bad = run_cli("bench", "--model", tiny_onnx)
    assert_one_line_error(bad, "--model: applies to --tiers")
    assert_one_line_error(run_cli("bench", "--tiers", "--seconds", "0"), "--seconds")
