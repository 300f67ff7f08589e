"""``hiddenpool serve``: the embedding server (``hiddenpool.server``) on uvicorn, one
process, one model. Every option is checked and the model loaded before the port is
bound; the server warms up, then prints the address it listens on."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from hiddenpool.cli import checks, serve_ray
from hiddenpool.cli.checks import ModelOptions, UsageError

API_KEY_VARIABLE = "HIDDENPOOL_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeOptions(ModelOptions):
    host: str = "127.0.0.1"
    port: int = 8000
    strategy: str | None = None
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 2048
    payload_limit: int = 2_000_000
    api_key: str | None = None
    served_model_name: str | None = None
    request_timeout: float = 60.0
    read_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    expose_paths: bool = False
    ray: bool = False
    address: str | None = None
    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    target_ongoing_requests: float | None = None
    print_config: str | None = None


def add_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    serve.add_argument(
        "--strategy",
        help="the default strategy of every route (default: model, the model's own pipeline)",
    )
    serve.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=512,
        help="requests in flight at once; more get 429 at once",
    )
    serve.add_argument(
        "--max-client-batch-size",
        type=int,
        default=2048,
        help="inputs one request may hold; more get 413",
    )
    serve.add_argument(
        "--payload-limit", type=int, default=2_000_000, help="largest request body in bytes (413)"
    )
    serve.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every route but /health "
        f"(default: ${API_KEY_VARIABLE} when set)",
    )
    serve.add_argument(
        "--served-model-name", help="the model name clients send (default: the folder's name)"
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        help="seconds a request may take end to end; then 504 and its texts are dropped",
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send its whole body; slower clients get 408",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds given to requests in flight after SIGTERM or SIGINT",
    )
    serve.add_argument(
        "--expose-paths", action="store_true", help="/info shows the model's folder path"
    )
    serve_ray.add_arguments(serve)


def run(arguments: argparse.Namespace) -> int:
    return serve(ServeOptions.from_arguments(arguments))


def serve(options: ServeOptions) -> int:
    if options.ray:
        serve_ray.require_ray_serve()
    settings_module = _require_server()
    _check(options)
    serve_ray.check_flags(options)
    strategy = options.strategy or "model"
    checks.check_strategies([strategy])
    checks.check_layer_weights(options, [strategy])
    if options.ray:
        return serve_ray.serve_ray(options, strategy)
    model = checks.preflight(options, [strategy])
    sock = _bind(options.host, options.port)
    encoder, model_name = checks.load_encoder(options, model)
    checks.check_against_model(encoder, options, [strategy])
    name = options.served_model_name or (
        os.path.basename(os.path.normpath(options.model)) if options.model else "all-MiniLM-L6-v2"
    )
    host, port = sock.getsockname()[:2]
    settings = settings_module.ServerSettings(
        model_path=model,
        served_model_name=name,
        strategy=strategy,
        max_batch_tokens=options.max_batch_tokens,
        max_concurrent_requests=options.max_concurrent_requests,
        max_client_batch_size=options.max_client_batch_size,
        payload_limit=options.payload_limit,
        api_key=options.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        request_timeout=options.request_timeout,
        read_timeout=options.read_timeout,
        expose_paths=options.expose_paths,
    )
    shown = f"[{host}]" if ":" in host else host
    announce = (
        f"hiddenpool serve: {model_name} as {name!r}, strategy {strategy}; "
        f"listening on http://{shown}:{port}"
    )
    _run(encoder, settings, sock, announce, options.shutdown_timeout)
    return 0


def _require_server() -> Any:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UsageError(
            f"serve needs the server packages ({error.name} is missing): "
            'pip install ".[serve]" in a hiddenpool checkout'
        ) from None
    from hiddenpool.server import app

    return app


def _check(options: ServeOptions) -> None:
    if not 0 <= options.port <= 65535:
        raise UsageError(f"--port {options.port}: expected 0 to 65535")
    for flag, value in (
        ("--request-timeout", options.request_timeout),
        ("--read-timeout", options.read_timeout),
        ("--shutdown-timeout", options.shutdown_timeout),
    ):
        if not value > 0:
            raise UsageError(f"{flag} {value}: expected a positive number of seconds")
    if options.api_key is not None and (
        not options.api_key or options.api_key != options.api_key.strip()
    ):
        raise UsageError("--api-key: empty or with spaces around it; give the key itself")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a port in use is reported at
    once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UsageError(f"--host {host}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise UsageError(
            f"--port {port}: cannot listen on {host}:{port} ({error.strerror})"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run(
    encoder: Any, settings: Any, sock: socket.socket, announce: str, shutdown_timeout: float
) -> None:
    import uvicorn

    from hiddenpool.server.app import create_app

    app = create_app(encoder, settings, announce=announce)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=max(1, round(shutdown_timeout)),
        timeout_keep_alive=5,
        lifespan="on",
    )
    server = _server(config, app)
    server.run(sockets=[sock])


def _server(config: Any, app: Any) -> Any:
    """uvicorn's Server with draining: the first SIGTERM/SIGINT turns /health to 503 and
    lets requests in flight finish (up to --shutdown-timeout), then the process exits 0
    (uvicorn would re-raise the signal after a graceful stop); a second signal exits at
    once with status 1."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            service = app.state.service
            if service.draining:
                print("hiddenpool serve: second signal, exiting now", file=sys.stderr)
                os._exit(1)
            service.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)
