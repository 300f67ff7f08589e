"""Ray Data: encode_dataset and ``hiddenpool encode --ray`` on a local Ray instance with 2
CPUs, started and stopped here, against single-process Encoder.encode."""

from __future__ import annotations

import json
import os
import socket
import warnings

import numpy as np
import pyarrow.parquet as parquet
import pytest

from cli_runner import run_cli
from hiddenpool import Encoder

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import hiddenpool.ray  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "bird", "sings"]


def texts(count: int, seed: int = 0) -> list[str]:
    generator = np.random.default_rng(seed)
    return [" ".join(generator.choice(WORDS, generator.integers(1, 12))) for _ in range(count)]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray instance with 2 CPUs; the actors' fault-injection file path is set in the
    environment before it starts, so its workers see it."""
    die_file = tmp_path_factory.mktemp("ray") / "die-after-this-batch"
    os.environ["HIDDENPOOL_TEST_DIE_FILE"] = str(die_file)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield die_file
    ray.shutdown()
    del os.environ["HIDDENPOOL_TEST_DIE_FILE"]


@pytest.fixture(scope="module")
def corpus_rows() -> list[dict]:
    return [{"id": 10_000 + index, "text": text} for index, text in enumerate(texts(3000))]


@pytest.fixture(scope="module")
def single_process(tiny_bert_folder, corpus_rows) -> dict[str, np.ndarray]:
    encoder = Encoder.from_pretrained(tiny_bert_folder, device="cpu")
    return encoder.encode(
        [row["text"] for row in corpus_rows], ["mean@last", "max+first@last2:concat"]
    )


def by_id(rows: list[dict], column: str) -> dict[int, np.ndarray]:
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "an id came back twice"
    return {row["id"]: np.asarray(row[column]) for row in rows}


@pytest.mark.parametrize("actors", [1, 2])
def test_encode_dataset_equals_single_process(
    local_ray, tiny_bert_folder, corpus_rows, single_process, actors
):
    # from_items has no read tasks, so actors may hold every CPU (with a warning saying so).
    dataset = ray.data.from_items(corpus_rows, override_num_blocks=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = hiddenpool.ray.encode_dataset(
            dataset, tiny_bert_folder, "mean@last", actors=actors, batch_size=256
        )
    said = [str(w.message) for w in caught if "hold all 2 CPUs" in str(w.message)]
    assert len(said) == (1 if actors == 2 else 0)
    rows = encoded.take_all()
    got = by_id(rows, "embedding")
    assert sorted(got) == [row["id"] for row in corpus_rows]
    assert set(rows[0]) == {"id", "text", "embedding"}
    for index, row in enumerate(corpus_rows):
        np.testing.assert_allclose(got[row["id"]], single_process["mean@last"][index], atol=1e-6)


def test_several_strategies_are_columns_named_as_given(
    local_ray, tiny_bert_folder, corpus_rows, single_process
):
    dataset = ray.data.from_items(corpus_rows[:500])
    encoded = hiddenpool.ray.encode_dataset(
        dataset, tiny_bert_folder, ["mean@last", "max+first@last2:concat"], actors=1
    )
    rows = encoded.take_all()
    assert set(rows[0]) == {"id", "text", "mean@last", "max+first@last2:concat"}
    for key in ("mean@last", "max+first@last2:concat"):
        got = by_id(rows, key)
        for index, row in enumerate(corpus_rows[:500]):
            np.testing.assert_allclose(got[row["id"]], single_process[key][index], atol=1e-6)


def test_a_killed_actor_loses_and_duplicates_nothing(
    local_ray, tiny_bert_folder, corpus_rows, single_process
):
    local_ray.write_text("die")  # the first actor to finish a batch exits without returning it
    dataset = ray.data.from_items(corpus_rows, override_num_blocks=6)
    encoded = hiddenpool.ray.encode_dataset(dataset, tiny_bert_folder, "mean@last", batch_size=500)
    rows = encoded.take_all()
    assert not local_ray.exists(), "no actor died: the hook did not run"
    got = by_id(rows, "embedding")
    assert sorted(got) == [row["id"] for row in corpus_rows]
    for index, row in enumerate(corpus_rows):
        np.testing.assert_allclose(got[row["id"]], single_process["mean@last"][index], atol=1e-6)


def test_bad_arguments_are_caught_before_ray_runs(local_ray, tiny_bert_folder):
    dataset = ray.data.from_items([{"body": "a cat"}])
    with pytest.raises(ValueError, match=r"column: 'text' is not a column of the dataset"):
        hiddenpool.ray.encode_dataset(dataset.materialize(), tiny_bert_folder)
    with pytest.raises(ValueError, match="strategy: unknown pool"):
        hiddenpool.ray.encode_dataset(dataset, tiny_bert_folder, "median@last", column="body")
    with pytest.raises(ValueError, match="actors: expected a positive integer"):
        hiddenpool.ray.encode_dataset(dataset, tiny_bert_folder, actors=0, column="body")
    with pytest.raises(ValueError, match="model: /no/such/model is not a folder"):
        hiddenpool.ray.encode_dataset(dataset, "/no/such/model", column="body")


def test_cli_writes_one_parquet_per_shard_and_resumes(
    local_ray, tiny_bert_folder, corpus_rows, single_process, tmp_path
):
    shards = []
    for number in range(3):
        path = tmp_path / f"part-{number}.jsonl"
        with open(path, "w") as handle:
            for row in corpus_rows[number * 400 : (number + 1) * 400]:
                handle.write(json.dumps(row) + "\n")
        shards.append(path)
    output = tmp_path / "encoded"
    address = ray.get_runtime_context().gcs_address
    arguments = [
        "encode",
        "--ray",
        "--address",
        address,
        "--model",
        tiny_bert_folder,
        "--input",
        str(tmp_path / "part-*.jsonl"),
        "--output",
        str(output),
        "--strategy",
        "mean@last",
        "--id-column",
        "id",
        # Both CPUs to actors: the reads must still run (they ask for no CPU).
        "--actors",
        "2",
    ]
    result = run_cli(*arguments)
    assert result.returncode == 0, result.stderr
    # Ray's own lines go to its logs; the one it prints for every Ray Data actor pool
    # (README "Encoding a large corpus") is the only one left.
    noise = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "has constructor arguments in the object store" not in line
    ]
    assert noise == [], result.stderr
    files = sorted(os.listdir(output))
    assert files == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    expected = {row["id"]: single_process["mean@last"][i] for i, row in enumerate(corpus_rows)}

    def check(name: str, number: int) -> None:
        table = parquet.read_table(output / name)
        ids = table.column("id").to_pylist()
        assert ids == [row["id"] for row in corpus_rows[number * 400 : (number + 1) * 400]]
        vectors = np.array(table.column("embedding").to_pylist())
        np.testing.assert_allclose(vectors, np.stack([expected[i] for i in ids]), atol=1e-6)

    for number, name in enumerate(files):
        check(name, number)
    kept = {name: os.stat(output / name).st_mtime_ns for name in files}
    os.remove(output / "part-1.parquet")
    result = run_cli(*arguments)
    assert result.returncode == 0, result.stderr
    assert "2 of 3 shards already encoded" in result.stdout
    assert "part-1.jsonl: 400 rows" in result.stdout
    assert "part-0.jsonl" not in result.stdout and "part-2.jsonl" not in result.stdout
    for name in ("part-0.parquet", "part-2.parquet"):
        assert os.stat(output / name).st_mtime_ns == kept[name]
    check("part-1.parquet", 1)
    assert not [name for name in os.listdir(output) if name.endswith(".partial")]


def test_cli_refuses_bad_shards_before_starting_ray(tiny_bert_folder, tmp_path):
    text_file = tmp_path / "texts.txt"
    text_file.write_text("a cat\n")
    shard = tmp_path / "shard.jsonl"
    shard.write_text('{"text": "a cat"}\n')
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port nothing listens on (bound, never listening)
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    for extra, message in (
        (["--input", str(tmp_path / "none-*.jsonl")], "matches no file"),
        (["--input", str(text_file)], "--ray reads .jsonl and .parquet shards"),
        (["--input", str(shard), "--address", address], "no Ray cluster answers there"),
        (["--input", str(shard), "--address", "nonsense"], "expected HOST:PORT"),
    ):
        result = run_cli(
            "encode",
            "--ray",
            "--model",
            tiny_bert_folder,
            "--output",
            str(tmp_path / "out"),
            *extra,
        )
        assert result.returncode == 2
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
    closed.close()
