"""MTEB tasks built from local STS Benchmark files, for evaluating without the Hugging Face
hub (tests, air-gapped machines): an STS task on the pairs, a three-class classification and
a clustering task on the files' genre column (captions, news, forums), and a retrieval task
from the pairs scored 4 or more. Each is an MTEB task class with its own ``load_data``, run
by ``mteb.evaluate`` like any other."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

# The genre column spells the forums "main-forums" in the dev file, "main-forum" in train.
_GENRES = {"captions": 0, "news": 1, "forum": 2, "forums": 2}
GENRE_NAMES = ("captions", "news", "forums")
# A pair is a query and its relevant document at this gold score and above (of 0-5).
RELEVANT_SCORE = 4.0


class StsRow:
    __slots__ = ("first", "genre", "score", "second")

    def __init__(self, genre: int, score: float, first: str, second: str) -> None:
        self.genre, self.score, self.first, self.second = genre, score, first, second


def read_rows(path: str | os.PathLike[str], limit: int | None = None) -> list[StsRow]:
    """The rows of an STS Benchmark file (tab-separated: genre, source, year, id, score,
    sentence 1, sentence 2, extra fields ignored); a malformed row is a ValueError naming
    the file and line. ``limit`` keeps at most that many rows, spread evenly over the file."""
    rows: list[StsRow] = []
    with open(path, encoding="utf-8", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            genre = _GENRES.get(fields[0].removeprefix("main-")) if len(fields) >= 7 else None
            try:
                score = float(fields[4]) if genre is not None else None
            except ValueError:
                score = None
            if genre is None or score is None:
                raise ValueError(
                    f"{os.fspath(path)}:{number}: not an STS Benchmark row (genre main-captions, "
                    "main-news or main-forum(s), a score, two sentences, tab-separated)"
                )
            rows.append(StsRow(genre, score, fields[5], fields[6]))
    if limit is not None and len(rows) > limit:
        # Every k-th row: the files are sorted by genre, so the first rows would be one genre.
        step = -(-len(rows) // limit)
        rows = rows[::step]
    return rows


def _metadata(
    name: str, kind: Any, description: str, main_score: str, splits: list[str], revision: str
) -> Any:
    return TaskMetadata(
        name=name,
        dataset={"path": f"local/{name}", "revision": revision},
        description=description,
        reference=None,
        type=kind,
        category="t2t",
        modalities=["text"],
        eval_splits=splits,
        eval_langs=["eng-Latn"],
        main_score=main_score,
        date=("2012-01-01", "2017-12-31"),
        domains=["News", "Written"],
        task_subtypes=[],
        license="not specified",
        annotations_creators="human-annotated",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )


def _distinct(texts: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    seen: dict[str, int] = {}
    for text, label in zip(texts, labels, strict=True):
        seen.setdefault(text, label)
    return list(seen), list(seen.values())


def stsb_tasks(
    folder: str | os.PathLike[str], *, limit: int | None = None, prefix: str | None = None
) -> list[Any]:
    """The four local tasks over ``folder``'s ``sts-dev.csv`` (evaluated on) and
    ``sts-train.csv`` (the classifier's training rows), as MTEB task instances:
    ``{prefix}STS`` (cosine Spearman on the dev pairs, as MTEB's STSBenchmark scores its
    test split), ``{prefix}GenreClassification`` (logistic regression on the genre, accuracy),
    ``{prefix}GenreClustering`` (k-means on the genre, V-measure) and ``{prefix}Retrieval``
    (each dev pair scored 4 or more: its first sentence the query, its second the relevant
    document among every dev second sentence; nDCG@10). ``limit`` keeps that many rows of each
    file, spread evenly (for quick runs). ``prefix`` defaults to ``LocalSTSB``
    (``LocalSTSB{limit}`` with a limit, so results of different data never share a name in
    MTEB's results folder); the files' content hash is each data set's revision. A missing
    file is a FileNotFoundError naming it.

    >>> tasks = stsb_tasks("../shared/data/stsb")  # doctest: +SKIP
    >>> [task.metadata.name for task in tasks][:2]  # doctest: +SKIP
    ['LocalSTSBSTS', 'LocalSTSBGenreClassification']
    """
    folder = os.fspath(folder)
    paths = {split: os.path.join(folder, f"sts-{split}.csv") for split in ("dev", "train")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"folder: {path} does not exist (an STS Benchmark folder holds sts-dev.csv "
                "and sts-train.csv)"
            )
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit: expected a positive number of rows, got {limit!r}")
    if prefix is None:
        prefix = "LocalSTSB" if limit is None else f"LocalSTSB{limit}"
    digest = hashlib.sha256(str(limit).encode())
    for path in paths.values():
        with open(path, "rb") as handle:
            digest.update(handle.read())
    revision = digest.hexdigest()[:12]
    source = f"the STS Benchmark files in {folder}" + (f" ({limit} rows each)" if limit else "")
    files = _Files(paths["dev"], paths["train"], limit)
    described = {
        _Sts: ("STS", "STS", f"STS pairs of {source}, dev split.", "cosine_spearman"),
        _Classification: (
            "GenreClassification", "Classification",
            f"The genre (captions, news, forums) of each first sentence of {source}; trained "
            "on the train file, tested on the dev file.", "accuracy",
        ),
        _Clustering: (
            "GenreClustering", "Clustering",
            f"The distinct first sentences of {source}'s dev file, clustered by genre.",
            "v_measure",
        ),
        _Retrieval: (
            "Retrieval", "Retrieval",
            f"Dev pairs of {source} scored {RELEVANT_SCORE:g} or more: the first sentence "
            "retrieves the second among every dev second sentence.", "ndcg_at_10",
        ),
    }  # fmt: skip
    tasks = []
    for base, (suffix, kind, description, score) in described.items():
        metadata = _metadata(f"{prefix}{suffix}", kind, description, score, ["test"], revision)
        task_class = type(f"{prefix}{suffix}", (base,), {"metadata": metadata, "files": files})
        tasks.append(task_class())
    return tasks


class _Files:
    """Where a local task's rows come from."""

    def __init__(self, dev: str, train: str, limit: int | None) -> None:
        self.dev, self.train, self.limit = dev, train, limit


class _Sts(AbsTaskSTS):
    min_score = 0
    max_score = 5
    files: _Files

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        import datasets

        rows = read_rows(self.files.dev, self.files.limit)
        pairs = {
            "sentence1": [row.first for row in rows],
            "sentence2": [row.second for row in rows],
            "score": [row.score for row in rows],
        }
        self.dataset = {"default": datasets.DatasetDict(test=datasets.Dataset.from_dict(pairs))}
        self.data_loaded = True


class _Classification(AbsTaskClassification):
    files: _Files

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        import datasets

        splits = {}
        for split, path in (("train", self.files.train), ("test", self.files.dev)):
            rows = read_rows(path, self.files.limit)
            texts, labels = _distinct([r.first for r in rows], [r.genre for r in rows])
            splits[split] = datasets.Dataset.from_dict({"text": texts, "label": labels})
        self.dataset = {"default": datasets.DatasetDict(splits)}
        self.data_loaded = True


class _Clustering(AbsTaskClustering):
    # Every sentence embedded (MTEB's default samples 4% of a split: 58 sentences here).
    max_fraction_of_documents_to_embed = None
    files: _Files

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        import datasets

        rows = read_rows(self.files.dev, self.files.limit)
        texts, labels = _distinct([r.first for r in rows], [r.genre for r in rows])
        names = [GENRE_NAMES[label] for label in labels]
        # Each of the ten bootstrapped k-means runs draws as many sentences as there are
        # (MTEB's default draws 16,384 whatever the size: 11x these 1,474, mostly repeats).
        self.max_documents_per_cluster = len(texts)
        test = datasets.Dataset.from_dict({"sentences": texts, "labels": names})
        self.dataset = {"default": datasets.DatasetDict(test=test)}
        self.data_loaded = True


class _Retrieval(AbsTaskRetrieval):
    files: _Files

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        rows = read_rows(self.files.dev, self.files.limit)
        documents: dict[str, str] = {}
        for row in rows:
            documents.setdefault(row.second, f"d{len(documents)}")
        queries: dict[str, str] = {}
        relevant: dict[str, dict[str, int]] = {}
        for row in rows:
            if row.score < RELEVANT_SCORE:
                continue
            query = queries.setdefault(row.first, f"q{len(queries)}")
            relevant.setdefault(query, {})[documents[row.second]] = 1
        self.corpus = {"test": {doc: {"text": text} for text, doc in documents.items()}}
        self.queries = {"test": {query: text for text, query in queries.items()}}
        self.relevant_docs = {"test": relevant}
        self.convert_v1_dataset_format_to_v2(num_proc)
        self.data_loaded = True
