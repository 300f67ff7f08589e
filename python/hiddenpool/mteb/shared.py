"""The shared forward pass: one task's texts through the model once, every strategy pooled
from the same hidden states, the pooled rows kept on disk until each strategy's MTEB run has
read them.

The rows live in a ``RowStore``: one raw float32 file per strategy and a SQLite index from a
text's key (a hash of its prompt and text) to its row. Memory holds one encode call's rows,
never a corpus's; a run stopped part-way leaves its rows for the rerun to reuse (rows are
written before their keys are committed, so a crash leaves no key without its row)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

# SQLite's default limit on a statement's parameters is 999 (32766 since 3.32).
_LOOKUP_CHUNK = 900


def text_key(prompt: str | None, text: str) -> bytes:
    """16 bytes naming a text as the model sees it (its prompt, then the text)."""
    marker = "\x00" if prompt is None else "\x01" + prompt + "\x00"
    return hashlib.blake2b((marker + text).encode("utf-8"), digest_size=16).digest()


class RowStore:
    """Rows of several strategies for the same texts, on disk under ``folder``."""

    def __init__(self, folder: str, strategies: Sequence[str], widths: Sequence[int]) -> None:
        self.folder = folder
        self.widths = list(widths)
        os.makedirs(folder, exist_ok=True)
        self.paths = [os.path.join(folder, f"strategy-{i}.f32") for i in range(len(widths))]
        self.index = sqlite3.connect(os.path.join(folder, "index.sqlite"))
        layout = json.dumps({"strategies": list(strategies), "widths": self.widths})
        with self.index:
            self.index.execute("CREATE TABLE IF NOT EXISTS layout (value TEXT)")
            self.index.execute("CREATE TABLE IF NOT EXISTS rows (key BLOB PRIMARY KEY, row INT)")
            found = self.index.execute("SELECT value FROM layout").fetchone()
            if found is not None and found[0] != layout:
                self.index.execute("DELETE FROM rows")
                self.index.execute("DELETE FROM layout")
                found = None
            if found is None:
                self.index.execute("INSERT INTO layout VALUES (?)", (layout,))
        self.count = int(self.index.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
        for path, width in zip(self.paths, self.widths, strict=True):
            # Rows past the committed keys are a stopped run's partial write: dropped.
            with open(path, "ab") as handle:
                handle.truncate(self.count * width * 4)

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, row FROM rows WHERE key IN ({marks})"
            found.update((bytes(key), int(row)) for key, row in self.index.execute(query, chunk))
        return found

    def append(self, keys: Sequence[bytes], rows: Sequence[np.ndarray]) -> None:
        """Rows of new, distinct ``keys``, one array per strategy in the store's order."""
        for path, width, values in zip(self.paths, self.widths, rows, strict=True):
            if values.shape != (len(keys), width):
                raise ValueError(f"rows: expected {(len(keys), width)}, got {values.shape}")
            with open(path, "r+b") as handle:
                handle.seek(self.count * width * 4)
                handle.write(np.ascontiguousarray(values, dtype="<f4").tobytes())
        with self.index:
            self.index.executemany(
                "INSERT INTO rows VALUES (?, ?)",
                ((key, self.count + i) for i, key in enumerate(keys)),
            )
        self.count += len(keys)

    def read(self, strategy: int, rows: np.ndarray) -> np.ndarray:
        width = self.widths[strategy]
        if self.count == 0:
            return np.zeros((len(rows), width), np.float32)
        data = np.memmap(self.paths[strategy], dtype="<f4", mode="r", shape=(self.count, width))
        return np.array(data[rows], dtype=np.float32)

    def close(self, *, remove: bool) -> None:
        self.index.close()
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)


class Producer(Protocol):
    """What the pass encodes with (``HiddenpoolModel``): its encoder and options."""

    encoder: Any

    def encode_texts(
        self, texts: list[str], strategies: Sequence[str], prompt: str | None
    ) -> dict[str, np.ndarray]: ...


class SharedPass:
    """Serves each strategy's rows for the texts MTEB asks about, encoding (for all the
    strategies at once) only the texts no earlier call has encoded. ``texts_encoded``
    counts the texts put through the model."""

    def __init__(self, producer: Producer, strategies: Sequence[str], folder: str) -> None:
        self.producer = producer
        self.strategies = list(strategies)
        self.widths = [int(producer.encoder.encode([], s).shape[1]) for s in self.strategies]
        self.folder = folder
        self.store: RowStore | None = None
        self.texts_encoded = 0

    def open(self, task_name: str) -> None:
        """Starts a task: its rows go to (or are reused from) ``folder/<task_name>``."""
        self.close(remove=False)
        self.store = RowStore(os.path.join(self.folder, task_name), self.strategies, self.widths)

    def close(self, *, remove: bool) -> None:
        if self.store is not None:
            self.store.close(remove=remove)
            self.store = None

    def rows(self, strategy: str, texts: list[str], prompt: str | None) -> np.ndarray:
        if self.store is None:
            raise RuntimeError("SharedPass.rows: no task opened")
        store = self.store
        keys = [text_key(prompt, text) for text in texts]
        found = store.lookup(keys)
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in found:
                missing.setdefault(key, text)
        if missing:
            encoded = self.producer.encode_texts(list(missing.values()), self.strategies, prompt)
            store.append(list(missing), [encoded[s] for s in self.strategies])
            self.texts_encoded += len(missing)
            found.update(store.lookup(list(missing)))
        order = np.fromiter((found[key] for key in keys), dtype=np.int64, count=len(keys))
        return store.read(self.strategies.index(strategy), order)
