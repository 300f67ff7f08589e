"""``hiddenpool encode --ray``: JSON-lines or Parquet shards in, one Parquet file out per
shard, encoded by an actor pool on Ray Data.

The driver reads the encoded rows back in input order and appends them to the output of
their shard; an output appears (renamed from a temporary beside it) only when all its rows
are written, so a rerun skips the shards already done and redoes only the others.
"""

from __future__ import annotations

import glob
import os
import time
import warnings
from typing import Any

from hiddenpool.cli import checks
from hiddenpool.cli.checks import UsageError
from hiddenpool.cli.encode_options import EncodeOptions, encode_strategies
from hiddenpool.io import corpus

SHARD_SUFFIXES = (".jsonl", ".ndjson", ".parquet")


def shard_paths(patterns: list[str]) -> list[str]:
    """The input shards: each pattern a path or a glob, in order, no shard twice."""
    shards: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UsageError(f"--input {pattern}: matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise UsageError(f"--input {path}: no such file")
            if not path.lower().endswith(SHARD_SUFFIXES):
                raise UsageError(f"--input {path}: --ray reads .jsonl and .parquet shards")
            if os.path.abspath(path) not in (os.path.abspath(s) for s in shards):
                shards.append(path)
    kinds = {path.lower().endswith(".parquet") for path in shards}
    if len(kinds) > 1:
        raise UsageError("--input: mixes JSON-lines and Parquet shards; give one kind")
    return shards


def output_for(shard: str, folder: str) -> str:
    stem = os.path.splitext(os.path.basename(shard))[0]
    return os.path.join(folder, stem + ".parquet")


def encode_shards(options: EncodeOptions) -> int:
    strategies = encode_strategies(options, "pooled")
    if options.tokens or options.words:
        raise UsageError("--ray: writes pooled embeddings; --tokens and --words run without it")
    if options.field is not None:
        raise UsageError("--field: --ray takes the text column with --column")
    if options.dimensions is not None:
        raise UsageError("--dimensions: not with --ray; cut the columns afterwards")
    if options.format is not None:
        raise UsageError("--format: --ray reads shards by their extension (.jsonl, .parquet)")
    shards = shard_paths(options.input)
    folder = options.output
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--output {folder}: --ray writes a folder of Parquet files; not a file")
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise UsageError(f"--output {folder}: the folder {parent} does not exist")
    outputs = [output_for(shard, folder) for shard in shards]
    if len(set(outputs)) != len(outputs):
        raise UsageError("--input: two shards share a file name; their outputs would collide")
    pending = [(s, o) for s, o in zip(shards, outputs, strict=True) if not os.path.exists(o)]
    done = len(shards) - len(pending)
    if done:
        print(f"{done} of {len(shards)} shards already encoded in {folder}: skipped")
    if not pending:
        return 0
    column = options.column or "text"
    id_column = options.id_column
    _check_columns(pending[0][0], column, id_column)
    model = checks.preflight(options, strategies)
    try:
        import ray
    except ImportError:
        raise UsageError(
            '--ray: needs Ray Data: pip install ".[ray]" in a hiddenpool checkout'
        ) from None
    if not ray.is_initialized():
        _check_address(options.address)
    os.makedirs(folder, exist_ok=True)
    import logging

    # A successful run prints its own lines only (one per shard); Ray's go to its session
    # logs (/tmp/ray/session_*/logs), where they are kept whole:
    # - ray.init's notes (token authentication is on, ...): its logging_level, ERROR;
    # - Ray Data's INFO and WARNING lines ("Starting execution", "Progress bars disabled"):
    #   the console handler of the "ray.data" logger, ERROR (its file handler keeps all).
    # Errors still show, and a failure still raises. One line stays: the driver's C++ core
    # worker says at ERROR level that Ray Data's actors take their constructor arguments
    # from the object store and may be restarted (ray #53727), true of every actor pool
    # Ray Data makes; only RAY_BACKEND_LOG_LEVEL=fatal hides it, which hides the driver's
    # real C++ errors too, so it is left, and the README says what it means.
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=options.address,
            log_to_driver=False,
            include_dashboard=False,
            logging_level=logging.ERROR,
        )
    import ray.data

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
    try:
        return _run(options, ray, pending, model, strategies, column, id_column)
    finally:
        if started_here:
            ray.shutdown()


def _check_address(address: str | None) -> None:
    """Something answers at ``--address`` (``HOST:PORT`` or ``ray://HOST:PORT``): ray.init
    waits for minutes on an address where nothing listens, so a TCP connection is tried
    first, for a few seconds."""
    import socket

    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UsageError(f"--address {address}: no Ray cluster answers there ({error})") from None


def _check_columns(shard: str, column: str, id_column: str | None) -> None:
    """The first shard's first record has the columns asked for (before Ray starts)."""
    chunks = corpus.read_chunks(
        shard,
        column=column if shard.endswith(".parquet") else None,
        field=None if shard.endswith(".parquet") else column,
        id_column=id_column,
        chunk_size=1,
    )
    del chunks


def _run(
    options: EncodeOptions,
    ray: Any,
    pending: list[tuple[str, str]],
    model: str,
    strategies: list[str],
    column: str,
    id_column: str | None,
) -> int:
    import ray.data

    from hiddenpool.integrations.ray import encode_dataset

    expected = {os.path.abspath(shard): corpus.count_records(shard) for shard, _ in pending}
    targets = {os.path.abspath(shard): output for shard, output in pending}
    paths = [shard for shard, _ in pending]
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows of a shard come back in order
    context.enable_progress_bars = False
    # Reads ask for no CPU: they are light next to encoding, and an actor pool holding
    # every CPU (--actors 2 on 2 CPUs) would otherwise leave them none and the job hangs.
    read_options = {"include_paths": True, "num_cpus": 0}
    if paths[0].lower().endswith(".parquet"):
        dataset = ray.data.read_parquet(paths, **read_options)
    else:
        dataset = ray.data.read_json(paths, **read_options)
    with warnings.catch_warnings():
        # Its warning about actors holding every CPU is about reads that need one; these
        # need none (above).
        warnings.filterwarnings("ignore", message="actors: .* hold all")
        encoded = _encoded(options, encode_dataset, dataset, model, strategies, column)
    writers: dict[str, _ShardWriter] = {}
    started = time.perf_counter()
    rows = 0
    try:
        for table in encoded.iter_batches(batch_format="pyarrow", batch_size=None):
            for path, part in _split_by_path(table):
                key = os.path.abspath(path)
                if key not in targets:
                    raise RuntimeError(f"rows of an unexpected shard {path}")
                writer = writers.get(key)
                if writer is None:
                    writer = writers[key] = _ShardWriter(targets[key], id_column)
                writer.append(part)
                rows += part.num_rows
                if writer.rows == expected[key]:
                    writer.close()
                    print(f"encoded {path}: {writer.rows} rows -> {targets[key]}")
                elif writer.rows > expected[key]:
                    raise RuntimeError(f"{path}: more rows came back than the shard holds")
        unfinished = [key for key in targets if key not in writers or not writers[key].closed]
        for key in unfinished:
            if expected[key] == 0:
                _ShardWriter.empty(targets[key], id_column)
                continue
            got = writers[key].rows if key in writers else 0
            raise RuntimeError(f"{key}: {got} of {expected[key]} rows came back")
    finally:
        for writer in writers.values():
            if not writer.closed:
                writer.abort()
    seconds = time.perf_counter() - started
    rate = rows / max(seconds, 1e-9)
    print(f"encoded {rows} rows of {len(pending)} shards in {seconds:.1f} s ({rate:.0f} rows/s)")
    return 0


def _encoded(
    options: EncodeOptions,
    encode_dataset: Any,
    dataset: Any,
    model: str,
    strategies: list[str],
    column: str,
) -> Any:
    return encode_dataset(
        dataset,
        model,
        strategies,
        column=column,
        normalize=options.normalize,
        actors=options.actors,
        cpus_per_actor=options.cpus_per_actor or 1,
        backend=options.backend,
        max_batch_tokens=options.max_batch_tokens,
        prompt=options.prompt,
        include_prompt=options.include_prompt,
    )


def _split_by_path(table: Any) -> list[tuple[str, Any]]:
    """Consecutive runs of rows from one shard, without the ``path`` column."""
    paths = table.column("path").to_pylist()
    table = table.drop_columns(["path"])
    parts = []
    start = 0
    for index in range(1, len(paths) + 1):
        if index == len(paths) or paths[index] != paths[start]:
            parts.append((paths[start], table.slice(start, index - start)))
            start = index
    return parts


class _ShardWriter:
    """One shard's Parquet output, written to a temporary and renamed when complete. Rows
    get a ``row`` column (their number in the shard) unless ``--id-column`` names ids."""

    def __init__(self, path: str, id_column: str | None) -> None:
        self.path = path
        self.id_column = id_column
        self._staged = corpus.StagedFile(path)
        self.writer: Any = None
        self.rows = 0
        self.closed = False

    def append(self, table: Any) -> None:
        import pyarrow as arrow
        import pyarrow.parquet as parquet

        if self.id_column is None and "row" not in table.column_names:
            numbers = arrow.array(range(self.rows, self.rows + table.num_rows), arrow.int64())
            table = table.add_column(0, "row", numbers)
        if self.writer is None:
            self.writer = parquet.ParquetWriter(self._staged.temporary, table.schema)
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        self.writer.close()
        self._staged.commit()
        self.closed = True

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self._staged.discard()
        self.closed = True

    @staticmethod
    def empty(path: str, id_column: str | None) -> None:
        """An empty shard's output: no rows (its schema is unknown without one)."""
        import pyarrow as arrow
        import pyarrow.parquet as parquet

        with corpus.atomic_path(path) as temporary:
            parquet.write_table(
                arrow.table({id_column or "row": arrow.array([], arrow.int64())}), temporary
            )
