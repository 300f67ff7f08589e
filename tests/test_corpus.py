"""Streamed encode: every input and output format against Encoder.encode on the whole
input, chunk boundaries, token and word outputs, prompts, atomic outputs and bounded
memory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as arrow
import pyarrow.parquet as parquet
import pytest

import tiny_models
from hiddenpool import Encoder, cli
from hiddenpool.cli import checks
from hiddenpool.io import corpus

# Nine texts (an empty one among them), so chunks of 2, 3 and 4 end in a partial chunk.
TEXTS = [*tiny_models.TEXTS, "the bird sings in the tree", "a small red apple"]


@pytest.fixture
def run_cli(capsys):
    """The command line in this process (it loads torch once, not once a run): returns
    what a finished process would, with the exit code, stdout and stderr."""

    def run(*arguments: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = cli.main(list(arguments))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(arguments, code, captured.out, captured.err)

    return run


def encode(run_cli, model: str, source, output, *extra: str) -> subprocess.CompletedProcess[str]:
    """``hiddenpool encode --model MODEL --input SOURCE --output OUTPUT EXTRA...``."""
    return run_cli(
        "encode", "--model", model, "--input", str(source), "--output", str(output), *extra
    )


@pytest.fixture(scope="module")
def encoder(tiny_bert_folder) -> Encoder:
    return Encoder.from_pretrained(tiny_bert_folder, device="cpu")


def write_inputs(folder) -> dict[str, str]:
    """The same texts (ids "t0", "t1"...) as .txt, .jsonl, .json, .csv, .tsv and .parquet."""
    ids = [f"t{i}" for i in range(len(TEXTS))]
    paths = {
        kind: str(folder / f"texts.{kind}")
        for kind in ("txt", "jsonl", "json", "csv", "tsv", "parquet")
    }
    with open(paths["txt"], "w") as handle:
        handle.write("".join(text + "\n" for text in TEXTS))
    with open(paths["jsonl"], "w") as handle:
        for identifier, text in zip(ids, TEXTS, strict=True):
            handle.write(json.dumps({"key": identifier, "body": text}) + "\n")
    with open(paths["json"], "w") as handle:
        json.dump([{"key": i, "body": t} for i, t in zip(ids, TEXTS, strict=True)], handle)
    for kind, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(paths[kind], "w") as handle:
            handle.write(f"key{delimiter}body\n")
            for identifier, text in zip(ids, TEXTS, strict=True):
                handle.write(f"{identifier}{delimiter}{text}\n")
    parquet.write_table(
        arrow.table({"key": ids, "body": TEXTS}), paths["parquet"], row_group_size=4
    )
    return paths


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "csv", "tsv", "parquet"])
def test_every_input_format_streams_to_every_output(
    tmp_path, tiny_bert_folder, encoder, kind, run_cli
):
    paths = write_inputs(tmp_path)
    expected = encoder.encode(TEXTS, ["mean@last", "max@last2:concat"])
    select = {"txt": []}.get(kind, ["--field", "body"] if "json" in kind else ["--column", "body"])
    ids = [] if kind == "txt" else ["--id-column", "key"]
    common = ["--model", tiny_bert_folder, "--input", paths[kind], "--chunk-size", "4", *select]
    npy = tmp_path / "one.npy"
    result = run_cli("encode", *common, "--strategy", "mean@last", "--output", str(npy))
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(npy), expected["mean@last"], atol=1e-6)
    npz = tmp_path / "two.npz"
    result = run_cli(
        "encode", *common, "--strategy", "mean@last", "max@last2:concat", "--output", str(npz)
    )
    assert result.returncode == 0, result.stderr
    with np.load(npz) as loaded:
        assert sorted(loaded.files) == ["max@last2:concat", "mean@last"]
        for key, value in expected.items():
            np.testing.assert_allclose(loaded[key], value, atol=1e-6)
    table_path = tmp_path / "out.parquet"
    result = run_cli(
        "encode",
        *common,
        *ids,
        "--strategy",
        "mean@last",
        "max@last2:concat",
        "--output",
        str(table_path),
    )
    assert result.returncode == 0, result.stderr
    table = parquet.read_table(table_path)
    id_name = "key" if ids else "id"
    assert table.column_names == [id_name, "mean@last", "max@last2:concat"]
    want_ids = [f"t{i}" for i in range(len(TEXTS))] if ids else list(range(len(TEXTS)))
    assert table.column(id_name).to_pylist() == want_ids
    assert str(table.schema.field("mean@last").type) == "fixed_size_list<element: float>[16]"
    for key, value in expected.items():
        np.testing.assert_allclose(np.array(table.column(key).to_pylist()), value, atol=1e-6)


def test_one_strategy_to_parquet_is_the_embedding_column(
    tmp_path, tiny_bert_folder, encoder, run_cli
):
    paths = write_inputs(tmp_path)
    output = tmp_path / "out.parquet"
    result = encode(
        run_cli,
        tiny_bert_folder,
        paths["txt"],
        str(output),
        "--strategy",
        "cls@last",
        "--normalize",
    )
    assert result.returncode == 0, result.stderr
    table = parquet.read_table(output)
    assert table.column_names == ["id", "embedding"]
    expected = encoder.encode(TEXTS, "cls@last", normalize=True)
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), expected, atol=1e-6)


def test_prompt_options_equal_the_python_api(tmp_path, tiny_bert_folder, encoder, run_cli):
    paths = write_inputs(tmp_path)
    output = tmp_path / "out.npy"
    result = encode(
        run_cli,
        tiny_bert_folder,
        paths["txt"],
        str(output),
        "--strategy",
        "mean@last",
        "--prompt",
        "the ",
        "--exclude-prompt",
    )
    assert result.returncode == 0, result.stderr
    expected = encoder.encode(TEXTS, "mean@last", prompt="the ", include_prompt=False)
    np.testing.assert_allclose(np.load(output), expected, atol=1e-6)
    assert np.abs(expected - encoder.encode(TEXTS, "mean@last", prompt="the ")).max() > 1e-3


def test_tokens_and_words_to_json_lines_and_npz(tmp_path, tiny_bert_folder, encoder, run_cli):
    paths = write_inputs(tmp_path)
    tokens = encoder.encode_tokens(TEXTS, "last2:mean")
    lines = tmp_path / "tokens.jsonl"
    result = run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        paths["jsonl"],
        "--field",
        "body",
        "--id-column",
        "key",
        "--tokens",
        "--layers",
        "last2:mean",
        "--output",
        str(lines),
        "--chunk-size",
        "3",
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [record["id"] for record in records] == [f"t{i}" for i in range(len(TEXTS))]
    for record, expected in zip(records, tokens, strict=True):
        np.testing.assert_allclose(np.array(record["vectors"]).reshape(-1, 16), expected, atol=1e-6)
    packed = tmp_path / "words.npz"
    result = run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        paths["txt"],
        "--words",
        "--word-pool",
        "max",
        "--output",
        str(packed),
        "--chunk-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    words = encoder.encode_words(TEXTS, "max", return_offsets=True)
    with np.load(packed) as loaded:
        offsets = loaded["offsets"]
        assert offsets.tolist() == np.cumsum([0] + [len(v) for v, _ in words]).tolist()
        np.testing.assert_allclose(
            loaded["values"], np.concatenate([v for v, _ in words]), atol=1e-6
        )
        np.testing.assert_array_equal(loaded["char_offsets"], np.concatenate([o for _, o in words]))
        assert loaded["ids"].tolist() == list(range(len(TEXTS)))
    word_lines = tmp_path / "words.jsonl"
    run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        paths["txt"],
        "--words",
        "--output",
        str(word_lines),
    )
    first = json.loads(word_lines.read_text().splitlines()[0])
    assert first["words"] == TEXTS[0].split()
    assert first["offsets"][1] == [4, 7]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tokens", "--strategy", "mean@last"], "--strategy: does not apply to --tokens"),
        (["--exclude-prompt"], "--exclude-prompt: needs --prompt"),
        (["--layers", "last"], "--layers: applies to --tokens and --words"),
        (["--tokens", "--word-pool", "max"], "--word-pool: applies to --words"),
        (["--words", "--prompt", "x"], "--prompt: applies to pooled embeddings"),
        (["--id-column", "key"], "--id-column: .npy and .npz hold no ids; write .parquet"),
        (["--address", "x:1"], "--address: applies to --ray"),
        (["--chunk-size", "0"], "--chunk-size must be a positive integer"),
        (["--tokens", "--layers", "last9:mean"], "--layers 'last9:mean': strategy first@last9"),
        (["--tokens", "--layers", "bogus"], "--layers 'bogus': strategy: malformed layer spec"),
        (["--words", "--word-pool", "median"], "--word-pool 'median': one pool of mean, first"),
        (["--words", "--word-pool", "eos"], "eos finds one token per text"),
        (["--word-pool", "max"], "--word-pool: applies to --words"),
        (["--words", "--word-pool", "mean+max"], "--word-pool 'mean+max': one pool of"),
    ],
)
def test_bad_options_are_one_line_errors(
    tmp_path, tiny_bert_folder, extra, message, run_cli, monkeypatch
):
    def refuse_to_load(*arguments, **options):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(checks, "load_encoder", refuse_to_load)
    paths = write_inputs(tmp_path)
    output = tmp_path / ("out.jsonl" if "--tokens" in extra or "--words" in extra else "out.npy")
    result = encode(
        run_cli,
        tiny_bert_folder,
        paths["txt"],
        str(output),
        *extra,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not output.exists()


def test_a_bad_record_halfway_leaves_no_output(tmp_path, tiny_bert_folder, run_cli):
    source = tmp_path / "texts.jsonl"
    lines = [json.dumps({"text": f"the cat {i}"}) for i in range(30)]
    lines[22] = '{"text": 5}'
    source.write_text("\n".join(lines) + "\n")
    for name in ("out.npy", "out.parquet", "out.npz"):
        output = tmp_path / name
        result = encode(
            run_cli,
            tiny_bert_folder,
            str(source),
            str(output),
            "--chunk-size",
            "5",
        )
        assert result.returncode == 2
        assert f"{source}:23: field 'text' is not a string" in result.stderr
        assert not output.exists()
    assert sorted(os.listdir(tmp_path)) == ["texts.jsonl"]  # no temporaries left behind


def test_an_existing_output_is_replaced_only_when_complete(tmp_path, tiny_bert_folder, run_cli):
    source = tmp_path / "texts.txt"
    output = tmp_path / "out.npy"
    np.save(output, np.zeros(3))
    before = output.read_bytes()
    source.write_bytes(b"the cat\n" * 10 + b"\xff\xfe\n")
    result = encode(
        run_cli,
        tiny_bert_folder,
        str(source),
        str(output),
        "--chunk-size",
        "2",
    )
    assert result.returncode == 2
    assert "not UTF-8 text" in result.stderr
    assert output.read_bytes() == before


def test_npy_rows_header_is_what_numpy_writes(tmp_path):
    rows = np.random.default_rng(0).standard_normal((1234, 7)).astype(np.float32)
    with open(tmp_path / "ours.npy", "w+b") as handle:
        writer = corpus.NpyRows(handle)
        writer.append(rows[:500])
        writer.append(rows[500:])
        writer.close()
    loaded = np.load(tmp_path / "ours.npy")
    np.testing.assert_array_equal(loaded, rows)
    with open(tmp_path / "empty.npy", "w+b") as handle:
        empty = corpus.NpyRows(handle)
        empty.close(width=5)
    assert np.load(tmp_path / "empty.npy").shape == (0, 5)


def test_empty_input_writes_empty_arrays(tmp_path, tiny_bert_folder, run_cli):
    source = tmp_path / "empty.txt"
    source.write_text("")
    for name, check in (
        ("out.npy", lambda path: np.load(path).shape == (0, 16)),
        ("out.parquet", lambda path: parquet.read_table(path).num_rows == 0),
    ):
        output = tmp_path / name
        result = encode(
            run_cli,
            tiny_bert_folder,
            str(source),
            str(output),
            "--strategy",
            "mean@last",
        )
        assert result.returncode == 0, result.stderr
        assert check(output)


def peak_rss_of_encode(folder: str, source: str, output: str) -> int:
    """Peak resident memory (KiB) of a process running ``hiddenpool encode`` alone."""
    script = (
        "import resource, sys\n"
        "from hiddenpool.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "encode",
            "--model",
            folder,
            "--input",
            source,
            "--output",
            output,
            "--strategy",
            "mean@last",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_follows_the_chunk_not_the_corpus(tmp_path, tiny_bert_folder):
    """200,000 short lines through the tiny BERT. Measured on the 2-core development machine
    (torch and transformers imported: about 900 MB before any text): the streamed encode's
    peak was 15 MB above the same command on 2,000 lines, where encoding the whole list at
    once with Encoder.encode peaked 450 MB above it. Bound: 100 MB."""
    generator = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "bird"]
    sizes = {"small": 2_000, "large": 200_000}
    peaks = {}
    for name, count in sizes.items():
        source = tmp_path / f"{name}.txt"
        with open(source, "w") as handle:
            for _ in range(count):
                handle.write(" ".join(generator.choices(words, k=generator.randint(3, 9))) + "\n")
        output = tmp_path / f"{name}.npy"
        peaks[name] = peak_rss_of_encode(tiny_bert_folder, str(source), str(output))
        assert np.load(output, mmap_mode="r").shape == (count, 16)
    growth_mb = (peaks["large"] - peaks["small"]) / 1024
    assert growth_mb < 100, f"peak grew {growth_mb:.0f} MB from 2,000 to 200,000 lines"
