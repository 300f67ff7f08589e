"""Hand-weighted and learned layer mixes ranked beside fixed strategies."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import tiny_models
from cli_runner import run_cli
from hiddenpool import Encoder
from hiddenpool.evaluation import evaluate, fit_layer_mix, layer_mix
from test_cli_errors import assert_one_line_error


@pytest.fixture(scope="module")
def garbage_bert(tmp_path_factory) -> str:
    """A 4-layer BERT config with weights that cannot load: an error about anything else
    proves it came before the model loaded."""
    folder = tmp_path_factory.mktemp("garbage-bert")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 4}))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return str(folder)


def test_compare_ranks_a_weighted_mix_beside_fixed_strategies(tiny_bert_folder, tmp_path):
    """``--layer-weights`` with a ``:weighted`` strategy among unweighted ones: each row is
    scored, the weighted one with its weights (it was refused after the model loaded)."""
    weights = ["0.5", "-1", "0", "2", "1"]  # tiny BERT: 4 layers, 5 hidden states
    out = tmp_path / "ranking.json"
    result = run_cli(
        "compare", "--model", tiny_bert_folder, "--strategies", "mean@last", "mean@all:weighted",
        "cls@-2", "--layer-weights", *weights[1:], "--layer-scale", "2", "--json", str(out),
        "--bootstrap", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    got = {row["strategy"]: row["spearman"] for row in document["results"]}
    assert set(got) == {"mean@last", "mean@all:weighted", "cls@-2"}
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    pairs = evaluate.read_pairs(evaluate.default_data_path())
    mixed = evaluate.compare(
        encoder,
        pairs,
        ["mean@all:weighted"],
        layer_weights=[float(w) for w in weights[1:]],
        layer_scale=2.0,
        resamples=0,
    )
    np.testing.assert_allclose(got["mean@all:weighted"], mixed.results[0].spearman, atol=1e-12)
    plain = evaluate.compare(encoder, pairs, ["mean@last"], resamples=0)
    np.testing.assert_allclose(got["mean@last"], plain.results[0].spearman, atol=1e-12)


def _texts(count: int, seed: int) -> list[str]:
    generator = np.random.default_rng(seed)
    words = [w for w in tiny_models.WORDS if w.isalpha()]
    return [
        " ".join(generator.choice(words, size=int(generator.integers(2, 9)))) for _ in range(count)
    ]


def _planted_pairs(encoder: Encoder, planted: np.ndarray, count: int, seed: int) -> Any:
    """Pairs of random texts scored by the cosine of a known mix of mean-pooled layers."""
    first, second = _texts(count, seed), _texts(count, seed + 1)
    states = encoder.runner.state_count()
    keys = [f"mean@{i}" for i in range(1, states)]
    rows = encoder.encode(first + second, keys)
    mixed = sum(share * rows[key] for share, key in zip(planted, keys, strict=True))
    scores = evaluate.cosine_similarities(mixed[:count], mixed[count:])
    return evaluate.Pairs(first, second, scores.astype(np.float64), source="planted")


def test_a_fit_recovers_planted_layer_weights():
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    planted = layer_mix.softmax(np.array([0.5, -1.0, 0.2, 1.5]))
    train = _planted_pairs(encoder, planted, 240, seed=1)
    dev = _planted_pairs(encoder, planted, 60, seed=7)
    fit = fit_layer_mix(
        encoder, train, "mean", "all", dev=dev, steps=3000, learning_rate=0.05, patience=3000
    )
    assert fit.layers == [1, 2, 3, 4] and fit.strategy == "mean@all:weighted"
    np.testing.assert_allclose(fit.mix, planted, atol=0.02)
    assert fit.dev_spearman > 0.999 and fit.dev_curve[fit.best_step] == max(fit.dev_curve)
    # The fit's rows are the strategy's rows pooled by the kernel with those weights.
    texts = train.first[:5]
    reference = sum(
        share * encoder.encode(texts, f"mean@{layer}")
        for share, layer in zip(fit.mix, fit.layers, strict=True)
    )
    np.testing.assert_allclose(
        encoder.encode(texts, fit.strategy, layer_weights=fit.weights), reference, atol=1e-5
    )


def test_a_fit_repeats_bit_for_bit_and_stops_early():
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    pairs = _planted_pairs(encoder, layer_mix.softmax(np.array([1.0, 0.0, 0.0, -1.0])), 80, 3)
    noisy = evaluate.Pairs(
        pairs.first, pairs.second, pairs.scores + np.random.default_rng(0).normal(0, 0.3, 80)
    )
    one, two = (fit_layer_mix(encoder, noisy, steps=400, patience=20) for _ in range(2))
    assert one.weights == two.weights and one.dev_curve == two.dev_curve
    assert (one.train_pairs, one.dev_pairs) == (70, 10)  # a tenth held out, at least 10
    assert len(one.dev_curve) - 1 <= one.best_step + 20  # stopped 20 steps after its best


def test_bad_fits_are_refused_before_any_forward_pass(garbage_bert, tmp_path):
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    pairs = evaluate.read_pairs(evaluate.default_data_path())  # 52 pairs
    with pytest.raises(ValueError, match=r"^pool: 'max' is not linear in the layers"):
        fit_layer_mix(encoder, pairs, "max")
    with pytest.raises(ValueError, match=r"^pairs: 30 train pairs; a fit needs at least 50"):
        fit_layer_mix(
            encoder, evaluate.Pairs(pairs.first[:30], pairs.second[:30], pairs.scores[:30])
        )
    one_layer = Encoder(*tiny_models.bert(layers=1))
    with pytest.raises(ValueError, match=r"^layers: 'all' chooses 1 hidden state; a mix needs"):
        fit_layer_mix(one_layer, pairs)
    small = tmp_path / "small.tsv"
    small.write_text("sentence1\tsentence2\tscore\n" + "a cat\ta dog\t1\n" * 20)
    other = tmp_path / "other.tsv"  # no pair in common with the train file
    other.write_text("sentence1\tsentence2\tscore\nthe sun\tthe moon\t2\nred\tblue\t1\n")
    for arguments, message in (
        (["--fit", str(small)], "--fit " + str(small) + ": 20 pairs; a fit needs at least 50"),
        (["--fit", evaluate.default_data_path(), "--strategies", "max@all:weighted"],
         "max is not linear in the layers"),
        (["--fit", evaluate.default_data_path(), "--strategies", "mean@-1:weighted"],
         "chooses 1 hidden state"),
        (["--save-fit", str(tmp_path / "x")], "--save-fit: applies to --fit"),
        (["--fit", evaluate.default_data_path(), "--layer-weights", "1", "2"],
         "--layer-weights: --fit learns the weights"),
    ):  # fmt: skip
        result = run_cli("compare", "--model", garbage_bert, "--data", str(other), *arguments)
        assert_one_line_error(result, message)


def _write_pairs(path: Any, pairs: Any) -> str:
    lines = ["sentence1\tsentence2\tscore"]
    lines += [
        f"{a}\t{b}\t{float(s)!r}"
        for a, b, s in zip(pairs.first, pairs.second, pairs.scores, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_compare_fit_ranks_the_mix_and_saves_a_folder_every_tool_runs(tiny_bert_folder, tmp_path):
    from sentence_transformers import SentenceTransformer

    from test_server import Server

    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    planted = layer_mix.softmax(np.array([0.5, -1.0, 0.2, 1.5]))
    train = _write_pairs(tmp_path / "train.tsv", _planted_pairs(encoder, planted, 120, seed=11))
    data = _write_pairs(tmp_path / "test.tsv", _planted_pairs(encoder, planted, 60, seed=21))
    saved, ranking = tmp_path / "fitted", tmp_path / "ranking.json"
    result = run_cli(
        "compare", "--model", tiny_bert_folder, "--fit", train, "--data", data,
        "--strategies", "mean@last", "mean@1..4:weighted", "--save-fit", str(saved),
        "--json", str(ranking),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mean@1..4:weighted (fit) against the best fixed strategy, mean@last:" in result.stdout
    document = json.loads(ranking.read_text())
    (fit,) = document["fits"]
    row = next(r for r in document["results"] if r["strategy"] == "mean@1..4:weighted (fit)")
    assert row["fitted"] and row["reference"] == "mean@last"
    assert row["gain_low"] <= row["gain"] <= row["gain_high"]
    # The fitted row is the strategy with the fitted weights, scored as every other row.
    pairs = evaluate.read_pairs(data)
    alone = evaluate.compare(
        encoder, pairs, ["mean@1..4:weighted"], layer_weights=fit["weights"], resamples=0
    )
    np.testing.assert_allclose(row["spearman"], alone.results[0].spearman, atol=1e-12)
    texts = pairs.first[:6]
    expected = encoder.encode(texts, "mean@1..4:weighted", layer_weights=fit["weights"])
    # The saved folder, through every tool: Encoder, encode, serve, SentenceTransformer,
    # and its ONNX export.
    np.testing.assert_allclose(
        Encoder.from_pretrained(str(saved)).encode(texts), expected, atol=1e-5
    )
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n")
    encoded = run_cli("encode", "--model", str(saved), "--input", str(source), "--output",
                      str(tmp_path / "rows.npy"))  # fmt: skip
    assert encoded.returncode == 0, encoded.stderr
    np.testing.assert_allclose(np.load(tmp_path / "rows.npy"), expected, atol=1e-5)
    st_model = SentenceTransformer(str(saved), device="cpu", trust_remote_code=True)
    np.testing.assert_allclose(st_model.encode(texts), expected, atol=1e-5)
    exported = run_cli("export", str(saved), "--output", str(tmp_path / "onnx"))
    assert exported.returncode == 0, exported.stderr
    np.testing.assert_allclose(
        Encoder.from_pretrained(str(tmp_path / "onnx")).encode(texts), expected, atol=1e-5
    )
    server = Server("--model", str(saved))
    try:
        import httpx

        answer = httpx.post(f"{server.url}/embed", json={"inputs": texts}, timeout=60).json()
        np.testing.assert_allclose(answer["embeddings"], expected, atol=1e-5)
    finally:
        assert server.stop() == 0


def test_the_contrastive_gradient_is_exact():
    """The retrieval fit's gradient against central differences of the in-batch loss
    computed directly from mixed, normalized vectors."""
    from hiddenpool.evaluation import mix_retrieval

    generator = np.random.default_rng(0)
    rows = generator.normal(size=(4, 30, 6))
    pairs = np.array([(i, 15 + i) for i in range(8)])

    def objective(shares: np.ndarray) -> float:
        q = np.tensordot(shares, rows[:, pairs[:, 0]], axes=1)
        p = np.tensordot(shares, rows[:, pairs[:, 1]], axes=1)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        logits = q @ p.T / mix_retrieval.TEMPERATURE
        top = logits.max(axis=1)
        return float(np.mean(np.diag(logits) - top - np.log(np.exp(logits - top[:, None]).sum(1))))

    shares = layer_mix.softmax(generator.normal(size=4))
    numeric = [(objective(shares + e) - objective(shares - e)) / 2e-6 for e in np.eye(4) * 1e-6]
    exact = mix_retrieval._contrastive_gradient(rows, pairs, shares)
    np.testing.assert_allclose(exact, numeric, rtol=1e-5, atol=1e-6)


def test_compare_fits_a_retrieval_mix(tiny_bert_folder, tmp_path):
    from hiddenpool.evaluation import retrieval

    queries = _texts(120, seed=5)
    generator = np.random.default_rng(6)
    words = [w for w in tiny_models.WORDS if w.isalpha()]
    rows = []
    for query in queries:  # the positive: the query with one word replaced
        tokens = query.split()
        tokens[int(generator.integers(len(tokens)))] = str(generator.choice(words))
        rows.append({"query": query, "positive": " ".join(tokens) + " ok"})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows[:90]))
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows[90:]))
    out = tmp_path / "ranking.json"
    result = run_cli(
        "compare", "--model", tiny_bert_folder, "--task", "retrieval", "--fit", str(train),
        "--data", str(data), "--strategies", "mean@last", "cls@all:weighted", "--json", str(out),
        "--bootstrap", "200",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "first@all:weighted (fit) against the best fixed strategy, mean@last:" in result.stdout
    document = json.loads(out.read_text())
    (fit,) = document["fits"]
    assert fit["train_pairs"] == 80 and fit["dev_pairs"] == 10  # queries; at least 10 held out
    row = next(r for r in document["results"] if r["strategy"] == "first@all:weighted (fit)")
    assert row["fitted"] and row["gain_low"] <= row["gain"] <= row["gain_high"]
    alone = retrieval.compare_retrieval(
        Encoder(*tiny_models.bert()),
        retrieval.read_queries(data),
        ["cls@all:weighted"],
        layer_weights=fit["weights"],
        resamples=0,
    )
    np.testing.assert_allclose(row["mrr@10"], alone.results[0].metrics["mrr@10"], atol=1e-12)


def test_the_gain_interval_is_on_the_same_resamples_as_the_table():
    """The fitted row's gain over the best fixed strategy and its interval, against scipy's
    Spearman on each resample drawn as the table draws them (numpy, the seed)."""
    from scipy.stats import spearmanr

    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    pairs = _planted_pairs(encoder, layer_mix.softmax(np.array([0.5, -1.0, 0.2, 1.5])), 60, 9)
    weights = (0.4, -0.8, 0.1, 1.2)
    mix = evaluate.Mix("mix (fit)", "mean@all:weighted", weights)
    comparison = evaluate.compare(
        encoder, pairs, ["mean@last", "cls@last"], resamples=200, seed=3, mixes=[mix]
    )
    row = next(r for r in comparison.results if r.fitted)
    fixed = max((r for r in comparison.results if not r.fitted), key=lambda r: r.spearman)
    assert row.reference == fixed.strategy
    texts = list(dict.fromkeys(pairs.first + pairs.second))
    where = {text: i for i, text in enumerate(texts)}
    first = [where[t] for t in pairs.first]
    second = [where[t] for t in pairs.second]

    def cosines(rows: np.ndarray) -> np.ndarray:
        a, b = rows[first], rows[second]
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    mixed = cosines(encoder.encode(texts, "mean@all:weighted", layer_weights=list(weights)))
    best = cosines(encoder.encode(texts, fixed.strategy))
    indices = np.random.default_rng(3).integers(0, len(pairs.scores), size=(200, 60))
    differences = [
        spearmanr(mixed[i], pairs.scores[i])[0] - spearmanr(best[i], pairs.scores[i])[0]
        for i in indices
    ]
    low, high = np.percentile(differences, [2.5, 97.5])
    np.testing.assert_allclose([row.gain_low, row.gain_high], [low, high], atol=1e-9)
    np.testing.assert_allclose(
        row.gain,
        spearmanr(mixed, pairs.scores)[0] - spearmanr(best, pairs.scores)[0],
        atol=1e-9,
    )


def test_shared_pairs_are_counted_and_an_onnx_model_saves_beside_its_graph(
    tiny_bert_folder, tmp_path
):
    from hiddenpool import export_onnx

    onnx = str(export_onnx(tiny_bert_folder, tmp_path / "onnx"))
    model, tokenizer = tiny_models.bert()
    planted = layer_mix.softmax(np.array([0.5, -1.0, 0.2, 1.5]))
    train = _write_pairs(
        tmp_path / "train.tsv", _planted_pairs(Encoder(model, tokenizer), planted, 80, 4)
    )
    saved = tmp_path / "saved"
    result = run_cli(
        "compare", "--model", onnx, "--fit", train, "--data", train, "--save-fit", str(saved),
        "--strategies", "mean@last", "mean@all:weighted", "--bootstrap", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"--data {train}: 80 of its 80 pairs are in --fit {train} too" in result.stderr
    assert (saved / "model.onnx").is_file() and (
        saved / "1_HiddenPooling" / "config.json"
    ).is_file()
    config = json.loads((saved / "1_HiddenPooling" / "config.json").read_text())
    texts = _texts(5, seed=99)
    expected = Encoder.from_pretrained(onnx).encode(
        texts, "mean@all:weighted", layer_weights=config["layer_weights"]
    )
    np.testing.assert_allclose(
        Encoder.from_pretrained(str(saved)).encode(texts), expected, atol=1e-6
    )
