"""``hiddenpool serve`` as its users run it: a process started on a free loopback port,
driven by the ``openai`` client and httpx, compared with ``Encoder`` computing the same
texts offline, then stopped."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow

TEXTS = [
    "A man is playing a guitar.",
    "The cat sits on the mat.",
    "Stock markets fell sharply on Monday after the announcement.",
    "hello",
    "Two dogs run through a field of tall grass near the river bank.",
    "ok",
    "The quick brown fox jumps over the lazy dog.",
    "A woman slices an onion in a small kitchen.",
]


def corpus(count: int, seed: int = 0) -> list[str]:
    """``count`` varied sentences built from TEXTS' words (different lengths)."""
    generator = random.Random(seed)
    words = " ".join(TEXTS).split()
    return [
        " ".join(generator.choice(words) for _ in range(generator.randint(1, 40)))
        for _ in range(count)
    ]


class Server:
    """A running ``hiddenpool serve``; ``url`` is its loopback address."""

    def __init__(self, *arguments: str, environment: dict[str, str] | None = None) -> None:
        environment = dict(
            os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **(environment or {})
        )
        environment.pop("HIDDENPOOL_API_KEY", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hiddenpool", "serve", "--port", "0", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        line = self.banner = self._first_line(timeout=240)
        match = re.search(r"listening on (http://\S+)", line)
        assert match, f"no address in {line!r}; stderr: {self.process.stderr.read()}"  # type: ignore[union-attr]
        self.url = match.group(1)
        named = re.search(r" as '([^']+)'", line)
        assert named, f"no served model name in {line!r}"
        self.model = named.group(1)  # what clients send as "model" on /v1/embeddings

    def _first_line(self, timeout: float) -> str:
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.append(self.process.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        if not lines or not lines[0]:
            self.process.kill()
            raise AssertionError(f"server did not start: {self.process.stderr.read()}")  # type: ignore[union-attr]
        return lines[0]

    def metric(self, name: str, **headers: str) -> float:
        """An unlabelled counter or gauge from ``/metrics``."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=30).text
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def server(minilm_onnx) -> Iterator[Server]:
    running = Server("--model", minilm_onnx, "--max-batch-tokens", "4096")
    yield running
    assert running.stop() == 0


def wait_for(condition: Callable[[], bool], seconds: float = 60) -> None:
    """Polls ``condition`` until it holds (at most ``seconds``): what the server has done,
    not how long it usually takes, so a loaded machine only makes the wait longer."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def post(server: Server, route: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, headers=headers, timeout=120)


def test_openai_client_base64_float_dimensions_and_token_ids(server, onnx_encoder):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    expected = onnx_encoder.encode(TEXTS, "model")
    # The client's default: encoding_format base64, decoded by the client into floats.
    response = client.embeddings.create(model="minilm-onnx", input=TEXTS)
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [item.index for item in response.data] == list(range(len(TEXTS)))
    lengths = [len(ids) for ids in onnx_encoder.runner.tokenizer.tokenize(TEXTS).ids]
    assert response.usage.prompt_tokens == sum(lengths)
    floats = client.embeddings.create(model="minilm-onnx", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, expected[0], atol=1e-6)
    cut = client.embeddings.create(model="minilm-onnx", input=TEXTS, dimensions=64)
    rows = np.array([item.embedding for item in cut.data], dtype=np.float32)
    reference = expected[:, :64] / np.linalg.norm(expected[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(rows, reference, atol=1e-6)
    np.testing.assert_allclose(rows, onnx_encoder.encode(TEXTS, "model", dimensions=64), atol=1e-6)
    # Token ids as the tokenizer gives them without special tokens: the server adds them.
    plain = onnx_encoder.runner.tokenizer.plain_ids(TEXTS[:3])
    by_ids = client.embeddings.create(model="minilm-onnx", input=[list(ids) for ids in plain])
    got = np.array([item.embedding for item in by_ids.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected[:3], atol=1e-6)
    one = client.embeddings.create(model="minilm-onnx", input=list(plain[0]))
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-6)


def test_base64_is_little_endian_float32(server, onnx_encoder):
    response = post(
        server,
        "/v1/embeddings",
        {"model": server.model, "input": TEXTS[:2], "encoding_format": "base64"},
    )
    assert response.status_code == 200
    for item, row in zip(response.json()["data"], onnx_encoder.encode(TEXTS[:2]), strict=True):
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        np.testing.assert_allclose(decoded, row, atol=1e-6)
    for header in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(response.headers[header]) >= 0


def test_embed_three_strategies_tokens_and_chunks(server, onnx_encoder):
    strategies = ["mean@last", "cls@last4:sum", "max+mean@-2"]
    response = post(server, "/embed", {"inputs": TEXTS, "strategy": strategies})
    assert response.status_code == 200, response.text
    expected = onnx_encoder.encode(TEXTS, strategies)
    for name in strategies:
        np.testing.assert_allclose(response.json()["embeddings"][name], expected[name], atol=1e-6)
    one = post(
        server,
        "/embed",
        {"inputs": TEXTS[:2], "strategy": "mean@last", "normalize": True, "dimensions": 10},
    ).json()
    np.testing.assert_allclose(
        one["embeddings"],
        onnx_encoder.encode(TEXTS[:2], "mean@last", normalize=True, dimensions=10),
        atol=1e-6,
    )
    prompt = post(
        server,
        "/embed",
        {"inputs": TEXTS, "strategy": "mean@last", "prompt": "query: ", "include_prompt": False},
    ).json()
    np.testing.assert_allclose(
        prompt["embeddings"],
        onnx_encoder.encode(TEXTS, "mean@last", prompt="query: ", include_prompt=False),
        atol=1e-6,
    )
    # Token vectors and late chunking run through the model too, and count there.
    before = server.metric("hiddenpool_forward_texts_total")
    batches_before = _histogram_count(server, "hiddenpool_batch_texts")
    tokens = post(server, "/embed_tokens", {"inputs": TEXTS[:3], "layers": "last4:mean"}).json()
    assert server.metric("hiddenpool_forward_texts_total") - before == 3
    assert _histogram_count(server, "hiddenpool_batch_texts") > batches_before
    for entry, vectors in zip(
        tokens["data"], onnx_encoder.encode_tokens(TEXTS[:3], "last4:mean"), strict=True
    ):
        np.testing.assert_allclose(entry["embeddings"], vectors, atol=1e-6)
        assert len(entry["offsets"]) == len(entry["tokens"]) == len(vectors)
    text = " ".join(TEXTS)
    # Without a strategy, chunks take the server's (--strategy, here "model": mean@last,
    # normalized), as every other route does.
    before = server.metric("hiddenpool_forward_texts_total")
    chunks = post(server, "/embed_chunks", {"input": text, "spans": [[0, 26], [27, 51]]}).json()
    assert server.metric("hiddenpool_forward_texts_total") - before == 1  # one window
    assert chunks["strategy"] == "model"
    rows = np.array([item["embedding"] for item in chunks["data"]])
    np.testing.assert_allclose(
        rows, onnx_encoder.encode_chunks(text, [(0, 26), (27, 51)], strategy="model"), atol=1e-6
    )
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)
    by_tokens = post(
        server, "/embed_chunks", {"input": text, "chunk_tokens": 8, "strategy": "mean@last"}
    ).json()
    vectors, spans = onnx_encoder.encode_chunks(text, chunk_tokens=8, return_spans=True)
    np.testing.assert_allclose([i["embedding"] for i in by_tokens["data"]], vectors, atol=1e-6)
    assert [tuple(i["span"]) for i in by_tokens["data"]] == [tuple(s) for s in spans]


def _histogram_count(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(rf"^{name}_count (\S+)$", text, re.MULTILINE).group(1))


BAD_REQUESTS = [
    # OpenAI's API: model required, an unrecognized argument a 400 naming it.
    ("/v1/embeddings", {"input": "a"}, 400, "model"),
    ("/v1/embeddings", {"model": "minilm-onnx", "input": "a", "dimension": 64}, 400, "dimension"),
    ("/embed_tokens", {"inputs": "a", "layers": "last99"}, 422, "layers"),
    ("/embed_chunks", {"input": "ab    cd", "spans": [[2, 5]]}, 422, "spans"),
    ("/embed_chunks", {"input": "abc", "chunk_tokens": 2, "strategy": "eos@last"}, 422, "strategy"),
    ("/v1/embeddings", {"model": "minilm-onnx", "input": []}, 422, "input"),
    ("/v1/embeddings", {"model": "minilm-onnx", "input": ""}, 422, "input"),
    ("/v1/embeddings", {"model": "minilm-onnx", "input": [1, "a"]}, 422, "input[0]"),
    ("/v1/embeddings", {"model": "minilm-onnx", "input": 5}, 422, "input"),
    ("/v1/embeddings", {"model": "gpt-4", "input": "a"}, 404, "model"),
    (
        "/v1/embeddings",
        {"model": "minilm-onnx", "input": "a", "dimensions": 385},
        422,
        "dimensions",
    ),
    ("/v1/embeddings", {"model": "minilm-onnx", "input": "a", "dimensions": 0}, 422, "dimensions"),
    (
        "/v1/embeddings",
        {"model": "minilm-onnx", "input": "a", "encoding_format": "int8"},
        422,
        "encoding_format",
    ),
    ("/v1/embeddings", {"model": "minilm-onnx", "input": [[5, 10**9]]}, 422, "input"),
    ("/v1/embeddings", {"model": "minilm-onnx", "input": [-1]}, 422, "input"),
    ("/v1/embeddings", ["input"], 422, "body"),
    ("/embed", {"inputs": "a", "strategy": "median@last"}, 422, "strategy"),
    ("/embed", {"inputs": "a", "strategy": "mean@-9"}, 422, "strategy"),
    ("/embed", {"inputs": "a", "normalise": True}, 422, "normalise"),
    ("/embed", {"inputs": "a", "truncate": "no"}, 422, "truncate"),
    ("/embed", {"inputs": ["a " * 600], "truncate": False}, 422, "inputs"),
    ("/embed", {}, 422, "inputs"),
    ("/embed_tokens", {"inputs": "a", "layers": "bogus"}, 422, "layers"),
    ("/embed_chunks", {"input": "abc", "spans": [[2, 1]]}, 422, "spans"),
    ("/embed_chunks", {"input": "abc"}, 422, "spans"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_REQUESTS)
def test_errors_name_the_field_and_the_server_keeps_serving(server, route, body, status, param):
    response = post(server, route, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    assert (
        post(server, "/v1/embeddings", {"model": server.model, "input": "still here"}).status_code
        == 200
    )


def test_error_messages_name_what_the_caller_gave(server):
    unknown = post(
        server, "/v1/embeddings", {"model": "minilm-onnx", "input": "a", "dimension": 64}
    )
    assert unknown.json()["error"]["message"].startswith("'dimension': unrecognized request")
    missing = post(server, "/v1/embeddings", {"input": "a"}).json()["error"]["message"]
    assert missing == "model: required (this server serves 'minilm-onnx')"
    layers = post(server, "/embed_tokens", {"inputs": "a", "layers": "last99"})
    message = layers.json()["error"]["message"]
    assert message.startswith("layers: 'last99': 'last99' needs 99 hidden states but the model")
    assert "has 7 (the embeddings and 6 layers)" in message and "first@" not in message


def test_a_huge_integer_in_any_field_is_a_4xx_naming_it(server):
    """5,000 digits: past Python's limit on int() of a string, raised inside JSON parsing."""
    digits = "9" * 5000
    for route, body, param in (
        ("/v1/embeddings", f'{{"model": "minilm-onnx", "input": {digits}}}', "input"),
        ("/v1/embeddings", f'{{"model": "minilm-onnx", "input": [{digits}]}}', "input[0]"),
        ("/v1/embeddings", f'{{"model": "minilm-onnx", "input": "a", "dimensions": {digits}}}',
         "dimensions"),
        ("/embed", f'{{"inputs": [{digits}]}}', "inputs[0]"),
        ("/embed", f'{{"inputs": "a", "dimensions": -{digits}}}', "dimensions"),
        ("/embed_tokens", f'{{"inputs": {digits}}}', "inputs"),
        ("/embed_chunks", f'{{"input": "abc", "chunk_tokens": {digits}}}', "chunk_tokens"),
        ("/embed_chunks", f'{{"input": "abc", "spans": [[0, {digits}]]}}', "spans"),
    ):  # fmt: skip
        response = httpx.post(
            f"{server.url}{route}",
            content=body.encode(),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        assert response.status_code == 422, (route, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (route, error)
        assert "5000 digits" in error["message"] or "integers" in error["message"], error


def test_unknown_routes_and_methods_answer_in_the_json_envelope(server):
    missing = httpx.get(f"{server.url}/v2/embeddings")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {
            "message": "route: /v2/embeddings does not exist here (the routes: GET /openapi.json)",
            "type": "not_found_error",
            "param": "route",
            "code": None,
        }
    }
    wrong = httpx.get(f"{server.url}/v1/embeddings")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["message"] == (
        "method: GET is not allowed on /v1/embeddings; use POST"
    )


def test_malformed_bodies(server, onnx_encoder):
    cases = [
        (b"{not json", "application/json", 400),
        (b'{"input": NaN}', "application/json", 400),
        (b'{"input": "\xff"}', "application/json", 400),
        (b'{"model": "minilm-onnx", "input": "\\ud800"}', "application/json", 422),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
        (b'{"input": "a"}', "text/plain", 415),
    ]
    for body, content_type, status in cases:
        response = httpx.post(
            f"{server.url}/v1/embeddings",
            content=body,
            headers={"content-type": content_type},
            timeout=60,
        )
        assert response.status_code == status, (body[:20], response.text)
        assert "error" in response.json()
    too_big = httpx.post(
        f"{server.url}/embed",
        json={"inputs": ["x" * 1000] * 3000},
        timeout=60,
    )
    assert too_big.status_code == 413 and "payload-limit" in too_big.json()["error"]["message"]
    # A text longer than the model is truncated by default, and counted in a header.
    long = post(server, "/embed", {"inputs": ["word " * 600, "short"]})
    assert long.status_code == 200 and long.headers["x-truncated-inputs"] == "1"
    np.testing.assert_allclose(
        long.json()["embeddings"], onnx_encoder.encode(["word " * 600, "short"]), atol=1e-6
    )


def test_info_models_health_and_metrics(server, minilm_onnx):
    info = httpx.get(f"{server.url}/info").json()
    assert info["width"] == 384 and info["backend"] == "onnx" and info["model_path"] is None
    assert (info["precision"], info["quantization"]) == ("fp32", None)
    assert info["strategy_resolved"] == "mean@last, normalized"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert minilm_onnx not in metrics
    assert re.search(r"^hiddenpool_collector_pause_seconds_count \d+$", metrics, re.MULTILINE)
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "minilm-onnx"
    assert httpx.get(f"{server.url}/health").status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert spec["openapi"].startswith("3.") and {
        "/v1/embeddings",
        "/embed",
        "/embed_tokens",
    } <= set(spec["paths"])


def test_64_concurrent_clients_get_their_own_rows_in_shared_batches(server, onnx_encoder):
    texts = corpus(600, seed=1)
    expected = onnx_encoder.encode(texts, "model")
    generator = random.Random(2)
    requests = []
    for _ in range(192):
        start = generator.randrange(len(texts))
        size = generator.randint(1, 8)
        requests.append([(start + offset) % len(texts) for offset in range(size)])
    before = server.metric("hiddenpool_forward_texts_total")

    async def drive() -> list[np.ndarray]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=300) as client:
            gate = asyncio.Semaphore(64)

            async def one(rows: list[int]) -> np.ndarray:
                async with gate:
                    response = await client.post(
                        "/v1/embeddings",
                        json={"model": server.model, "input": [texts[r] for r in rows]},
                    )
                assert response.status_code == 200, response.text
                return np.array([item["embedding"] for item in response.json()["data"]])

            return await asyncio.gather(*(one(rows) for rows in requests))

    results = asyncio.run(drive())
    for rows, got in zip(requests, results, strict=True):
        np.testing.assert_allclose(got, expected[rows], atol=1e-6)
    sent = sum(len(rows) for rows in requests)
    assert server.metric("hiddenpool_forward_texts_total") - before == sent
    # Some forward pass held more texts than any one request (8).
    text = httpx.get(f"{server.url}/metrics").text
    count = float(re.search(r"hiddenpool_batch_texts_count (\S+)", text).group(1))
    at_most_8 = float(re.search(r'hiddenpool_batch_texts_bucket\{le="8"\} (\S+)', text).group(1))
    assert at_most_8 < count


def test_a_client_that_leaves_while_queued_costs_no_forward_pass(server):
    big = corpus(2000, seed=3)
    before = server.metric("hiddenpool_forward_texts_total")
    cancelled_before = server.metric("hiddenpool_cancelled_texts_total")
    results: list[httpx.Response] = []
    first = threading.Thread(
        target=lambda: results.append(post(server, "/embed", {"inputs": big})), daemon=True
    )
    first.start()
    # Until the big request is in the worker (its first batch ran), however slow the machine.
    wait_for(lambda: server.metric("hiddenpool_forward_texts_total") > before)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/embed", json={"inputs": corpus(40, seed=4)}, timeout=1.0)
    first.join(300)
    assert results and results[0].status_code == 200
    wait_for(lambda: server.metric("hiddenpool_cancelled_texts_total") - cancelled_before == 40)
    assert server.metric("hiddenpool_forward_texts_total") - before == len(big)
    assert post(server, "/embed", {"inputs": "after"}).status_code == 200


def test_busy_server_answers_429_at_once_and_needs_the_key(minilm_onnx):
    running = Server(
        "--model", minilm_onnx, "--max-concurrent-requests", "2", "--api-key", "s3cret"
    )
    try:
        key = {"authorization": "Bearer s3cret"}
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": "bearer s3cret"},
            {"authorization": "Bearer  s3cret"},
            {"authorization": "s3cret"},
        ):
            for route, method in (
                ("/v1/embeddings", "post"),
                ("/info", "get"),
                ("/metrics", "get"),
            ):
                response = httpx.request(
                    method, f"{running.url}{route}", json={"input": "a"}, headers=headers
                )
                assert response.status_code == 401, (headers, route)
                assert "s3cret" not in response.text
        assert httpx.get(f"{running.url}/health").status_code == 200
        big = {"inputs": corpus(2000, seed=5)}
        slow = [
            threading.Thread(
                target=lambda: httpx.post(
                    f"{running.url}/embed", json=big, headers=key, timeout=300
                ),
                daemon=True,
            )
            for _ in range(2)
        ]
        for thread in slow:
            thread.start()
        # Both slow requests accepted, then one more is refused at once: while they are
        # still running, not after them (states, not wall-clock margins).
        wait_for(lambda: running.metric("hiddenpool_requests_in_flight", **key) == 2)
        busy = httpx.post(
            f"{running.url}/v1/embeddings", json={"model": running.model, "input": "a"}, headers=key
        )
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert running.metric("hiddenpool_requests_in_flight", **key) == 2  # still running
        assert busy.json() == {
            "error": {
                "message": "server busy: 2 requests in flight (--max-concurrent-requests); "
                "retry shortly",
                "type": "rate_limit_error",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
        assert busy.headers["content-type"] == "application/json"
        # While busy: the key is still checked first, the alias and hiddenpool's own routes
        # are refused alike, reads go on, and the 429s are counted under their route.
        wrong = {"authorization": "Bearer wrong"}
        assert (
            post(
                running, "/v1/embeddings", {"model": running.model, "input": "a"}, **wrong
            ).status_code
            == 401
        )
        assert post(running, "/embeddings", {"input": "a"}, **key).status_code == 429
        assert post(running, "/embed_tokens", {"inputs": "a"}, **key).status_code == 429
        assert httpx.get(f"{running.url}/health").status_code == 200
        counted = httpx.get(f"{running.url}/metrics", headers=key).text
        assert 'hiddenpool_requests_total{route="/v1/embeddings",status="429"} 2' in counted
        assert 'hiddenpool_requests_total{route="/embed_tokens",status="429"} 1' in counted
        for thread in slow:
            thread.join(300)
        ok = httpx.post(
            f"{running.url}/v1/embeddings", json={"model": running.model, "input": "a"}, headers=key
        )
        assert ok.status_code == 200
    finally:
        assert running.stop() == 0
    # Nor in the server's output (its banner, then anything after 401s, 429s, 200s and a
    # shutdown).
    logs = running.banner + running.process.stdout.read() + running.process.stderr.read()  # type: ignore[union-attr]
    assert "listening on http://127.0.0.1:" in logs and "s3cret" not in logs


def test_torch_backend_equals_the_encoder(minilm_path, minilm):
    openai = pytest.importorskip("openai")
    running = Server("--model", minilm_path, "--backend", "torch", "--strategy", "cls@last")
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused")
        response = client.embeddings.create(model="model", input=TEXTS)
        got = np.array([item.embedding for item in response.data], dtype=np.float32)
        np.testing.assert_allclose(got, minilm.encode(TEXTS, "cls@last"), atol=1e-6)
        # --strategy is every route's default, late chunking's too.
        text = " ".join(TEXTS)
        chunks = httpx.post(
            f"{running.url}/embed_chunks", json={"input": text, "chunk_tokens": 6}, timeout=60
        ).json()
        assert chunks["strategy"] == "cls@last"
        np.testing.assert_allclose(
            [item["embedding"] for item in chunks["data"]],
            minilm.encode_chunks(text, chunk_tokens=6, strategy="cls@last"),
            atol=1e-5,
        )
        embed = httpx.post(
            f"{running.url}/embed",
            json={"inputs": TEXTS, "strategy": ["cls@last", "mean@first_last:mean"]},
            timeout=60,
        ).json()["embeddings"]
        expected = minilm.encode(TEXTS, ["cls@last", "mean@first_last:mean"])
        for name, rows in expected.items():
            np.testing.assert_allclose(embed[name], rows, atol=1e-5)
    finally:
        assert running.stop() == 0


def test_serve_bad_options_are_one_line(tmp_path, run_cli_process):
    for arguments, message in (
        (["--model", str(tmp_path / "none")], "no such folder"),
        (["--strategy", "median@last"], "unknown pool"),
        (["--port", "70000"], "--port 70000"),
        (["--request-timeout", "0"], "--request-timeout"),
    ):
        result = run_cli_process("serve", *arguments)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def run_cli_process():
    from cli_runner import run_cli

    return run_cli
