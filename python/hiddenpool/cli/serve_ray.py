"""``hiddenpool serve --ray``: the server as Ray Serve replicas (``hiddenpool.server.
ray_serve``) behind Ray Serve's proxy, on a cluster (``--address``) or a local Ray instance
started and stopped here; ``--print-config`` writes the same deployment as a Ray Serve
config file (``serve deploy``, KubeRay's RayService) instead."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from hiddenpool.cli import checks
from hiddenpool.cli.checks import UsageError


def add_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("Ray Serve (--ray): replicas across a Ray cluster")
    group.add_argument(
        "--ray",
        action="store_true",
        help="serve as Ray Serve replicas behind its proxy (each replica this server, with "
        "its own batcher); without --address a local Ray instance is started and stopped",
    )
    group.add_argument("--address", help="the Ray cluster (HOST:PORT or ray://HOST:PORT)")
    group.add_argument("--replicas", type=int, help="a fixed number of replicas (default 1)")
    group.add_argument(
        "--min-replicas", type=int, help="autoscale on requests in flight from this many"
    )
    group.add_argument("--max-replicas", type=int, help="... up to this many replicas")
    group.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        help="CPUs Ray reserves for each replica, and its threads (default 1)",
    )
    group.add_argument(
        "--target-ongoing-requests",
        type=float,
        help="autoscaling: requests in flight per replica to aim for (default 16)",
    )
    group.add_argument(
        "--print-config",
        metavar="FILE",
        help="write the deployment as a Ray Serve config file (YAML; - for stdout) and exit",
    )


RAY_FLAGS = (
    "address",
    "replicas",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "print_config",
)


def check_flags(options: Any) -> None:
    """Ray-only flags without --ray, and what Ray Serve cannot do."""
    if not options.ray:
        given = [name for name in RAY_FLAGS if getattr(options, name) is not None]
        if options.cpus_per_replica != 1.0:
            given.append("cpus_per_replica")
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag}: applies to --ray")
        return
    if options.port == 0:
        raise UsageError("--port 0: Ray Serve's proxy needs a fixed port with --ray")
    if options.device not in (None, "cpu"):
        raise UsageError("--device: replicas run on the CPU with --ray")
    if options.address is not None and options.print_config is not None:
        raise UsageError("--print-config: writes a file for `serve deploy`; leave out --address")


def require_ray_serve() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as error:
        raise UsageError(
            f"--ray needs Ray Serve ({error.name} is missing): pip install "
            '"hiddenpool[ray-serve]" (".[ray-serve]" in a hiddenpool checkout)'
        ) from None


def _specs(options: Any, model: str | None, strategy: str) -> tuple[Any, Any]:
    from hiddenpool.server import ray_serve

    replica = ray_serve.ReplicaOptions(
        model=model,
        strategy=strategy,
        backend=options.backend,
        precision=options.precision,
        max_length=options.max_length,
        served_model_name=options.served_model_name,
        max_batch_tokens=options.max_batch_tokens,
        max_concurrent_requests=options.max_concurrent_requests,
        max_client_batch_size=options.max_client_batch_size,
        payload_limit=options.payload_limit,
        request_timeout=options.request_timeout,
        read_timeout=options.read_timeout,
        shutdown_timeout=options.shutdown_timeout,
        threads=max(1, int(options.cpus_per_replica)),
        expose_paths=options.expose_paths,
    )
    scaling = ray_serve.Scaling(
        replicas=options.replicas,
        min_replicas=options.min_replicas,
        max_replicas=options.max_replicas,
        cpus_per_replica=options.cpus_per_replica,
        target_ongoing_requests=options.target_ongoing_requests or ray_serve.TARGET_ONGOING,
    )
    try:
        ray_serve.check(replica, scaling)
    except (TypeError, ValueError) as error:
        field, _, message = str(error).partition(": ")
        flag = "--" + field.split(",")[0].strip().replace("_", "-")
        raise UsageError(f"{flag}: {message}") from None
    return replica, scaling


def serve_ray(options: Any, strategy: str) -> int:
    if options.address is not None:
        from hiddenpool.cli.encode_ray import _check_address

        _check_address(options.address)
    if options.print_config is not None and options.model and not os.path.exists(options.model):
        # A config for other machines (pods, a cluster's nodes) names their path as given.
        print(
            f"hiddenpool: --model {options.model} is not here; the config names it as given "
            "for the machines that run it",
            file=sys.stderr,
        )
        model_path: str | None = options.model
    else:
        model = checks.preflight(options, [strategy])
        # Replicas load the folder by path: absolute, so they find it wherever they start.
        model_path = (
            os.path.abspath(model) if options.model and os.path.isdir(model) else options.model
        )
    replica, scaling = _specs(options, model_path, strategy)
    if options.print_config is not None:
        return _print_config(options, replica, scaling)
    return _run(options, replica, scaling)


def _print_config(options: Any, replica: Any, scaling: Any) -> int:
    from hiddenpool.server import ray_serve

    document = ray_serve.config_document(replica, scaling, host=options.host, port=options.port)
    try:
        import yaml

        text = yaml.safe_dump(document, sort_keys=False)
    except ImportError:
        text = json.dumps(document, indent=2) + "\n"  # JSON is YAML too
    if options.print_config == "-":
        sys.stdout.write(text)
        return 0
    checks.check_output("--print-config", options.print_config, (".yaml", ".yml", ".json"))
    from hiddenpool.io import corpus

    with (
        corpus.atomic_path(options.print_config) as temporary,
        open(temporary, "w", encoding="utf-8") as handle,
    ):
        handle.write(text)
    print(f"wrote {options.print_config} (deploy it with: serve deploy {options.print_config})")
    return 0


def _run(options: Any, replica: Any, scaling: Any) -> int:
    import ray
    from ray import serve

    from hiddenpool.server import ray_serve

    api_key = options.api_key or os.environ.get(ray_serve.API_KEY_VARIABLE) or None
    started_here = not ray.is_initialized() and options.address is None
    init: dict[str, Any] = {"num_cpus": os.cpu_count()} if started_here else {}
    ray.init(
        # "local": a new instance even where `ray start` left one running on this machine.
        address=options.address or "local",
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
        **init,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        fields = {f.name: getattr(replica, f.name) for f in dataclasses.fields(replica)}
        model = fields.pop("model")
        application = ray_serve.serve_app(
            model,
            replicas=scaling.replicas,
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            cpus_per_replica=scaling.cpus_per_replica,
            target_ongoing_requests=scaling.target_ongoing_requests,
            api_key=api_key,
            **fields,
        )
        serve.run(application, name=ray_serve.APPLICATION, route_prefix="/", blocking=False)
        shown = f"[{options.host}]" if ":" in options.host else options.host
        if scaling.min_replicas is None and scaling.max_replicas is None:
            fixed = scaling.replicas or 1
            count = f"{fixed} replica{'s' if fixed > 1 else ''}"
        else:
            low = scaling.min_replicas if scaling.min_replicas is not None else 1
            high = scaling.max_replicas if scaling.max_replicas is not None else max(low, 1)
            count = f"{low}-{high} replicas (autoscaling)"
        print(
            f"hiddenpool serve --ray: {count} of {model or checks.DEFAULT_MODEL_NAME}, strategy "
            f"{replica.strategy}; listening on http://{shown}:{options.port}",
            flush=True,
        )
        stop.wait()
        print("hiddenpool serve --ray: stopping (replicas finish their requests)", flush=True)
        serve.delete(ray_serve.APPLICATION)
    finally:
        if started_here:
            ray_serve.shutdown_local()
    return 0
