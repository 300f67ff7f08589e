"""``hiddenpool serve`` under faults and hostile input, as a process on loopback: a forward
pass that fails, a worker that dies, deadlines, slow and lying clients, fuzzed bodies on
every route, the bound address, draining on SIGTERM and a second signal. Each test is
bounded in time; the long load and soak runs are ``benches/serve_faults.py``."""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from multiprocessing.pool import ThreadPool

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hiddenpool import Encoder
from test_server import TEXTS, Server, corpus, wait_for

pytestmark = pytest.mark.slow


def token_id(encoder: Encoder, word: str) -> int:
    ids = encoder.runner.tokenizer.plain_ids([word])[0]
    assert len(ids) == 1, f"{word!r} is not one token"
    return int(ids[0])


@pytest.fixture(scope="module")
def faulty(minilm_onnx, onnx_encoder) -> Iterator[Server]:
    """A server whose forward pass fails on batches holding 'zebra', and whose tokenizing
    fails on a text holding 'unicorn-fault' (test hooks)."""
    running = Server(
        "--model",
        minilm_onnx,
        "--request-timeout",
        "2",
        "--read-timeout",
        "1",
        environment={
            "HIDDENPOOL_TEST_FAIL_TOKEN": str(token_id(onnx_encoder, "zebra")),
            "HIDDENPOOL_TEST_FAIL_TEXT": "unicorn-fault",
        },
    )
    yield running
    assert running.stop() == 0


def post(server: Server, route: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


def test_a_failing_forward_pass_fails_only_its_requests(faulty, onnx_encoder):
    response = post(faulty, "/v1/embeddings", {"model": faulty.model, "input": ["a zebra runs"]})
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert message == "the forward pass failed (RuntimeError)"
    good = post(faulty, "/v1/embeddings", {"model": faulty.model, "input": TEXTS})
    assert good.status_code == 200
    got = np.array([item["embedding"] for item in good.json()["data"]])
    np.testing.assert_allclose(got, onnx_encoder.encode(TEXTS), atol=1e-6)
    assert httpx.get(f"{faulty.url}/health").status_code == 200
    assert faulty.metric("hiddenpool_batch_failures_total") >= 1


def test_a_tokenizer_error_fails_only_its_request(faulty, onnx_encoder):
    """One request's tokenizing fails while others are in flight: it alone gets a one-line
    500, short (tokenized on the event loop) or long (in a thread); the others get their
    rows."""
    bad_inputs = [["fine", "a unicorn-fault here"], ["long text " * 500 + "unicorn-fault"]]
    good_inputs = [TEXTS[i : i + 3] for i in range(0, 9, 3)]
    with httpx.Client(timeout=60) as client, ThreadPool(8) as pool:
        bodies = [
            {"model": faulty.model, "input": inputs}
            for inputs in [*good_inputs, *bad_inputs, *good_inputs]
        ]
        responses = pool.map(
            lambda body: client.post(f"{faulty.url}/v1/embeddings", json=body), bodies
        )
    statuses = [response.status_code for response in responses]
    assert statuses == [200] * 3 + [500] * 2 + [200] * 3
    for response in responses[3:5]:
        message = response.json()["error"]["message"]
        assert message == "tokenizing the input failed (RuntimeError)"
        assert "\n" not in response.text and "Traceback" not in response.text
    for inputs, response in zip(
        [*good_inputs, *good_inputs], responses[:3] + responses[5:], strict=True
    ):
        got = np.array([item["embedding"] for item in response.json()["data"]])
        np.testing.assert_allclose(got, onnx_encoder.encode(inputs), atol=1e-6)
    assert httpx.get(f"{faulty.url}/health").status_code == 200


def test_deadline_gives_504_and_drops_the_texts(faulty):
    before = faulty.metric("hiddenpool_forward_texts_total")
    cancelled = faulty.metric("hiddenpool_cancelled_texts_total")
    response = post(faulty, "/embed", {"inputs": corpus(2000, seed=7)})
    assert response.status_code == 504
    assert "--request-timeout" in response.json()["error"]["message"]
    # Answered before the work was done, and what had not run yet is dropped: the order of
    # events, not a wall-clock margin.
    assert faulty.metric("hiddenpool_forward_texts_total") - before < 2000
    wait_for(lambda: faulty.metric("hiddenpool_cancelled_texts_total") > cancelled)
    assert faulty.metric("hiddenpool_forward_texts_total") - before < 2000
    assert post(faulty, "/embed", {"inputs": "next"}).status_code == 200


def _raw(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=10)


def _read_response(connection: socket.socket) -> str:
    """One whole HTTP response: the head up to the blank line, then exactly Content-Length
    bytes of body (or what came before the server closed), however the kernel split them
    into packets; a single ``recv`` may return the head without the body on a loaded
    machine."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        if not chunk:
            return received.decode("latin-1")
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    length = int(found.group(1)) if found else None
    while length is None or len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_slow_client_is_dropped_while_others_are_served(faulty):
    body = json.dumps({"model": faulty.model, "input": "a slow request"}).encode()
    connection = _raw(faulty)
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    connection.sendall(head.encode())
    served = []

    def trickle() -> None:
        for byte in body[:8]:
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.3)

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    served.append(
        post(faulty, "/v1/embeddings", {"model": faulty.model, "input": "meanwhile"}).status_code
    )
    answer = _read_response(connection)
    connection.close()
    sender.join(5)
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert "--read-timeout" in answer
    assert served == [200]


def test_a_content_length_that_lies_is_a_4xx(faulty):
    for declared, sent in ((200, b'{"input": "a"}'), (3, b'{"input": "a"}')):
        connection = _raw(faulty)
        connection.sendall(
            (
                "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {declared}\r\n\r\n"
            ).encode()
            + sent
        )
        answer = _read_response(connection)
        connection.close()
        status = int(answer.split(" ", 2)[1])
        assert 400 <= status < 500, answer[:200]
    assert (
        post(faulty, "/v1/embeddings", {"model": faulty.model, "input": "fine"}).status_code == 200
    )


def test_hostile_sizes(faulty):
    many = post(faulty, "/v1/embeddings", {"model": faulty.model, "input": ["x"] * 100_000})
    assert many.status_code == 413 and "--max-client-batch-size" in many.json()["error"]["message"]
    huge = post(faulty, "/embed", {"inputs": ["word " * 200_000]})
    assert huge.status_code == 200 and huge.headers["x-truncated-inputs"] == "1"
    nul = post(faulty, "/embed", {"inputs": ["a\x00b"]})
    assert nul.status_code == 200
    deep = post(faulty, "/embed", {"inputs": "a", "strategy": [[[]]]})
    assert deep.status_code == 422
    numbers = post(faulty, "/v1/embeddings", {"model": faulty.model, "input": [10**400]})
    assert numbers.status_code == 422


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = {
    "/v1/embeddings": ["input", "model", "encoding_format", "dimensions", "user"],
    "/embed": [
        "inputs",
        "strategy",
        "normalize",
        "prompt",
        "include_prompt",
        "truncate",
        "dimensions",
    ],
    "/embed_tokens": ["inputs", "layers"],
    "/embed_chunks": ["input", "spans", "chunk_tokens", "strategy", "normalize"],
}
ROUTES = sorted(FIELDS)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from(ROUTES),
    body=st.one_of(
        JSON,
        st.sampled_from(ROUTES).flatmap(
            lambda route: st.dictionaries(st.sampled_from(FIELDS[route]), JSON, max_size=5)
        ),
    ),
)
def test_fuzzed_bodies_get_a_4xx_or_a_200_never_a_5xx(faulty, route, body):
    response = httpx.post(f"{faulty.url}{route}", json=body, timeout=60)
    assert response.status_code < 500 or response.status_code == 504, response.text
    if response.status_code != 200:
        message = response.json()["error"]["message"]
        assert "\n" not in message and "Traceback" not in message


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=300))
def test_fuzzed_bytes_get_a_4xx(faulty, body):
    response = httpx.post(
        f"{faulty.url}/v1/embeddings",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code < 500 or response.status_code == 504, response.text


def test_a_concurrent_good_request_is_unchanged_by_hostile_ones(faulty, onnx_encoder):
    expected = onnx_encoder.encode(TEXTS)
    results = []

    failures: list[str] = []

    def hostile() -> None:
        generator = random.Random(0)
        for _ in range(40):
            body = generator.choice(
                # (no "zebra": this server fails whatever batch holds it, by design)
                [b"{", b'{"input": []}', b'{"input": [-5]}', b'{"input": "\\ud800"}', b"[" * 5000]
            )
            try:
                response = httpx.post(
                    f"{faulty.url}/v1/embeddings",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=60,
                )
            except httpx.TransportError as error:
                failures.append(f"{body[:12]!r}: {type(error).__name__}: {error}")
                continue
            if not 400 <= response.status_code < 500:
                failures.append(f"{body[:12]!r}: {response.status_code}")

    noise = [threading.Thread(target=hostile, daemon=True) for _ in range(4)]
    for thread in noise:
        thread.start()
    for _ in range(10):
        response = post(faulty, "/v1/embeddings", {"model": faulty.model, "input": TEXTS})
        results.append(np.array([item["embedding"] for item in response.json()["data"]]))
    for thread in noise:
        thread.join(60)
    assert failures == []
    for got in results:
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_binds_loopback_only(faulty):
    port = int(faulty.url.rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.rsplit(":", 1)
            if int(hexport, 16) == port and state == "0A":  # LISTEN
                listening.append(address)
    assert listening == ["0100007F"]


def test_a_dead_worker_turns_health_to_503_and_requests_fail_fast(minilm_onnx, onnx_encoder):
    running = Server(
        "--model",
        minilm_onnx,
        "--request-timeout",
        "120",
        environment={"HIDDENPOOL_TEST_KILL_TOKEN": str(token_id(onnx_encoder, "elephant"))},
    )
    try:
        assert (
            post(running, "/v1/embeddings", {"model": running.model, "input": "fine"}).status_code
            == 200
        )
        killed = post(running, "/v1/embeddings", {"model": running.model, "input": "an elephant"})
        assert killed.status_code == 503
        assert "worker stopped" in killed.json()["error"]["message"]
        assert httpx.get(f"{running.url}/health").status_code == 503
        # Refused at once, not held until --request-timeout (120 s here) runs out.
        started = time.perf_counter()
        after = post(running, "/v1/embeddings", {"model": running.model, "input": "fine"})
        assert after.status_code == 503 and time.perf_counter() - started < 30
    finally:
        running.stop()


def test_sigterm_drains_every_accepted_request_then_exits_0(minilm_onnx, onnx_encoder):
    running = Server("--model", minilm_onnx)
    texts = corpus(400, seed=9)
    expected = onnx_encoder.encode(texts)
    answered: list[tuple[list[int], httpx.Response]] = []
    refused = []
    stop_sending = threading.Event()

    def client(seed: int) -> None:
        generator = random.Random(seed)
        while not stop_sending.is_set():
            rows = [generator.randrange(len(texts)) for _ in range(generator.randint(1, 60))]
            try:
                response = httpx.post(
                    f"{running.url}/v1/embeddings",
                    json={"model": running.model, "input": [texts[r] for r in rows]},
                    timeout=60,
                )
            except httpx.TransportError:
                refused.append(seed)
                return
            answered.append((rows, response))

    clients = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(8)]
    for thread in clients:
        thread.start()
    wait_for(lambda: len(answered) >= 8)  # every client under way, however slow the machine
    running.process.send_signal(signal.SIGTERM)
    started = time.perf_counter()
    code = running.process.wait(timeout=40)
    stop_sending.set()
    for thread in clients:
        thread.join(30)
    assert code == 0 and time.perf_counter() - started < 30
    statuses = {response.status_code for _, response in answered}
    assert statuses <= {200, 503}, statuses
    ok = [(rows, r) for rows, r in answered if r.status_code == 200]
    assert len(ok) > 8
    for rows, response in ok:
        got = np.array([item["embedding"] for item in response.json()["data"]])
        np.testing.assert_allclose(got, expected[rows], atol=1e-6)
    for _, response in answered:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "draining"


def test_a_second_signal_exits_at_once(minilm_onnx):
    running = Server("--model", minilm_onnx, "--shutdown-timeout", "60")

    def long_request() -> None:
        with contextlib.suppress(httpx.TransportError):  # the server is killed under it
            httpx.post(f"{running.url}/embed", json={"inputs": corpus(2000, seed=11)}, timeout=120)

    sender = threading.Thread(target=long_request, daemon=True)
    sender.start()
    wait_for(lambda: running.metric("hiddenpool_forward_texts_total") > 0)  # it is running
    running.process.send_signal(signal.SIGTERM)
    wait_for(lambda: not _healthy(running))  # draining (503), or no longer listening
    running.process.send_signal(signal.SIGINT)
    started = time.perf_counter()
    code = running.process.wait(timeout=30)
    # 1, not the 0 of a finished drain; and well before the 2,000 texts could be done.
    assert code == 1 and time.perf_counter() - started < 15
    assert sender.is_alive() or running.process.returncode == 1


def _healthy(server: Server) -> bool:
    try:
        return httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    except httpx.TransportError:
        return False
