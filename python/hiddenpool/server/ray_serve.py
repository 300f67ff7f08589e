"""``hiddenpool serve`` on Ray Serve: replicas across a Ray cluster, each running the server
this package has (routes, limits, API key, metrics, drain) with its own runner and
cross-request batcher, behind Ray Serve's HTTP proxy.

Routing keeps batching: the proxy spreads requests over the replicas and each replica's own
queue batches what reaches it. ``max_ongoing_requests`` is the replica's
``max_concurrent_requests``, so the proxy skips a full replica instead of queueing on it;
when every replica is full, up to ``max_queued_requests`` wait in the proxy and the rest get
429 with Retry-After, as one server answers when full.

Autoscaling follows load (ongoing requests per replica), not CPU: see ``TARGET_ONGOING``.
Scale-down drains: Ray Serve stops routing to the leaving replica and waits up to
``graceful_shutdown_timeout_s`` (the ``shutdown_timeout``) for its accepted requests.
Health: ``check_health`` fails when the replica's worker thread died or its forward passes
keep failing; Ray Serve then replaces the replica. ``/metrics`` through the proxy shows
every live replica's metrics, named as one server names them, labelled ``replica``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Literal, cast

import ray
from ray import serve

from hiddenpool.runners.tokens import DEFAULT_MAX_BATCH_TOKENS
from hiddenpool.server.metrics import labelled, merge

DEPLOYMENT = "HiddenpoolReplica"
APPLICATION = "hiddenpool"
API_KEY_VARIABLE = "HIDDENPOOL_API_KEY"
# Autoscaling target, in requests in flight per replica. One replica of the batcher reaches
# its throughput once enough requests are queued to fill batches: on 2 cores (BENCHMARKS.md
# "Serving") one-text requests gave 198/s at 1 client, 262 at 4, 274 at 16, 353 at 64, and
# 16-text requests 339, 419 and 443 at 1, 4 and 16: 16 in flight is within 80% of the peak
# for one-text requests and at it for batched ones, while p50 stays near 60 ms; more only
# adds queueing delay. So a replica is added when the mean passes 16 and removed below it.
TARGET_ONGOING = 16
# Add replicas quickly (a burst queues at once), remove them slowly (a replica costs a model
# load to bring back: 1-3 s for all-MiniLM-L6-v2, tens of seconds for large models).
UPSCALE_DELAY_S = 10.0
DOWNSCALE_DELAY_S = 120.0
# The window the ongoing-requests mean is taken over: Ray's default (30 s). It must exceed
# the interval at which replicas report their load (10 s by default; set by
# $RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S on the cluster, which the tests lower
# with their shorter windows).
LOOK_BACK_PERIOD_S = 30.0
# Requests waiting in the proxy for a free replica when every replica is full; more get 429.
MAX_QUEUED_REQUESTS = 1024
# Forward passes failing in a row before the replica reports itself unhealthy.
UNHEALTHY_FAILURES = 3
HEALTH_CHECK_PERIOD_S = 2.0
METRICS_PUSH_S = 1.0  # a replica's metrics reach the others' /metrics within this


@dataclasses.dataclass(frozen=True)
class ReplicaOptions:
    """What every replica loads and serves with (plain values: they travel in a Serve
    config file's ``args``)."""

    model: str | None = None
    strategy: str = "model"
    backend: Literal["auto", "torch", "onnx", "openvino"] = "auto"
    precision: Literal["fp32", "bf16", "int8"] | None = None
    max_length: int | None = None
    served_model_name: str | None = None
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 2048
    payload_limit: int = 2_000_000
    request_timeout: float = 60.0
    read_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    threads: int = 1
    expose_paths: bool = False


@dataclasses.dataclass(frozen=True)
class Scaling:
    """How many replicas and what each gets: a fixed ``replicas`` count, or autoscaling
    between ``min_replicas`` and ``max_replicas`` on ``target_ongoing_requests``."""

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    target_ongoing_requests: float = TARGET_ONGOING
    upscale_delay_s: float = UPSCALE_DELAY_S
    downscale_delay_s: float = DOWNSCALE_DELAY_S
    max_queued_requests: int = MAX_QUEUED_REQUESTS
    look_back_period_s: float = LOOK_BACK_PERIOD_S


def check(options: ReplicaOptions, scaling: Scaling) -> None:
    """ValueErrors naming the argument, before Ray is touched."""
    if scaling.replicas is not None and (
        scaling.min_replicas is not None or scaling.max_replicas is not None
    ):
        raise ValueError("replicas: a fixed count, or min_replicas and max_replicas; not both")
    for name in ("replicas", "min_replicas", "max_replicas"):
        value = getattr(scaling, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name}: expected a whole number, got {value!r}")
    if scaling.replicas is not None and scaling.replicas < 1:
        raise ValueError(f"replicas: expected 1 or more, got {scaling.replicas}")
    low = scaling.min_replicas if scaling.min_replicas is not None else 1
    high = scaling.max_replicas if scaling.max_replicas is not None else max(low, 1)
    if low < 0 or high < 1 or low > high:
        raise ValueError(
            f"min_replicas, max_replicas: expected 0 <= min <= max and max >= 1, got {low}, {high}"
        )
    if not scaling.cpus_per_replica > 0:
        raise ValueError(
            f"cpus_per_replica: expected a positive number, got {scaling.cpus_per_replica}"
        )
    for name in (
        "target_ongoing_requests",
        "upscale_delay_s",
        "downscale_delay_s",
        "look_back_period_s",
    ):
        if not getattr(scaling, name) > 0:
            raise ValueError(f"{name}: expected a positive number, got {getattr(scaling, name)}")
    if options.threads < 1:
        raise ValueError(f"threads: expected 1 or more, got {options.threads}")


def deployment_options(options: ReplicaOptions, scaling: Scaling) -> dict[str, Any]:
    """The deployment's Ray Serve options (``.options(**...)``, or a config file's
    ``deployments`` entry)."""
    document: dict[str, Any] = {
        "max_ongoing_requests": options.max_concurrent_requests,
        "max_queued_requests": scaling.max_queued_requests,
        # Every replica full and the proxy's queue too: 429 and Retry-After, as one server.
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "ray_actor_options": {"num_cpus": scaling.cpus_per_replica},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": 30.0,
        # Scale-down and redeploys drain as SIGTERM does: accepted requests finish.
        "graceful_shutdown_timeout_s": options.shutdown_timeout,
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if scaling.replicas is not None or (
        scaling.min_replicas is None and scaling.max_replicas is None
    ):
        document["num_replicas"] = scaling.replicas or 1  # neither given: one replica
    else:
        low = scaling.min_replicas if scaling.min_replicas is not None else 1
        high = scaling.max_replicas if scaling.max_replicas is not None else max(low, 1)
        document["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
        }
    return document


def serve_app(
    model: str | os.PathLike[str] | None = None,
    *,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    cpus_per_replica: float = 1.0,
    target_ongoing_requests: float = TARGET_ONGOING,
    upscale_delay_s: float = UPSCALE_DELAY_S,
    downscale_delay_s: float = DOWNSCALE_DELAY_S,
    max_queued_requests: int = MAX_QUEUED_REQUESTS,
    look_back_period_s: float = LOOK_BACK_PERIOD_S,
    api_key: str | None = None,
    **replica: Any,
) -> Any:
    """A Ray Serve application of ``hiddenpool serve`` replicas, for ``serve.run``:
    ``replicas`` fixed, or autoscaling from ``min_replicas`` to ``max_replicas`` (default:
    one replica). Each replica gets ``cpus_per_replica`` CPUs and as many threads (so
    replicas do not oversubscribe cores) and takes the keyword arguments of ``hiddenpool
    serve`` (``strategy``, ``backend``, ``precision``, ``max_concurrent_requests``,
    ``request_timeout``, ``shutdown_timeout``, ...; ``ReplicaOptions``). ``api_key``
    (default ``$HIDDENPOOL_API_KEY`` in the replicas' environment) reaches the replicas
    through their runtime environment.

    >>> from ray import serve  # doctest: +SKIP
    >>> from hiddenpool.ray import serve_app  # doctest: +SKIP
    >>> serve.run(serve_app("minilm-onnx", replicas=2), route_prefix="/")  # doctest: +SKIP
    """
    scaling = Scaling(
        replicas, min_replicas, max_replicas, float(cpus_per_replica), target_ongoing_requests,
        upscale_delay_s, downscale_delay_s, max_queued_requests, look_back_period_s,
    )  # fmt: skip
    if "threads" not in replica:
        replica["threads"] = max(1, int(cpus_per_replica))
    unknown = set(replica) - {field.name for field in dataclasses.fields(ReplicaOptions)}
    if unknown:
        raise TypeError(f"serve_app: unknown argument {sorted(unknown)[0]!r}")
    options = ReplicaOptions(model=None if model is None else os.fspath(model), **replica)
    check(options, scaling)
    settings = deployment_options(options, scaling)
    if api_key is not None:
        settings["ray_actor_options"]["runtime_env"] = {"env_vars": {API_KEY_VARIABLE: api_key}}
    deployment: Any = HiddenpoolReplica
    return deployment.options(**settings).bind(dataclasses.asdict(options))


def build(args: dict[str, Any]) -> Any:
    """The application from a Serve config file's ``args`` (``import_path:
    hiddenpool.server.ray_serve:build``): ``serve_app(**args)``."""
    return serve_app(**args)


def config_document(
    options: ReplicaOptions, scaling: Scaling, *, host: str = "0.0.0.0", port: int = 8000
) -> dict[str, Any]:
    """The Ray Serve config file equivalent to ``serve_app`` with these options, for
    ``serve deploy`` and KubeRay's RayService (``serveConfigV2``). The API key is never
    written: set ``$HIDDENPOOL_API_KEY`` in the replicas' environment."""
    args = {k: v for k, v in dataclasses.asdict(options).items() if v != _DEFAULTS.get(k)}
    args.update({k: v for k, v in dataclasses.asdict(scaling).items() if v != _SCALING[k]})
    deployment = {"name": DEPLOYMENT, **deployment_options(options, scaling)}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": APPLICATION,
                "route_prefix": "/",
                "import_path": "hiddenpool.server.ray_serve:build",
                "args": args,
                "deployments": [deployment],
            }
        ],
    }


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(ReplicaOptions)}
_SCALING = {field.name: field.default for field in dataclasses.fields(Scaling)}


@ray.remote(num_cpus=0)
class MetricsBoard:
    """Every replica's latest metrics text, so any replica's ``/metrics`` shows them all
    (one per application, named ``hiddenpool-metrics-<application>``)."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def drop(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def all(self, max_age: float) -> list[str]:
        now = time.monotonic()
        self.texts = {k: v for k, v in self.texts.items() if now - v[0] <= max_age}
        return [text for _, (_, text) in sorted(self.texts.items())]


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class HiddenpoolReplica:
    """One replica: the model loaded, the server's app built around it (its lifespan, run
    by Ray Serve, starts the worker and warms up)."""

    def __init__(self, options: dict[str, Any]) -> None:
        from hiddenpool.encoder import Encoder, default_model_path, runs_on_onnx
        from hiddenpool.integrations.ray import limit_threads
        from hiddenpool.server.app import create_app
        from hiddenpool.server.service import ServerSettings

        spec = ReplicaOptions(**options)
        limit_threads(spec.threads)
        path = spec.model or default_model_path()
        encoder = Encoder.from_pretrained(
            path,
            backend=spec.backend,
            precision=spec.precision,
            max_length=spec.max_length,
            # Replicas serve on the CPUs Ray gave them.
            **cast(Any, {} if runs_on_onnx(path, spec.backend) else {"device": "cpu"}),
        )
        name = spec.served_model_name or (
            os.path.basename(os.path.normpath(path)) if spec.model else "all-MiniLM-L6-v2"
        )
        settings = ServerSettings(
            model_path=path,
            served_model_name=name,
            strategy=spec.strategy,
            max_batch_tokens=spec.max_batch_tokens,
            max_concurrent_requests=spec.max_concurrent_requests,
            max_client_batch_size=spec.max_client_batch_size,
            payload_limit=spec.payload_limit,
            api_key=os.environ.get(API_KEY_VARIABLE) or None,
            request_timeout=spec.request_timeout,
            read_timeout=spec.read_timeout,
            expose_paths=spec.expose_paths,
        )
        self._app = create_app(encoder, settings)
        self._service = self._app.state.service
        context = serve.get_replica_context()
        self._replica = str(context.replica_id.unique_id)
        self._board = MetricsBoard.options(  # type: ignore[attr-defined]
            name=f"hiddenpool-metrics-{context.app_name}",
            namespace="serve",
            get_if_exists=True,
            lifetime="detached",
        ).remote()
        self._service.metrics_view = self._metrics_view
        self._pushing = threading.Thread(target=self._push, name="hiddenpool-metrics", daemon=True)
        self._pushing.start()

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def check_health(self) -> None:
        """Raises (Ray Serve then replaces the replica) when the worker thread died or the
        last forward passes all failed."""
        batcher = self._service.batcher
        if not batcher.alive:
            raise RuntimeError("hiddenpool replica: the model worker thread stopped")
        if batcher.failures_in_a_row >= UNHEALTHY_FAILURES:
            raise RuntimeError(
                f"hiddenpool replica: the last {batcher.failures_in_a_row} forward passes failed"
            )

    def _own_metrics(self) -> str:
        metrics = self._service.metrics
        metrics.queue_texts.set(self._service.batcher.queued_texts())
        metrics.requests_in_flight.set(self._service.in_flight)
        return labelled(metrics.render(), "replica", self._replica)

    def _push(self) -> None:
        while True:
            time.sleep(METRICS_PUSH_S)
            try:
                self._board.put.remote(self._replica, self._own_metrics())
            except Exception:
                continue

    async def _metrics_view(self, own: str) -> str:
        mine = labelled(own, "replica", self._replica)
        await self._board.put.remote(self._replica, mine)
        texts = await self._board.all.remote(5 * METRICS_PUSH_S)
        return merge(texts)


def shutdown_local() -> None:
    """Serve and Ray stopped (the local instance ``serve --ray`` started)."""
    try:
        serve.shutdown()  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
