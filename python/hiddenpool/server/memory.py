"""Giving freed memory back to the operating system between batches.

A server's memory is freed in one thread and allocated in others (the event loop parses
bodies and builds responses, tokenizing runs in a thread pool and in the tokenizers
package's own threads, the worker runs the model and pools), and glibc's malloc keeps what
is freed inside its per-thread arenas for reuse rather than returning it. Under a soak of
mixed request sizes the server's RSS grew in steps (+73 to +83 MB after the first minute)
while the Python heap stayed flat (tracemalloc: 28-48 MB throughout) and the same encoding
without the server grew by 16 MB: the growth was freed memory held by the allocator.
``malloc_trim(0)`` hands free pages of every arena back; it costs milliseconds, so the
worker calls it at most once per ``interval`` seconds. Elsewhere than glibc it does
nothing.

And Python's cyclic collector, whose full collections run on whichever thread allocates,
usually the event loop: see ``serving_collector``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hiddenpool.server.metrics import Histogram

# Full collections after this many second-generation ones (Python's default: 10). Under
# overload ~80,000 objects belong to the requests in flight; at the default, full
# collections scanned them every few seconds on the event loop, 50-100 ms each, and they
# were the p99 of the 429s (benches/serve_faults.py overload). A request leaves no cyclic
# garbage (tests/test_server_memory.py), so there is little for them to find.
FULL_COLLECTION_EVERY = 100


@contextlib.contextmanager
def serving_collector(pauses: Histogram) -> Iterator[None]:
    """While serving: everything alive at the start (modules, the model, the app) is
    frozen out of the collector's scans (``gc.freeze``), and full collections run a tenth
    as often; both restored at the end. Each collection's duration goes to ``pauses``
    (``/metrics``: ``hiddenpool_collector_pause_seconds``)."""
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold[0], threshold[1], FULL_COLLECTION_EVERY)
    started = [0.0]  # collections run one at a time (under the GIL)

    def time_collection(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.observe(time.perf_counter() - started[0])

    gc.callbacks.append(time_collection)
    try:
        yield
    finally:
        gc.callbacks.remove(time_collection)
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = library.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class Trimmer:
    """Calls ``malloc_trim(0)`` from ``maybe_trim`` at most once per ``interval`` seconds,
    and only after work (``worked``) since the last trim: ``pending`` says a trim is owed,
    so an idle worker can wait ``interval`` and trim once rather than keep a burst's memory
    until the next request."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._trim = _malloc_trim()
        self._last = time.monotonic()
        self.pending = False

    @property
    def available(self) -> bool:
        return self._trim is not None

    def worked(self) -> None:
        """Memory may have been freed since the last trim."""
        self.pending = self._trim is not None

    def maybe_trim(self) -> bool:
        """Trims if one is owed and the interval has passed since the last; whether it did."""
        now = time.monotonic()
        if not self.pending or now - self._last < self.interval:
            return False
        assert self._trim is not None
        self._trim(0)
        self._last = time.monotonic()
        self.pending = False
        return True
