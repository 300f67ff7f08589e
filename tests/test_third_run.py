"""What a new user met on a third run, each as the user ran it: a token limit above the
model's positions refused before loading, flags that would have run something else without
a word, outputs that cannot be written refused before the work, repeated flags that kept
only their last value, and a ``:weighted`` strategy without weights found before loading.
The server's share of that run is in test_server.py and test_server_reliability.py."""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import pytest

import tiny_models
from cli_runner import run_cli
from hiddenpool import Encoder, export_onnx
from hiddenpool.runners.base import position_limit
from hiddenpool.runners.onnx_runner import MANIFEST
from test_cli_errors import assert_one_line_error

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "bird"]


@pytest.fixture(scope="module")
def tiny_positions(tiny_bert_folder) -> int:
    with open(os.path.join(tiny_bert_folder, "config.json")) as handle:
        return int(json.load(handle)["max_position_embeddings"])


@pytest.fixture(scope="module")
def tiny_onnx(tiny_bert_folder, tmp_path_factory) -> str:
    return str(export_onnx(tiny_bert_folder, tmp_path_factory.mktemp("tiny") / "onnx"))


@pytest.fixture(scope="module")
def tiny_int8(tiny_bert_folder, tmp_path_factory) -> str:
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("tiny") / "int8"
    return str(export_onnx(tiny_bert_folder, folder, quantize="int8"))


@pytest.fixture(scope="module")
def unloadable_bert(tmp_path_factory, tiny_positions) -> str:
    """A BERT config whose weights are garbage: an error about anything but the weights
    proves the check ran before they were read."""
    folder = tmp_path_factory.mktemp("garbage-bert")
    config = {"model_type": "bert", "max_position_embeddings": tiny_positions}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return str(folder)


# Item 3: --max-length over the model's positions.


def test_position_limit_reads_each_family():
    assert position_limit({"model_type": "bert", "max_position_embeddings": 512}) == 512
    # RoBERTa's positions start after the padding index: 514 rows place 512 tokens.
    roberta = {"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1}
    assert position_limit(roberta) == 512
    assert position_limit({"model_type": "gpt2", "n_positions": 1024}) == 1024
    clip = {"model_type": "clip", "text_config": {"max_position_embeddings": 77}}
    assert position_limit(clip) == 77
    assert position_limit({"model_type": "t5", "d_model": 64}) is None  # relative positions


def test_the_limit_is_what_the_model_really_takes(tiny_bert_folder, tiny_positions):
    """At the limit a text of that many tokens runs; one more position fails in torch
    itself, which is the failure the check replaces."""
    model, tokenizer = tiny_models.bert()
    at_limit = Encoder(model, tokenizer, max_length=tiny_positions)
    long_text = " ".join(["cat"] * (2 * tiny_positions))
    with pytest.warns(UserWarning, match="truncated"):
        assert at_limit.encode([long_text], "mean@last").shape == (1, 16)
    at_limit.runner.tokenizer.max_length = tiny_positions + 1  # past the check, by hand
    with pytest.raises(RuntimeError, match="must match"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at_limit.encode([long_text], "mean@last")
    with pytest.raises(ValueError, match=rf"max_length: {tiny_positions + 1} is over the "):
        Encoder(model, tokenizer, max_length=tiny_positions + 1)
    with pytest.raises(ValueError, match=rf"give at most {tiny_positions}$"):
        Encoder.from_pretrained(tiny_bert_folder, max_length=tiny_positions + 1)


def test_onnx_folders_record_and_check_the_limit(tiny_onnx, tiny_positions):
    with open(os.path.join(tiny_onnx, MANIFEST)) as handle:
        assert json.load(handle)["max_positions"] == tiny_positions
    assert Encoder.from_pretrained(tiny_onnx, max_length=tiny_positions).max_length == (
        tiny_positions
    )
    with pytest.raises(ValueError, match=rf"give at most {tiny_positions}"):
        Encoder.from_pretrained(tiny_onnx, max_length=tiny_positions + 1)


def test_max_length_over_the_positions_is_one_line_before_loading(
    unloadable_bert, tiny_onnx, tiny_positions, tmp_path
):
    source = tmp_path / "in.txt"
    source.write_text("a text\n")
    over = str(tiny_positions * 2)
    for arguments in (
        ["encode", "--model", unloadable_bert, "--input", str(source), "--output",
         str(tmp_path / "out.npy"), "--max-length", over],
        ["compare", "--model", unloadable_bert, "--max-length", over],
        ["serve", "--model", unloadable_bert, "--port", "0", "--max-length", over],
        ["encode", "--model", tiny_onnx, "--input", str(source), "--output",
         str(tmp_path / "out.npy"), "--max-length", over],
    ):  # fmt: skip
        result = run_cli(*arguments)
        assert_one_line_error(result, f"--max-length: {over} is over the {tiny_positions}")
    assert not (tmp_path / "out.npy").exists()


# Item 4: flags that ran something else.


def test_an_int8_folder_runs_int8_and_says_so_and_fp32_is_refused(tiny_int8, tmp_path):
    encoder = Encoder.from_pretrained(tiny_int8)
    assert (encoder.precision, encoder.quantization) == ("int8", "dynamic")
    with pytest.raises(ValueError, match=r"^precision: .* holds int8 weights, which compute"):
        Encoder.from_pretrained(tiny_int8, precision="fp32")
    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    output = tmp_path / "out.npy"
    ran = run_cli(
        "encode", "--model", tiny_int8, "--input", str(source), "--output", str(output),
        "--strategy", "mean@last",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.strip().splitlines() == [
        f"hiddenpool: {tiny_int8} holds int8 weights (dynamic quantization): running int8 "
        "(--precision fp32 refuses them)"
    ]
    np.testing.assert_allclose(np.load(output), encoder.encode(TEXTS, "mean@last"), atol=1e-6)
    refused = run_cli(
        "encode", "--model", tiny_int8, "--input", str(source), "--output",
        str(tmp_path / "fp32.npy"), "--precision", "fp32",
    )  # fmt: skip
    assert_one_line_error(refused, "--precision fp32: ", "holds int8 weights")
    assert not (tmp_path / "fp32.npy").exists()


def test_openvino_on_a_dynamic_int8_folder_is_refused_without_precision(tiny_int8):
    with pytest.raises(ValueError, match=r"^backend: .* is dynamically quantized"):
        Encoder.from_pretrained(tiny_int8, backend="openvino")
    started = time.perf_counter()
    result = run_cli("compare", "--model", tiny_int8, "--backend", "openvino")
    assert_one_line_error(result, "--backend openvino: ", "dynamically quantized", "int8-static")
    assert time.perf_counter() - started < 60  # refused, not a ranking run at a quarter speed


# Items 5 and 7: outputs that cannot be written.


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_outputs_that_cannot_be_written_are_refused_before_the_model_loads(
    unloadable_bert, tiny_bert_folder, tmp_path
):
    source = tmp_path / "in.txt"
    source.write_text("a text\n")
    for arguments, flag in (
        (["encode", "--model", unloadable_bert, "--input", str(source),
          "--output", "/proc/out.npy"], "--output /proc/out.npy"),
        (["compare", "--model", unloadable_bert, "--json", "/proc/x.json"], "--json /proc/x.json"),
        (["compare", "--model", unloadable_bert, "--json", "/sys/x.json"], "--json /sys/x.json"),
        (["export", tiny_bert_folder, "--output", "/proc/x-onnx"], "--output /proc/x-onnx"),
    ):  # fmt: skip
        result = run_cli(*arguments)
        assert_one_line_error(result, f"{flag}: cannot create a file in the folder /")
        assert "MODEL" not in result.stderr and "could not load" not in result.stderr


# Item 10: a flag given twice.


def test_a_strategy_flag_given_twice_keeps_both(tiny_bert_folder, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    output = tmp_path / "out.npz"
    result = run_cli(
        "encode", "--model", tiny_bert_folder, "--input", str(source), "--output", str(output),
        "--strategy", "mean@last", "--strategy", "cls@last", "max@-2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    archive = np.load(output)
    assert list(archive) == ["mean@last", "cls@last", "max@-2"]
    model, tokenizer = tiny_models.bert()
    expected = Encoder(model, tokenizer).encode(TEXTS, ["mean@last", "cls@last", "max@-2"])
    for name, rows in expected.items():
        np.testing.assert_allclose(archive[name], rows, atol=1e-5)


# Item 13: a weighted strategy without weights.


def test_weighted_without_weights_is_refused_before_loading(unloadable_bert, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a\n")
    for arguments in (
        ["compare", "--model", unloadable_bert, "--strategies", "mean@last4:weighted"],
        ["encode", "--model", unloadable_bert, "--input", str(source), "--output",
         str(tmp_path / "o.npy"), "--strategy", "mean@last4:weighted"],
        ["serve", "--model", unloadable_bert, "--port", "0", "--strategy", "mean@all:weighted"],
    ):  # fmt: skip
        result = run_cli(*arguments)
        assert_one_line_error(result, ":weighted': combines layers by weight; give --layer-weights")


# Item 14: progress and noise.


def test_encode_shows_one_progress_bar_for_the_whole_corpus(tiny_bert_folder, tmp_path):
    """On a terminal: one bar whose count of texts only grows across the reader's chunks
    (it restarted with every chunk), ending at the corpus' size."""
    import fcntl
    import pty
    import re
    import struct
    import subprocess
    import sys
    import termios

    texts = [f"text number {index} about cats" for index in range(50)]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    leader, follower = pty.openpty()
    # A terminal 120 columns wide (a new pty is 0 x 0, where tqdm draws nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "hiddenpool", "encode", "--model", tiny_bert_folder,
         "--input", str(source), "--output", str(tmp_path / "out.npy"), "--chunk-size", "8",
         "--max-batch-tokens", "24", "--strategy", "mean@last"],
        stdout=subprocess.PIPE, stderr=follower,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    os.close(follower)
    shown = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the follower closed: the process ended
            break
        if not data:
            break
        shown += data
    os.close(leader)
    assert process.wait(timeout=120) == 0
    counts = [int(n) for n in re.findall(rb"encoding: *(?:\d+%\|[^|]*\| *)?(\d+) texts", shown)]
    assert counts and counts[-1] == len(texts), shown[-300:]
    assert counts == sorted(counts), counts  # never restarts
    assert b"texts/s" in shown
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy").shape, (50, 16))


def test_export_says_each_phase(tiny_bert_folder, tmp_path):
    result = run_cli(
        "export", tiny_bert_folder, "--output", str(tmp_path / "x"), "--quantize", "int8"
    )
    assert result.returncode == 0, result.stderr
    phases = [line.split(": ", 1)[1].rsplit(" (", 1)[0] for line in result.stderr.splitlines()]
    assert phases == [
        "loading the model",
        "exporting the graph",
        "checking it against torch",
        "quantizing (dynamic int8)",
        "writing the folder",
    ]
