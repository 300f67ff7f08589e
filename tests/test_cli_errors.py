"""What a new user runs into on the command line: each bad argument answered with one line
naming it (exit code 2, no traceback, no partial file), checked before the model loads
where it can be; output files with the mode open() gives; help, version, and the
documented strategies reachable (weighted layers, --missing-eos)."""

from __future__ import annotations

import itertools
import json
import os
import stat
import sys

import numpy as np
import pytest
import torch

import tiny_models
from cli_runner import run_cli
from hiddenpool import cli
from hiddenpool.encoder import Encoder


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hiddenpool: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def unloadable_folder(tmp_path_factory) -> str:
    """Passes the location checks (a folder with a config.json) but fails to load: an
    argument error reported with this model proves the model was never loaded."""
    folder = tmp_path_factory.mktemp("unloadable")
    config = {"model_type": "no-such-architecture", "num_hidden_layers": 4}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture()
def texts_file(tmp_path) -> str:
    path = tmp_path / "in.txt"
    path.write_text("the cat sat\na dog\n", encoding="utf-8")
    return str(path)


def test_folders_given_as_files(tmp_path, unloadable_folder):
    result = run_cli("compare", "--data", str(tmp_path), "--model", unloadable_folder)
    assert_one_line_error(result, f"--data {tmp_path}: is a folder")
    result = run_cli("encode", "--input", str(tmp_path), "--output", str(tmp_path / "o.npy"))
    assert_one_line_error(result, f"--input {tmp_path}: is a folder")


def test_model_locations(tmp_path, texts_file):
    output = str(tmp_path / "o.npy")
    missing = run_cli("encode", "--model", "/nonexistent/model", "--input", texts_file,
                      "--output", output)  # fmt: skip
    assert_one_line_error(missing, "--model /nonexistent/model: no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("encode", "--model", str(empty), "--input", texts_file, "--output", output)
    assert_one_line_error(result, f"--model {empty}: no config.json in this folder")
    assert not os.path.exists(output)


def test_devices_checked_before_loading(tmp_path, texts_file, unloadable_folder):
    output = str(tmp_path / "o.npy")
    common = ["encode", "--model", unloadable_folder, "--input", texts_file, "--output", output]
    assert_one_line_error(run_cli(*common, "--device", "banana"), "--device banana: not a torch")
    if not torch.cuda.is_available():
        assert_one_line_error(
            run_cli(*common, "--device", "cuda"), "--device cuda: no cuda device is available"
        )


def test_outputs_checked_before_loading(tmp_path, texts_file, unloadable_folder):
    nowhere = tmp_path / "missing-folder"
    result = run_cli("encode", "--model", unloadable_folder, "--input", texts_file,
                     "--output", str(nowhere / "o.npy"))  # fmt: skip
    assert_one_line_error(result, "--output", "does not exist")
    for flag, name in (("--json", "r.json"), ("--plot", "r.png")):
        result = run_cli("compare", "--model", unloadable_folder, flag, str(nowhere / name))
        assert_one_line_error(result, flag, "does not exist")
    result = run_cli("compare", "--model", unloadable_folder, "--plot", str(tmp_path / "r.xyz"))
    assert_one_line_error(result, "--plot", "expected a file name ending in")
    result = run_cli("encode", "--model", unloadable_folder, "--input", texts_file,
                     "--output", str(tmp_path / "o.txt"))  # fmt: skip
    assert_one_line_error(result, "--output", ".npy or .npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_numbers_that_must_be_positive(tmp_path, texts_file, unloadable_folder):
    common = ["encode", "--model", unloadable_folder, "--input", texts_file,
              "--output", str(tmp_path / "o.npy")]  # fmt: skip
    assert_one_line_error(
        run_cli(*common, "--max-length", "0"), "--max-length must be a positive integer"
    )
    assert_one_line_error(
        run_cli(*common, "--batch-size", "0"), "--batch-size must be a positive integer"
    )
    assert_one_line_error(run_cli("bench", "--repeat", "0"), "--repeat must be a positive integer")
    assert_one_line_error(
        run_cli("bench", "--threads", "0"), "--threads must be a positive integer"
    )
    assert_one_line_error(run_cli("bench", "--shapes", "0x0x0"), "shapes: B, T and H must be")


def test_input_options_that_do_not_apply(tmp_path, texts_file, unloadable_folder):
    common = ["encode", "--model", unloadable_folder, "--input", texts_file,
              "--output", str(tmp_path / "o.npy")]  # fmt: skip
    assert_one_line_error(run_cli(*common, "--column", "x"), "--column: applies to .csv")
    assert_one_line_error(run_cli(*common, "--field", "x"), "--field: applies to .json")


def test_strategies_equal_by_meaning_are_refused(tmp_path, texts_file, unloadable_folder):
    result = run_cli("encode", "--model", unloadable_folder, "--input", texts_file,
                     "--output", str(tmp_path / "o.npz"),
                     "--strategies", "cls@last", "first @ last")  # fmt: skip
    assert_one_line_error(result, "'first @ last': the same as 'cls@last'", "first@last")


def test_non_utf8_data_names_the_file(tmp_path, unloadable_folder):
    data = tmp_path / "pairs.tsv"
    data.write_bytes(b"sentence1\tsentence2\tscore\n\xff\xfe bad\tx\t1\n")
    result = run_cli("compare", "--data", str(data), "--model", unloadable_folder)
    assert_one_line_error(result, f"--data {data}: not UTF-8 text")


def test_missing_extras_give_install_hints(
    tiny_bert_folder, tmp_path, texts_file, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "transformers", None)
    code = cli.main(["encode", "--model", tiny_bert_folder, "--input", texts_file,
                     "--output", str(tmp_path / "o.npy")])  # fmt: skip
    message = capsys.readouterr().err
    assert (
        code == 2 and "transformers is missing" in message and 'pip install ".[encoder]"' in message
    )
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "hiddenpool.bench", raising=False)
    assert cli.main(["bench"]) == 2
    message = capsys.readouterr().err
    assert "torch, which is not installed" in message and "Traceback" not in message


def test_layers_checked_against_the_config_before_loading(tmp_path, texts_file, unloadable_folder):
    result = run_cli("encode", "--model", unloadable_folder, "--input", texts_file,
                     "--output", str(tmp_path / "o.npy"), "--strategy", "mean@-20")  # fmt: skip
    assert_one_line_error(result, "-20", "5")  # 4 layers: 5 hidden states


def test_strategies_checked_against_the_model_before_encoding(
    tiny_bert_folder, tmp_path, texts_file
):
    output = str(tmp_path / "o.npy")
    common = ["encode", "--model", tiny_bert_folder, "--input", texts_file, "--output", output]
    assert_one_line_error(run_cli(*common, "--strategy", "mean@-20"), "-20")
    assert_one_line_error(
        run_cli(*common, "--strategy", "eos@last"),
        "strategy eos@last: the eos pool needs an end-of-sequence token",
        "last@last",
    )
    assert_one_line_error(
        run_cli(*common, "--strategy", "mean@last4:weighted"),
        "combines layers by weight",
        "give --layer-weights",
    )
    assert_one_line_error(
        run_cli(*common, "--layer-weights", "1", "2"), "--layer-weights: given, but no strategy"
    )
    assert not os.path.exists(output)


def test_weighted_layers_from_the_command_line(tiny_bert_folder, tmp_path, texts_file):
    output = tmp_path / "o.npy"
    result = run_cli("encode", "--model", tiny_bert_folder, "--input", texts_file,
                     "--output", str(output), "--strategy", "mean@last4:weighted",
                     "--layer-weights", "0.5", "-1", "2", "0", "--layer-scale", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, tokenizer = tiny_models.bert()
    texts = ["the cat sat", "a dog"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = model(**encoded, output_hidden_states=True).hidden_states
    weights = np.exp([0.5, -1, 2, 0]) / np.exp([0.5, -1, 2, 0]).sum() * 2
    mixed = sum(w * states[i].numpy() for w, i in zip(weights, [1, 2, 3, 4], strict=True))
    mask = encoded["attention_mask"].numpy()[..., None]
    expected = (mixed * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(np.load(output), expected, atol=1e-5)


def test_missing_eos_option(tmp_path):
    model, tokenizer = tiny_models.clip(False, template=False)  # texts carry no end-of-text
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    source = tmp_path / "in.txt"
    source.write_text("the cat\na dog sat\n", encoding="utf-8")
    common = ["encode", "--model", str(folder), "--input", str(source), "--strategy", "eos@last"]
    refused = run_cli(*common, "--output", str(tmp_path / "a.npy"))
    assert_one_line_error(refused, "eos", "missing_eos")
    result = run_cli(*common, "--output", str(tmp_path / "b.npy"), "--missing-eos", "last")
    assert result.returncode == 0, result.stderr
    expected = Encoder(model, tokenizer).encode(["the cat", "a dog sat"], "last@last")
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), expected, atol=1e-6)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_mode_open_gives(tiny_bert_folder, tmp_path, texts_file, umask):
    output = tmp_path / "o.npy"
    result = run_cli("encode", "--model", tiny_bert_folder, "--input", texts_file,
                     "--output", str(output), umask=umask)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask
    # Written over, a file keeps its mode, as open(path, "w") leaves it.
    output.chmod(0o640)
    result = run_cli("encode", "--model", tiny_bert_folder, "--input", texts_file,
                     "--output", str(output), umask=umask)  # fmt: skip
    assert result.returncode == 0 and stat.S_IMODE(output.stat().st_mode) == 0o640


def test_plot_format_follows_the_extension_and_upper_case_works(tiny_bert_folder, tmp_path):
    pytest.importorskip("matplotlib")
    jpeg, pdf = tmp_path / "r.JPG", tmp_path / "r.pdf"
    for path in (jpeg, pdf):
        result = run_cli("compare", "--model", tiny_bert_folder, "--strategies", "mean@last",
                         "--plot", str(path))  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert jpeg.read_bytes()[:2] == b"\xff\xd8" and pdf.read_bytes()[:4] == b"%PDF"


def test_json_array_input_and_both_strategy_spellings(tiny_bert_folder, tmp_path):
    texts = ["the cat sat", "a dog"]
    source = tmp_path / "in.json"
    source.write_text(json.dumps([{"body": text} for text in texts]), encoding="utf-8")
    output = tmp_path / "O.NPY"
    result = run_cli("encode", "--model", tiny_bert_folder, "--input", str(source), "--field",
                     "body", "--output", str(output), "--strategies", "cls@last")  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, tokenizer = tiny_models.bert()
    expected = Encoder(model, tokenizer).encode(texts, "cls@last")
    np.testing.assert_allclose(np.load(output), expected, atol=1e-6)
    result = run_cli("compare", "--model", tiny_bert_folder, "--strategy", "cls@last")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model: ") and lines[1] == "runtime: torch, precision fp32"
    assert lines[2].startswith("data: ")
    assert "encoded once for the 1 strategy" in result.stdout


def test_help_and_version():
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("hiddenpool 0.")
    for command in ("compare", "encode", "serve", "export", "bench"):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        # Each command's own examples; the grammar where it takes strategies.
        examples = result.stdout.split("examples:", 1)[1].split()
        assert examples[:2] == ["hiddenpool", command], (command, examples[:2])
        assert all(
            word == command
            for previous, word in itertools.pairwise(examples)
            if previous == "hiddenpool"
        ), command
        grammar = "POOL[+POOL...]@LAYERS[:COMBINE]" in result.stdout
        assert grammar == (command in ("compare", "encode", "serve")), command
    encode_help = " ".join(run_cli("encode", "--help").stdout.split())
    assert "(default: 1024)" in encode_help and "(default: raise)" in encode_help
