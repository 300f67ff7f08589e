"""hiddenpool.mteb against MTEB itself, offline: the local STS-B tasks run through
``mteb.evaluate``; the shared pass's scores against each strategy evaluated alone; the STS
score against sentence-transformers and scipy; results loaded back with mteb's own loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")
import hiddenpool.mteb as hm  # noqa: E402
from cli_runner import run_cli  # noqa: E402

STSB = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "stsb")
pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(STSB, "sts-dev.csv")),
    reason="the STS Benchmark files are not beside the project (../shared/data/stsb)",
)
EIGHT = [
    "mean@last",
    "cls@last",
    "max@last",
    "mean@-2",
    "mean@first_last:mean",
    "mean@last4:sum",
    "mean@last4:concat",
    "model",
]
# Small enough for make test, large enough that every genre and class is present.
LIMIT = 60


class Counting:
    """Counts the texts the Encoder's runner runs forward (the empty probes that find a
    strategy's width aside)."""

    def __init__(self, encoder) -> None:
        self.texts = 0
        self.runner = encoder.runner
        self.original = self.runner.run

        def run(batch, *arguments, **keywords):
            # The width probe is one empty text: [CLS] [SEP].
            self.texts += len(batch.rows) if int(batch.mask.sum(axis=1).max()) > 2 else 0
            return self.original(batch, *arguments, **keywords)

        self.runner.run = run

    def restore(self) -> None:
        self.runner.run = self.original


@pytest.fixture(scope="module")
def wrapped(minilm):
    return hm.model(strategy="mean@last", encoder=minilm)


def test_sts_dev_score_equals_sentence_transformers_and_scipy(wrapped, minilm_path, tmp_path):
    """MTEB's cosine Spearman on the full dev split, mean@last, against the model run by
    sentence-transformers and scored by scipy (compare's figure: 0.8672)."""
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    task = hm.stsb_tasks(STSB)[0]
    result = mteb.evaluate(wrapped, task, cache=None, show_progress_bar=False)
    score = result.task_results[0].get_score()
    task.load_data()
    data = task.dataset["default"]["test"]
    st = SentenceTransformer(minilm_path, device="cpu")
    first = st.encode(list(data["sentence1"]), convert_to_numpy=True)
    second = st.encode(list(data["sentence2"]), convert_to_numpy=True)
    cosine = (
        (first * second).sum(1) / np.linalg.norm(first, axis=1) / np.linalg.norm(second, axis=1)
    )
    reference = spearmanr(cosine, np.asarray(data["score"])).statistic
    assert len(data["score"]) == 1500
    assert abs(score - reference) < 1e-6
    assert round(score, 4) == 0.8672


def test_shared_pass_scores_equal_each_strategy_alone(minilm, tmp_path):
    """Eight strategies on the four local tasks from one pass per task: every score equals
    MTEB's score for that strategy evaluated alone, and the texts through the model are
    each task's distinct texts once (the same count as a one-strategy pass)."""
    wrapped = hm.model(strategy="mean@last", encoder=minilm)
    counter = Counting(minilm)
    try:
        sweep = hm.evaluate(
            wrapped, hm.stsb_tasks(STSB, limit=LIMIT), EIGHT, output_folder=tmp_path / "eight"
        )
        shared_texts = counter.texts
        assert sweep.texts_encoded == shared_texts
        counter.texts = 0
        single = hm.evaluate(
            wrapped, hm.stsb_tasks(STSB, limit=LIMIT), ["cls@last"], output_folder=tmp_path / "one"
        )
        assert counter.texts == shared_texts == single.texts_encoded
        alone_texts = 0
        for strategy in EIGHT:
            alone = hm.model(strategy=strategy, encoder=minilm)
            counter.texts = 0
            outcome = mteb.evaluate(
                alone, hm.stsb_tasks(STSB, limit=LIMIT), cache=None, show_progress_bar=False
            )
            alone_texts = counter.texts
            for result in outcome.task_results:
                shared = sweep.results[result.task_name][strategy].get_score()
                assert abs(shared - result.get_score()) < 1e-6, (strategy, result.task_name)
    finally:
        counter.restore()
    assert [task.name for task in sweep.tasks] == [
        f"LocalSTSB{LIMIT}{kind}"
        for kind in ("STS", "GenreClassification", "GenreClustering", "Retrieval")
    ]
    assert not sweep.errors
    # One strategy alone encodes what MTEB asks for, duplicates included; the pass, once.
    assert 0 < shared_texts <= alone_texts
    assert sweep.tasks[0].intervals["mean@last"].low < sweep.tasks[0].scores["mean@last"]


def test_results_load_back_with_mteb_one_experiment_per_strategy(minilm, tmp_path):
    wrapped = hm.model(strategy="mean@last", encoder=minilm)
    strategies = ["mean@last", "cls@last", "mean@last4:concat"]
    tasks = hm.stsb_tasks(STSB, limit=LIMIT)[:1]
    sweep = hm.evaluate(wrapped, tasks, strategies, output_folder=tmp_path)
    loaded = mteb.ResultCache(tmp_path).load_results(
        tasks=[tasks[0].metadata.name], load_experiments="match_name"
    )
    found = {
        model.experiment_name: model.task_results[0].get_score() for model in loaded.model_results
    }
    expected = {
        f"backend_torch__precision_fp32__strategy_{s.replace(':', '_')}": sweep.tasks[0].scores[s]
        for s in strategies
    }
    assert found.keys() == expected.keys()
    for name, score in expected.items():
        assert abs(found[name] - score) < 1e-6  # the saved scores have six decimals
    meta = json.loads(
        next(tmp_path.glob("results/*/*/experiments/*concat/model_meta.json")).read_text()
    )
    assert meta["embed_dim"] == 4 * 384 and meta["max_tokens"] == 256
    assert meta["similarity_fn_name"] == "cosine" and meta["n_parameters"] == 22713216


def test_a_rerun_reuses_results_and_rows(minilm, tmp_path):
    """Finished results are read back, not recomputed; kept rows make an overwrite run
    encode nothing."""
    wrapped = hm.model(strategy="mean@last", encoder=minilm)
    tasks = hm.stsb_tasks(STSB, limit=LIMIT)[:1]
    first = hm.evaluate(
        wrapped, tasks, ["mean@last", "max@last"], output_folder=tmp_path, keep_rows=True
    )
    again = hm.evaluate(wrapped, tasks, ["mean@last", "max@last"], output_folder=tmp_path)
    assert again.tasks[0].reused and again.texts_encoded == 0
    assert again.tasks[0].scores == pytest.approx(first.tasks[0].scores, abs=1e-6)
    rows = hm.evaluate(
        wrapped, tasks, ["mean@last", "max@last"], output_folder=tmp_path, overwrite=True
    )
    assert rows.texts_encoded == 0 and not rows.tasks[0].reused
    assert rows.tasks[0].scores == pytest.approx(first.tasks[0].scores, abs=1e-12)


def test_row_store_drops_a_partial_write(tmp_path):
    from hiddenpool.mteb.shared import RowStore, text_key

    store = RowStore(str(tmp_path), ["a", "b"], [2, 3])
    keys = [text_key(None, "x"), text_key("q: ", "x")]
    assert keys[0] != keys[1]
    store.append(keys, [np.ones((2, 2), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)])
    store.close(remove=False)
    with open(tmp_path / "strategy-1.f32", "ab") as handle:  # a stopped run's rows, no keys
        handle.write(np.zeros(3, np.float32).tobytes())
    store = RowStore(str(tmp_path), ["a", "b"], [2, 3])
    assert store.count == 2 and os.path.getsize(tmp_path / "strategy-1.f32") == 2 * 3 * 4
    found = store.lookup(keys[::-1])
    np.testing.assert_array_equal(store.read(1, np.array([found[keys[1]]])), [[3, 4, 5]])
    store.close(remove=True)
    assert not tmp_path.exists()


def test_prompts_reach_the_model_as_mteb_picks_them(minilm):
    """Retrieval queries get the query prompt, documents the document prompt, as
    Encoder.encode(prompt=...) gives them."""
    from mteb.types import PromptType

    wrapped = hm.model(
        strategy="mean@last", encoder=minilm, prompts={"query": "query: ", "document": "passage: "}
    )
    task = hm.stsb_tasks(STSB, limit=LIMIT)[3]
    batches = [{"text": ["A man plays a guitar.", "Stocks fell."]}]
    for kind, prompt in ((PromptType.query, "query: "), (PromptType.document, "passage: ")):
        rows = wrapped.encode(
            batches,
            task_metadata=task.metadata,
            hf_split="test",
            hf_subset="default",
            prompt_type=kind,
        )
        expected = minilm.encode(batches[0]["text"], "mean@last", prompt=prompt)
        np.testing.assert_allclose(rows, expected, atol=1e-6)
    assert wrapped.mteb_model_meta.experiment_kwargs["prompts"] == {
        "query": "query: ",
        "document": "passage: ",
    }


@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
def test_onnx_tiers_run_through_the_same_wrapper(
    minilm, minilm_path, minilm_onnx, tmp_path, precision
):
    from hiddenpool import export_onnx
    from hiddenpool.runners import openvino_runner

    if precision == "bf16" and not any(
        flag in openvino_runner.cpu_flags() for flag in openvino_runner.BF16_FEATURES
    ):
        pytest.skip("this CPU has neither AVX512_BF16 nor AMX")
    folder = minilm_onnx
    if precision == "int8":
        folder = str(export_onnx(minilm_path, tmp_path / "int8", quantize="int8"))
    task = hm.stsb_tasks(STSB, limit=LIMIT)[0]
    exact = hm.model(strategy="mean@last", encoder=minilm)
    tier = hm.model(
        folder,
        "mean@last",
        backend="onnx" if precision != "bf16" else "openvino",
        precision=precision,
    )
    reference = mteb.evaluate(exact, task, cache=None, show_progress_bar=False)
    result = mteb.evaluate(
        tier, hm.stsb_tasks(STSB, limit=LIMIT)[0], cache=None, show_progress_bar=False
    )
    gap = abs(result.task_results[0].get_score() - reference.task_results[0].get_score())
    assert gap < {"fp32": 1e-5, "bf16": 5e-3, "int8": 2e-2}[precision]
    assert tier.mteb_model_meta.experiment_kwargs["precision"] == precision
    assert tier.mteb_model_meta.framework == (["OpenVINO"] if precision == "bf16" else ["ONNX"])


def test_bad_arguments_are_one_line_errors(wrapped, tmp_path):
    with pytest.raises(
        ValueError, match="'STSBenchmrk' is not an MTEB task; close names: STSBenchmark"
    ):
        hm.evaluate(wrapped, ["STSBenchmrk"], ["mean@last"], output_folder=tmp_path)
    with pytest.raises(ValueError, match="pool"):
        hm.evaluate(
            wrapped, hm.stsb_tasks(STSB, limit=LIMIT), ["median@last"], output_folder=tmp_path
        )
    with pytest.raises(ValueError, match="layer"):
        hm.evaluate(wrapped, hm.stsb_tasks(STSB, limit=LIMIT), ["mean@40"], output_folder=tmp_path)
    with pytest.raises(ValueError, match="prompts: 'questions' is not a key MTEB looks up"):
        hm.model(encoder=wrapped.encoder, prompts={"questions": "q: "})
    with pytest.raises(FileNotFoundError, match=r"sts-dev\.csv does not exist"):
        hm.stsb_tasks(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written before the checks


def test_an_unfetchable_task_is_one_line_and_the_others_run(wrapped, tmp_path, monkeypatch):
    """STSBenchmark's data is on the hub, which tests never reach (HF_HUB_OFFLINE=1)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets-cache"))
    local = hm.stsb_tasks(STSB, limit=LIMIT)[0]
    sweep = hm.evaluate(wrapped, ["STSBenchmark", local], ["mean@last"], output_folder=tmp_path)
    assert list(sweep.errors) == ["STSBenchmark"]
    error = sweep.errors["STSBenchmark"]
    assert "mteb/stsbenchmark-sts" in error and "\n" not in error
    assert [task.name for task in sweep.tasks] == [local.metadata.name]


def small_stsb(folder) -> str:
    """Every tenth row of the STS-B files (a quick run of the same genres)."""
    folder.mkdir()
    for name in ("sts-dev.csv", "sts-train.csv"):
        with open(os.path.join(STSB, name), encoding="utf-8") as handle:
            rows = handle.readlines()[::10]
        (folder / name).write_text("".join(rows), encoding="utf-8")
    return str(folder)


def test_cli_ranks_the_local_tasks_and_writes_json(minilm, tmp_path):
    data = small_stsb(tmp_path / "stsb")
    output = tmp_path / "results"
    report = tmp_path / "ranking.json"
    # STSBenchmark's data is on the hub, which tests never reach: one line, the rest runs,
    # exit code 1.
    result = run_cli(
        "compare", "--mteb", "STSBenchmark", "--mteb-local", data, "--strategies", "mean@last",
        "cls@last", "--output-folder", str(output), "--json", str(report), "--bootstrap", "200",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert "--mteb STSBenchmark: its data set mteb/stsbenchmark-sts" in errors[0]
    assert "overall: mean main score x 100" in result.stdout
    document = json.loads(report.read_text())
    assert list(document["errors"]) == ["STSBenchmark"]
    assert document["ranking"][0] in ("mean@last", "cls@last")
    sts = next(task for task in document["tasks"] if task["type"] == "STS")
    python = hm.evaluate(
        hm.model(strategy="mean@last", encoder=minilm),
        hm.stsb_tasks(data)[:1],
        ["mean@last", "cls@last"],
        output_folder=tmp_path / "python",
    )
    assert sts["scores"] == pytest.approx(python.tasks[0].scores, abs=1e-6)
    assert sts["texts_encoded"] == python.tasks[0].texts_encoded
    interval = sts["intervals"]["mean@last"]
    assert interval["low"] < sts["scores"]["mean@last"] < interval["high"]
    assert len(list(output.glob("results/*/*/experiments/*"))) == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--mteb", "STSBenchmrk"],
            "--mteb 'STSBenchmrk' is not an MTEB task; close names: STSBenchmark",
        ),
        (["--mteb", "STSBenchmark", "--data", "x.csv"], "--data: not with --mteb"),
        (
            ["--mteb-benchmark", "MTEB(eng, v9)"],
            "--mteb-benchmark 'MTEB(eng, v9)': not an MTEB benchmark",
        ),
        (["--output-folder", "x"], "--output-folder: applies to --mteb"),
        (["--mteb", "STSBenchmark", "--strategies", "median@last"], "unknown pool 'median'"),
    ],
)
def test_cli_errors(arguments, message):
    result = run_cli("compare", *arguments)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_running_server_scores_the_same_through_mteb_openai_wrapper(wrapped):
    """README "On MTEB": MTEB's own OpenAI-API wrapper against `hiddenpool serve` gives
    the offline score (the served rows are the offline rows)."""
    from mteb.models.openai_wrappers import OpenAIAPIEncodeWrapper

    from test_server import Server

    server = Server("--strategy", "mean@last")
    try:
        client = OpenAIAPIEncodeWrapper(
            endpoint_url=server.url,
            model_name=server.model,
            use_chat_template=False,
            modalities=["text"],
        )
        served = mteb.evaluate(
            client, hm.stsb_tasks(STSB, limit=LIMIT)[0], cache=None, show_progress_bar=False
        )
    finally:
        server.stop()
    offline = mteb.evaluate(
        wrapped, hm.stsb_tasks(STSB, limit=LIMIT)[0], cache=None, show_progress_bar=False
    )
    assert abs(served.task_results[0].get_score() - offline.task_results[0].get_score()) < 1e-6
