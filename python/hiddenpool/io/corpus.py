"""Corpora larger than memory: texts read in chunks, embeddings written as they come.

Readers stream text files (one text a line), JSON lines, CSV/TSV and Parquet in chunks of
``chunk_size`` records (a JSON array is parsed whole: JSON has no streaming reader in the
standard library). Writers append each chunk's rows to ``.npy``, ``.npz``, Parquet or JSON
lines and put the finished file in place only when everything was written (a temporary
beside it, renamed at the end), so an interrupted run leaves no half-written output.

Memory stays bounded by a chunk: nothing holds the whole corpus or all its embeddings.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hiddenpool.io.json_lines import read_json_lines

# Texts per chunk: enough to fill many token-budget batches (the encoder sorts within a
# chunk), few enough that a chunk's tokens and vectors are megabytes, not gigabytes.
DEFAULT_CHUNK_SIZE = 8192

INPUT_SUFFIXES = (".txt", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")


class CorpusError(ValueError):
    """A corpus file that cannot be read as asked; the text names the file and the place."""


@dataclass
class Chunk:
    """Consecutive records of a corpus: their ids (the id column's values, else row
    numbers counted from 0 over the whole file) and texts."""

    ids: list[Any]
    texts: list[str]


# The kinds of input file, as --format names them, with the extensions that mean them.
FORMATS = {
    "text": (".txt", ".text"),
    "jsonl": (".jsonl", ".ndjson"),
    "json": (".json",),
    "csv": (".csv",),
    "tsv": (".tsv",),
    "parquet": (".parquet",),
}


def input_format(path: str, format: str | None = None) -> str:
    """The kind of input file ``path`` is (a key of FORMATS): ``format`` when given, else
    its extension's; a CorpusError for an extension that names none.

    >>> input_format("notes.TXT"), input_format("rows.ndjson"), input_format("x.md", "text")
    ('text', 'jsonl', 'text')
    """
    if format is not None:
        if format not in FORMATS:
            raise CorpusError(f"--format {format}: expected one of {', '.join(FORMATS)}")
        return format
    extension = os.path.splitext(path)[1].lower()
    for name, extensions in FORMATS.items():
        if extension in extensions:
            return name
    known = ", ".join(e for extensions in FORMATS.values() for e in extensions)
    raise CorpusError(
        f"--input {path}: {'no extension' if not extension else repr(extension)} is no kind of "
        f"input hiddenpool reads ({known}); --format text reads it as plain text, a text a line"
    )


def read_chunks(
    path: str,
    *,
    field: str | None = None,
    column: str | None = None,
    id_column: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    format: str | None = None,
) -> Iterator[Chunk]:
    """The texts of ``path`` in chunks of at most ``chunk_size``.

    The kind of file comes from its extension (``.txt``/``.text``: a text a line;
    ``.jsonl``/``.ndjson``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``), or from
    ``format`` (one of FORMATS) when given; any other extension is refused rather than
    read as text.

    ``field`` names the text field of JSON input, ``column`` the text column of CSV, TSV
    and Parquet (both default to ``text``); ``id_column`` names a field or column whose
    values become the ids (row numbers otherwise). Errors (a missing field, a value that is
    not a string, bad JSON) raise CorpusError naming file and line or row; those found in
    the header are raised before the first chunk.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "texts.txt")
    >>> _ = open(path, "w").write("a cat\\na dog\\nhi\\n")
    >>> [(chunk.ids, chunk.texts) for chunk in read_chunks(path, chunk_size=2)]
    [([0, 1], ['a cat', 'a dog']), ([2], ['hi'])]
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    if not os.path.exists(path):
        raise CorpusError(f"--input {path}: no such file")
    if os.path.isdir(path):
        raise CorpusError(f"--input {path}: is a folder; give a file")
    lower = "." + input_format(path, format)
    is_json = lower.endswith((".jsonl", ".ndjson", ".json"))
    is_table = lower.endswith((".csv", ".tsv", ".parquet"))
    if field is not None and not is_json:
        raise CorpusError(f"--field: applies to .json and .jsonl input, not {path}")
    if column is not None and not is_table:
        raise CorpusError(f"--column: applies to .csv, .tsv and .parquet input, not {path}")
    if id_column is not None and not (is_json or is_table):
        raise CorpusError(f"--id-column: applies to JSON, CSV, TSV and Parquet input, not {path}")
    try:
        if lower.endswith(".parquet"):
            records = _parquet_records(path, column or "text", id_column, chunk_size)
        elif lower.endswith(".json"):
            records = _json_array_records(path, field or "text", id_column)
        elif is_json:
            records = _json_lines_records(path, field or "text", id_column)
        elif lower.endswith((".csv", ".tsv")):
            records = _csv_records(path, column or "text", id_column, tabs=lower == ".tsv")
        else:
            records = _line_records(path)
        # The first record is read now, so header errors come before any expensive work.
        first = next(records, None)
    except UnicodeDecodeError as error:
        raise CorpusError(f"--input {path}: not UTF-8 text ({error.reason})") from None
    return _chunked(path, first, records, chunk_size)


def _chunked(
    path: str, first: tuple[Any, str] | None, records: Iterator[tuple[Any, str]], size: int
) -> Iterator[Chunk]:
    if first is None:
        return
    ids, texts = [first[0]], [first[1]]
    try:
        for identifier, text in records:
            if len(texts) == size:
                yield Chunk(ids, texts)
                ids, texts = [], []
            ids.append(identifier)
            texts.append(text)
    except UnicodeDecodeError as error:
        raise CorpusError(f"--input {path}: not UTF-8 text ({error.reason})") from None
    yield Chunk(ids, texts)


def read_texts(path: str, *, field: str | None = None, column: str | None = None) -> list[str]:
    """Every text of ``path`` in one list (``read_chunks`` joined)."""
    return [text for chunk in read_chunks(path, field=field, column=column) for text in chunk.texts]


def count_records(path: str) -> int:
    """Records in a corpus file without parsing them: Parquet's row count from its footer,
    else non-blank lines (JSON lines), data lines (CSV/TSV: lines less the header; quoted
    newlines would count twice, so use it for JSON lines and Parquet) or lines (text)."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as parquet

        return int(parquet.ParquetFile(path).metadata.num_rows)
    with open(path, "rb") as handle:
        if lower.endswith((".jsonl", ".ndjson")):
            return sum(1 for line in handle if line.strip())
        lines = sum(1 for _ in handle)
    return lines - 1 if lower.endswith((".csv", ".tsv")) else lines


def _line_records(path: str) -> Iterator[tuple[Any, str]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            yield number, line.rstrip("\r\n")


def _value(path: str, where: str, record: dict[str, Any], name: str, flag: str) -> Any:
    if name not in record:
        raise CorpusError(f"{path}:{where}: no {name!r} field (choose one with {flag})")
    return record[name]


def _text(path: str, where: str, value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise CorpusError(f"{path}:{where}: field {name!r} is not a string")
    return value


def _json_lines_records(path: str, name: str, id_column: str | None) -> Iterator[tuple[Any, str]]:
    for row, (number, record) in enumerate(read_json_lines(path)):
        where = str(number)
        if not isinstance(record, dict):
            raise CorpusError(f"{path}:{where}: expected a JSON object with a {name!r} field")
        text = _text(path, where, _value(path, where, record, name, "--field"), name)
        identifier = row
        if id_column is not None:
            identifier = _value(path, where, record, id_column, "--id-column")
        yield identifier, text


def _json_array_records(path: str, name: str, id_column: str | None) -> Iterator[tuple[Any, str]]:
    with open(path, encoding="utf-8") as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as error:
            raise CorpusError(
                f"{path}:{error.lineno}: not valid JSON ({error.msg}); one JSON object per "
                "line is .jsonl"
            ) from None
    if not isinstance(records, list):
        raise CorpusError(f"{path}: expected a JSON array of strings or objects")
    for index, record in enumerate(records):
        where = f"item {index}"
        if isinstance(record, dict):
            text = _text(path, where, _value(path, where, record, name, "--field"), name)
            identifier = index
            if id_column is not None:
                identifier = _value(path, where, record, id_column, "--id-column")
            yield identifier, text
        else:
            if id_column is not None:
                raise CorpusError(f"{path}:{where}: --id-column needs objects, got a string")
            yield index, _text(path, where, record, name)


def _csv_records(
    path: str, name: str, id_column: str | None, tabs: bool
) -> Iterator[tuple[Any, str]]:
    delimiter = "\t" if tabs else ","
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        for wanted, flag in ((name, "--column"), (id_column, "--id-column")):
            if wanted is not None and wanted not in header:
                raise CorpusError(
                    f"{path}: no column {wanted!r} in the header {list(header)} "
                    f"(choose one with {flag})"
                )
        for row, record in enumerate(reader):
            value = record.get(name)
            if value is None:
                raise CorpusError(f"{path}:{reader.line_num}: the row has no {name!r} value")
            yield (record[id_column] if id_column is not None else row), value


def _parquet_records(
    path: str, name: str, id_column: str | None, chunk_size: int
) -> Iterator[tuple[Any, str]]:
    parquet = pyarrow_parquet("Parquet input")
    try:
        source = parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid and OSError kinds
        raise CorpusError(f"--input {path}: not a Parquet file ({error})") from None
    names = source.schema_arrow.names
    for wanted, flag in ((name, "--column"), (id_column, "--id-column")):
        if wanted is not None and wanted not in names:
            raise CorpusError(f"{path}: no column {wanted!r} in {names} (choose one with {flag})")
    columns = [name] if id_column is None else [name, id_column]
    row = 0
    for batch in source.iter_batches(batch_size=chunk_size, columns=columns):
        texts = batch.column(name).to_pylist()
        ids = batch.column(id_column).to_pylist() if id_column is not None else None
        for offset, text in enumerate(texts):
            where = f"row {row + offset}"
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{where}: column {name!r} is not a string ({text!r})")
            yield (ids[offset] if ids is not None else row + offset), text
        row += len(texts)


def pyarrow_parquet(what: str) -> Any:
    """``pyarrow.parquet``, or a CorpusError saying ``what`` needs it."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise CorpusError(
            f'{what} needs pyarrow: pip install ".[parquet]" in a hiddenpool checkout'
        ) from None
    return parquet


# Writers ---------------------------------------------------------------------------------


class StagedFile:
    """A temporary file beside ``path`` that becomes ``path`` on ``commit`` and is removed
    on ``discard`` (a no-op after ``commit``), so an interrupted run (Ctrl-C, a crash, a bad
    record halfway) leaves no partial output and an old file untouched. The output gets
    the mode a plain ``open`` would give (a new file 0666 less the umask; a file written
    over keeps its mode). ``scratch=True`` adds a scratch folder beside it, removed by
    either."""

    def __init__(self, path: str, *, scratch: bool = False) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise CorpusError(f"{path}: the folder {directory} does not exist")
        handle, temporary = tempfile.mkstemp(
            dir=directory, prefix=".hiddenpool-", suffix=".partial"
        )
        os.close(handle)
        mode = os.stat(path).st_mode & 0o7777 if os.path.isfile(path) else 0o666 & ~current_umask()
        os.chmod(temporary, mode)
        self.path = path
        self.temporary = temporary
        self.scratch = tempfile.mkdtemp(dir=directory, prefix=".hiddenpool-") if scratch else None

    def commit(self) -> None:
        os.replace(self.temporary, self.path)
        self._remove_scratch()

    def discard(self) -> None:
        if os.path.exists(self.temporary):
            os.remove(self.temporary)
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """``StagedFile(path).temporary`` for the block, committed when it finishes."""
    staged = StagedFile(path)
    try:
        yield staged.temporary
        staged.commit()
    finally:
        staged.discard()


def write_npz(path: str, members: dict[str, str | np.ndarray]) -> None:
    """An uncompressed ``.npz`` at ``path``: each member a ``.npy`` file already written
    (copied in as it is) or an array."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, member in members.items():
            if isinstance(member, str):
                archive.write(member, f"{name}.npy")
            else:
                with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                    np.lib.format.write_array(handle, member, allow_pickle=False)


def current_umask() -> int:
    """The process umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The .npy header is written twice: first with a row count of 0, then with the final one.
# Reserving this many bytes lets the second fit where the first was (shapes up to 20
# digits); numpy pads headers with spaces to a multiple of 64 bytes, as done here.
_NPY_HEADER_BYTES = 128


class NpyRows:
    """Rows of one float32 ``[N, D]`` array appended to an open file in the ``.npy``
    format, the row count fixed up at ``close``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.rows = 0
        self.width: int | None = None
        self._header(0, 0)

    def _header(self, rows: int, width: int) -> None:
        text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {width}), }}"
        # magic (6) + version (2) + length (2) + text + newline, padded to the reserve.
        padding = _NPY_HEADER_BYTES - 10 - len(text) - 1
        self.handle.seek(0)
        self.handle.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER_BYTES - 10))
        self.handle.write((text + " " * padding + "\n").encode("latin1"))
        self.handle.seek(0, os.SEEK_END)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype="<f4")
        if self.width is None:
            self.width = rows.shape[1]
        elif rows.shape[1] != self.width:
            raise ValueError(f"rows: width {rows.shape[1]} after rows of width {self.width}")
        self.handle.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self, width: int | None = None) -> None:
        """Writes the final header; ``width`` gives it when no row was appended."""
        self._header(self.rows, self.width if self.width is not None else (width or 0))


class EmbeddingWriter:
    """Appends each chunk's embeddings (``{key: [n, D] float32}``) to one output file:
    ``.npy`` (one key), ``.npz`` (one array per key), or ``.parquet`` (an id column and one
    fixed-size float32 list column per key). The file appears at ``path`` only after
    ``close``; ``abort`` (or an exception inside ``with``) removes every trace."""

    def __init__(self, path: str, keys: Sequence[str], id_name: str = "id") -> None:
        lower = path.lower()
        if lower.endswith(".npy") and len(keys) != 1:
            raise CorpusError(f"{path}: .npy holds one array; use .npz for several strategies")
        if not lower.endswith((".npy", ".npz", ".parquet")):
            raise CorpusError(f"{path}: expected .npy, .npz or .parquet")
        if lower.endswith(".parquet"):
            pyarrow_parquet("Parquet output")
        self.path = path
        self.keys = list(keys)
        self.id_name = id_name
        self.kind = lower.rsplit(".", 1)[1]
        self._staged = StagedFile(path, scratch=self.kind == "npz")
        self._handles: dict[str, Any] = {}
        self._arrays: dict[str, NpyRows] = {}
        self._parquet: Any = None
        self.rows = 0
        self.finished = False

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if self.finished:
            return
        if kind is None:
            self.close()
        else:
            self.abort()

    def append(self, ids: Sequence[Any], embeddings: dict[str, np.ndarray]) -> None:
        if self.kind == "parquet":
            self._append_parquet(ids, embeddings)
        else:
            for key in self.keys:
                if key not in self._arrays:
                    # .npy: rows go straight into the output's temporary; .npz: one file
                    # per key, zipped at the end (a zip cannot take several growing members).
                    name = self._staged.temporary
                    if self._staged.scratch is not None:
                        name = os.path.join(self._staged.scratch, f"{len(self._arrays)}.npy")
                    self._handles[key] = open(name, "w+b")  # noqa: SIM115 (closed in close)
                    self._arrays[key] = NpyRows(self._handles[key])
                self._arrays[key].append(embeddings[key])
        self.rows += len(ids)

    def _append_parquet(self, ids: Sequence[Any], embeddings: dict[str, np.ndarray]) -> None:
        import pyarrow as arrow
        import pyarrow.parquet as parquet

        columns = {self.id_name: arrow.array(list(ids))}
        for name, key in zip(embedding_columns(self.keys), self.keys, strict=True):
            columns[name] = fixed_size_lists(embeddings[key])
        table = arrow.table(columns)
        if self._parquet is None:
            self._parquet = parquet.ParquetWriter(self._staged.temporary, table.schema)
        self._parquet.write_table(table)

    def close(self, widths: dict[str, int] | None = None) -> None:
        """Finishes the file and puts it in place; ``widths`` give each key's width when no
        row was written."""
        self.finished = True
        try:
            if self.kind == "parquet":
                if self._parquet is None:
                    self._append_parquet([], _empty(self.keys, widths))
                self._parquet.close()
            else:
                if not self._arrays:
                    self.append([], _empty(self.keys, widths))
                for array in self._arrays.values():
                    array.close()
                for handle in self._handles.values():
                    handle.close()
                if self._staged.scratch is not None:
                    files: dict[str, str | np.ndarray] = {
                        key: handle.name for key, handle in self._handles.items()
                    }
                    write_npz(self._staged.temporary, files)
            self._staged.commit()
        finally:
            self._staged.discard()

    def abort(self) -> None:
        self.finished = True
        try:
            if self._parquet is not None:
                with contextlib.suppress(Exception):
                    self._parquet.close()
            for handle in self._handles.values():
                handle.close()
        finally:
            self._staged.discard()


def embedding_columns(keys: Sequence[str]) -> list[str]:
    """The column names of strategies' embeddings: ``embedding`` for a single strategy,
    else each strategy as given (Parquet output, ``hiddenpool.ray.encode_dataset``)."""
    return ["embedding"] if len(keys) == 1 else list(keys)


def _empty(keys: Sequence[str], widths: dict[str, int] | None) -> dict[str, np.ndarray]:
    return {key: np.zeros((0, (widths or {}).get(key, 0)), np.float32) for key in keys}


def fixed_size_lists(rows: np.ndarray) -> Any:
    """``[n, D]`` float32 rows as a pyarrow ``fixed_size_list<float32>[D]`` array."""
    import pyarrow as arrow

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return arrow.FixedSizeListArray.from_arrays(arrow.array(rows.reshape(-1)), rows.shape[1])


class SpanWriter:
    """Per-text variable-length vectors (``--tokens``, ``--words``) appended to JSON lines
    (one object a text: id, vectors, and for words their text and character offsets) or to
    ``.npz`` (``values`` ``[sum n_i, D]``, ``offsets`` ``[N + 1]`` row boundaries, ``ids``,
    and for words ``char_offsets`` ``[sum n_i, 2]``)."""

    def __init__(self, path: str) -> None:
        lower = path.lower()
        if not lower.endswith((".jsonl", ".ndjson", ".npz")):
            raise CorpusError(f"{path}: token and word vectors go to .jsonl or .npz")
        self.kind = "npz" if lower.endswith(".npz") else "jsonl"
        self.path = path
        self._staged = StagedFile(path, scratch=self.kind == "npz")
        scratch = self._staged.scratch
        self._handle: Any = open(  # noqa: SIM115 (closed in close/abort)
            self._staged.temporary if scratch is None else os.path.join(scratch, "values.npy"),
            "w" if scratch is None else "w+b",
            encoding="utf-8" if scratch is None else None,
        )
        self._values = NpyRows(self._handle) if self.kind == "npz" else None
        self._boundaries = [0]
        self._ids: list[Any] = []
        self._characters: list[np.ndarray] = []
        self.rows = 0

    def append(
        self,
        ids: Sequence[Any],
        vectors: Sequence[np.ndarray],
        texts: Sequence[str] | None = None,
        char_offsets: Sequence[np.ndarray] | None = None,
    ) -> None:
        for index, identifier in enumerate(ids):
            values = vectors[index]
            if self._values is not None:
                self._values.append(values)
                self._boundaries.append(self._boundaries[-1] + len(values))
                self._ids.append(identifier)
                if char_offsets is not None:
                    self._characters.append(char_offsets[index])
                continue
            record: dict[str, Any] = {"id": identifier}
            if char_offsets is not None and texts is not None:
                spans = char_offsets[index].tolist()
                record["words"] = [texts[index][start:end] for start, end in spans]
                record["offsets"] = spans
            record["vectors"] = values.tolist()
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.rows += len(ids)

    def close(self, width: int) -> None:
        try:
            if self._values is not None:
                self._values.close(width)
                self._handle.close()
                members: dict[str, str | np.ndarray] = {
                    "values": self._handle.name,
                    "offsets": np.array(self._boundaries, dtype=np.int64),
                    "ids": np.array(self._ids),
                }
                if self._characters:
                    members["char_offsets"] = np.concatenate(self._characters).astype(np.int64)
                write_npz(self._staged.temporary, members)
            else:
                self._handle.close()
            self._staged.commit()
        finally:
            self._staged.discard()

    def abort(self) -> None:
        try:
            self._handle.close()
        finally:
            self._staged.discard()
