"""The GIL is released around large kernel calls, thread settings take effect, and a
forked child can pool after its parent did."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import hiddenpool
from hiddenpool import _native


def test_two_threads_overlap_inside_the_kernel():
    # One worker thread per call, so each call lasts long enough to see overlap.
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((8, 512, 1024)).astype(np.float32)
    mask = np.ones((8, 512), dtype=bool)
    previous = hiddenpool.get_num_threads()
    hiddenpool.set_num_threads(1)
    intervals: list[tuple[float, float]] = []
    barrier = threading.Barrier(2)

    def work() -> None:
        barrier.wait()
        for _ in range(3):
            start = time.perf_counter()
            _native.pool([hidden], mask, ["mean", "max", "weighted_mean"])
            intervals.append((start, time.perf_counter()))

    try:
        threads = [threading.Thread(target=work) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        hiddenpool.set_num_threads(previous)
    # With the GIL held, no two calls could both be inside the kernel at once: the
    # overlap of any two calls would be limited to the few Python bytecodes around them.
    shortest = min(end - start for start, end in intervals)
    overlap = max(
        min(a_end, b_end) - max(a_start, b_start)
        for i, (a_start, a_end) in enumerate(intervals)
        for (b_start, b_end) in intervals[i + 1 :]
    )
    assert overlap > 0.5 * shortest, (overlap, shortest)


def test_environment_variable_sets_the_thread_count():
    code = "import hiddenpool; print(hiddenpool.get_num_threads())"
    env = dict(os.environ, HIDDENPOOL_NUM_THREADS="3")
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert output.stdout.strip() == "3", output.stderr
    env["HIDDENPOOL_NUM_THREADS"] = "many"
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "HIDDENPOOL_NUM_THREADS" in output.stderr and "ValueError" in output.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_can_pool_after_the_parent():
    code = """
import os, sys
import numpy as np
from hiddenpool import _native
hidden = np.ones((16, 256, 256), dtype=np.float32)
mask = np.ones((16, 256), dtype=bool)
assert _native.pool([hidden], mask, ["mean"])[0, 0] == 1.0  # starts the worker pool
pid = os.fork()
if pid == 0:
    ok = _native.pool([hidden * 2], mask, ["mean"])[0, 0] == 2.0
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], timeout=60)
    assert result.returncode == 0


@pytest.mark.parametrize("on_workers", [False, True])
def test_a_rust_panic_becomes_a_python_exception(on_workers):
    with pytest.raises(RuntimeError, match=r"hiddenpool internal error.*deliberate panic"):
        _native._panic_for_tests(on_workers)
    # The process and the worker pool survive it.
    assert _native.pool([np.ones((1, 2, 3), np.float32)], np.ones((1, 2)), ["sum"])[0, 0] == 2.0
