"""``hiddenpool serve --ray`` and ``hiddenpool.ray.serve_app``: Ray Serve replicas of the
server on a local Ray cluster (``ray start --head``, 2 CPUs, started and stopped here),
driven as users drive them (the openai client, httpx), against offline Encoder.encode.
The load-driven runs are marked ``long`` (``make test-long``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from cli_runner import run_cli  # noqa: E402
from hiddenpool import Encoder  # noqa: E402
from hiddenpool.ray import serve_app  # noqa: E402
from hiddenpool.server import ray_serve  # noqa: E402
from test_server import wait_for  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "test-key"
BIN = os.path.dirname(sys.executable)
TEXTS = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The stock market fell sharply today.",
    "Two dogs run across a snowy field.",
    "hello",
    "Ray Serve spreads requests over replicas.",
]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(**extra: str) -> dict[str, str]:
    # The Ray CLI refuses a dashboard with token authentication half set up (a token file
    # left in ~/.ray by another tool); the tests' cluster runs without it, on loopback.
    return dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ['PATH']}", **extra)


class Cluster:
    def __init__(self, gcs: int, dashboard: int, http: int) -> None:
        self.gcs, self.dashboard, self.http = gcs, dashboard, http
        self.url = f"http://127.0.0.1:{http}"


def token_id(encoder: Encoder, word: str) -> int:
    ids = encoder.runner.tokenizer.plain_ids([word])[0]
    assert len(ids) == 1
    return int(ids[0])


@pytest.fixture(scope="module")
def offline(minilm_onnx) -> Encoder:
    return Encoder.from_pretrained(minilm_onnx)


@pytest.fixture(scope="module")
def cluster(offline) -> Iterator[Cluster]:
    """A head node with 2 CPUs; a text holding 'elephant' kills the worker thread of the
    replica that runs it (the server's test hook, in the workers' environment)."""
    ports = Cluster(free_port(), free_port(), free_port())
    kill = str(token_id(offline, "elephant"))
    # Replicas report their load every half second, for the autoscaling test's 2 s window.
    env = environment(
        HIDDENPOOL_TEST_KILL_TOKEN=kill, RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S="0.5"
    )
    subprocess.run(
        ["ray", "start", "--head", "--num-cpus", "2", "--port", str(ports.gcs),
         "--dashboard-port", str(ports.dashboard), "--include-dashboard", "true",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        ray.init(address=f"127.0.0.1:{ports.gcs}", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": ports.http})
        yield ports
    finally:
        serve.shutdown()
        ray.shutdown()
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        os.environ.pop("RAY_AUTH_MODE", None)


def replica_names() -> set[str]:
    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{ray_serve.APPLICATION}#")
    }


def running(application: str = ray_serve.APPLICATION) -> int:
    status = serve.status().applications.get(application)
    if status is None:
        return 0
    deployment = status.deployments.get(ray_serve.DEPLOYMENT)  # absent while deploying
    return 0 if deployment is None else int(deployment.replica_states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def two_replicas(cluster, minilm_onnx) -> Iterator[Cluster]:
    serve.run(
        serve_app(
            minilm_onnx, replicas=2, api_key=KEY, max_client_batch_size=8, request_timeout=20
        ),
        name=ray_serve.APPLICATION,
        route_prefix="/",
    )
    yield cluster
    serve.delete(ray_serve.APPLICATION)


def embed(url: str, texts: list[str], **keywords) -> httpx.Response:
    return httpx.post(
        f"{url}/embed",
        json={"inputs": texts},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        **keywords,
    )


def requests_by_replica(url: str, route: str) -> Counter:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    counts: Counter = Counter()
    pattern = rf'hiddenpool_requests_total{{route="{route}",status="200",replica="([^"]+)"}} (\d+)'
    for replica, count in re.findall(pattern, text):
        counts[replica] += int(count)
    return counts


def test_two_replicas_answer_like_offline_and_share_the_requests(two_replicas, offline):
    from openai import OpenAI

    client = OpenAI(base_url=f"{two_replicas.url}/v1", api_key=KEY)
    answer = client.embeddings.create(model="minilm-onnx", input=TEXTS)
    rows = np.array([item.embedding for item in answer.data], dtype=np.float32)
    expected = offline.encode(TEXTS, "model")
    np.testing.assert_allclose(rows, expected, atol=1e-6)
    response = embed(two_replicas.url, TEXTS[:3])
    assert response.status_code == 200
    np.testing.assert_allclose(response.json()["embeddings"], expected[:3], atol=1e-6)

    def client_loop() -> None:
        for index in range(10):
            assert embed(two_replicas.url, [TEXTS[index % len(TEXTS)]]).status_code == 200

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Each replica's metrics reach /metrics within a second (the replicas push them).
    wait_for(lambda: sum(requests_by_replica(two_replicas.url, "/embed").values()) == 81)
    counts = requests_by_replica(two_replicas.url, "/embed")
    assert len(counts) == 2 and min(counts.values()) > 0, counts


def test_api_key_and_limits_hold_through_the_proxy(two_replicas):
    url = two_replicas.url
    missing = httpx.post(f"{url}/embed", json={"inputs": ["a"]})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(
        f"{url}/embed", json={"inputs": ["a"]}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    too_many = embed(url, ["a"] * 9)
    assert too_many.status_code == 413 and "8" in too_many.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def send_until(url: str, stop: threading.Event, expected: dict[str, np.ndarray], log: list) -> None:
    """One client: requests of one known text until ``stop``; each outcome logged."""
    index = 0
    while not stop.is_set():
        text = TEXTS[index % len(TEXTS)]
        index += 1
        try:
            response = embed(url, [text])
        except httpx.HTTPError as error:  # a hang past 60 s, or a dropped connection
            log.append(("error", type(error).__name__))
            continue
        if response.status_code == 200:
            rows = np.asarray(response.json()["embeddings"], dtype=np.float32)
            correct = np.allclose(rows, expected[text][None, :], atol=1e-5)
            log.append((200, "correct" if correct else "WRONG ROWS"))
        else:
            log.append((response.status_code, response.text[:200]))


def under_load(url: str, offline: Encoder, action, until) -> list:
    expected = dict(zip(TEXTS, offline.encode(TEXTS, "model"), strict=True))
    stop, log = threading.Event(), []
    clients = [
        threading.Thread(target=send_until, args=(url, stop, expected, log)) for _ in range(8)
    ]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: len(log) > 20, 120)
        action()
        wait_for(until, 180)
        seen = len(log)
        wait_for(lambda: len(log) > seen + 20, 120)
    finally:
        stop.set()
        for client in clients:
            client.join(120)
    return log


def check_outcomes(log: list) -> None:
    assert ("error", "ReadTimeout") not in log
    wrong = [entry for entry in log if entry[1] == "WRONG ROWS" or entry[0] == "error"]
    assert not wrong, wrong[:3]
    failed = [entry for entry in log if entry[0] != 200]
    assert all(500 <= status < 600 for status, _ in failed), failed[:3]


@pytest.mark.long
def test_a_killed_replica_is_replaced_and_no_request_hangs_or_gets_wrong_rows(
    two_replicas, offline
):
    before = replica_names()
    assert len(before) == 2
    victim = sorted(before)[0]

    def kill() -> None:
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    log = under_load(
        two_replicas.url,
        offline,
        kill,
        lambda: running() == 2 and victim not in replica_names() and len(replica_names()) == 2,
    )
    check_outcomes(log)
    # Once replaced, every request succeeds.
    assert all(embed(two_replicas.url, [text]).status_code == 200 for text in TEXTS * 3)


def test_a_replica_whose_worker_died_reports_unhealthy_and_is_replaced(two_replicas, offline):
    before = replica_names()
    killed = embed(two_replicas.url, ["an elephant in the room"])
    assert killed.status_code >= 500
    wait_for(lambda: running() == 2 and len(replica_names() - before) == 1, 180)
    assert all(embed(two_replicas.url, [text]).status_code == 200 for text in TEXTS * 3)
    assert httpx.get(f"{two_replicas.url}/health").json() == {"status": "ok"}


@pytest.mark.long
def test_autoscaling_from_one_to_two_replicas_and_back(cluster, minilm_onnx, offline):
    """Test-sized delays: a replica is added under 8 clients, and removed when one client
    is left; that client's requests, the leaving replica's included, all succeed."""
    serve.delete(ray_serve.APPLICATION)
    serve.run(
        serve_app(
            minilm_onnx,
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=2,
            upscale_delay_s=1,
            downscale_delay_s=3,
            look_back_period_s=2,
            api_key=KEY,
        ),
        name=ray_serve.APPLICATION,
        route_prefix="/",
    )
    try:
        assert running() == 1
        expected = dict(zip(TEXTS, offline.encode(TEXTS, "model"), strict=True))
        stop_many, stop_one, log = threading.Event(), threading.Event(), []
        many = [
            threading.Thread(target=send_until, args=(cluster.url, stop_many, expected, log))
            for _ in range(7)
        ]
        one = threading.Thread(target=send_until, args=(cluster.url, stop_one, expected, log))
        for client in [*many, one]:
            client.start()
        try:
            wait_for(lambda: running() == 2, 180)
            stop_many.set()
            for client in many:
                client.join(120)
            wait_for(lambda: running() == 1 and len(replica_names()) == 1, 180)
        finally:
            stop_many.set()
            stop_one.set()
            one.join(120)
        assert log and all(entry == (200, "correct") for entry in log), Counter(log)
    finally:
        serve.delete(ray_serve.APPLICATION)


@pytest.mark.long
def test_every_replica_full_gives_429_with_retry_after(cluster, minilm_onnx):
    """One replica taking one request at a time, two waiting in the proxy: of twelve
    concurrent long requests, the rest get 429 with Retry-After, none hangs or fails."""
    serve.delete(ray_serve.APPLICATION)
    serve.run(
        serve_app(minilm_onnx, replicas=1, max_concurrent_requests=1, max_queued_requests=2),
        name=ray_serve.APPLICATION,
        route_prefix="/",
    )
    outcomes: list[tuple[int, str | None]] = []

    def send() -> None:
        response = httpx.post(
            f"{cluster.url}/embed", json={"inputs": ["word " * 200] * 32}, timeout=120
        )
        outcomes.append((response.status_code, response.headers.get("retry-after")))

    try:
        clients = [threading.Thread(target=send) for _ in range(12)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(180)
    finally:
        serve.delete(ray_serve.APPLICATION)
    statuses = Counter(status for status, _ in outcomes)
    assert set(statuses) == {200, 429} and statuses[200] >= 3, statuses
    assert all(retry == "1" for status, retry in outcomes if status == 429)


def test_print_config_deploys_with_serve_deploy(cluster, minilm_onnx, offline, tmp_path):
    serve.delete(ray_serve.APPLICATION)  # the keyed two-replica application, if running
    config = tmp_path / "hiddenpool-serve.yaml"
    written = run_cli(
        "serve", "--ray", "--model", minilm_onnx, "--replicas", "1",
        "--port", str(cluster.http), "--print-config", str(config),
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    deployed = subprocess.run(
        ["serve", "deploy", str(config), "--address", f"http://127.0.0.1:{cluster.dashboard}"],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stderr
    try:
        wait_for(lambda: running() == 1, 180)
        response = httpx.post(f"{cluster.url}/embed", json={"inputs": TEXTS}, timeout=60)
        assert response.status_code == 200
        rows = np.asarray(response.json()["embeddings"], dtype=np.float32)
        np.testing.assert_allclose(rows, offline.encode(TEXTS, "model"), atol=1e-6)
    finally:
        serve.delete(ray_serve.APPLICATION)


@pytest.mark.long
def test_serve_ray_command_starts_serves_and_stops(minilm_onnx, offline):
    """As a user runs it: a local Ray instance of its own, one replica; SIGTERM stops
    the replicas and Ray, exit code 0."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hiddenpool", "serve", "--ray", "--model", minilm_onnx,
         "--replicas", "1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
    )  # fmt: skip
    try:
        banner = process.stdout.readline()
        assert f"listening on http://127.0.0.1:{port}" in banner, process.stderr.read()

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 180)
        response = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": TEXTS[:2]})
        np.testing.assert_allclose(
            response.json()["embeddings"], offline.encode(TEXTS[:2], "model"), atol=1e-6
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--replicas", "2"], "--replicas: applies to --ray"),
        (["--ray", "--replicas", "0"], "--replicas: expected 1 or more, got 0"),
        (["--ray", "--replicas", "2", "--max-replicas", "3"], "--replicas: a fixed count"),
        (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas"),
        (["--ray", "--port", "0"], "--port 0: Ray Serve's proxy needs a fixed port"),
        (["--ray", "--cpus-per-replica", "0"], "--cpus-per-replica: expected a positive"),
    ],
)
def test_cli_errors(arguments, message):
    result = run_cli("serve", *arguments)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
