"""Hand-weighted and learned layer mixes ranked beside fixed strategies."""

from __future__ import annotations

import json

import numpy as np

import tiny_models
from cli_runner import run_cli
from hiddenpool import Encoder
from hiddenpool.evaluation import evaluate


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
