"""deploy/kubernetes checked on paper (no cluster is reachable here): every Kubernetes
object against the Kubernetes schemas (kubernetes-validate, strict: unknown fields are
errors), the RayService's pod templates likewise and its serveConfigV2 against Ray Serve's
own config schema and against what ``serve --ray --print-config`` prints; and the figures
the manifests promise (drain within the grace period, threads from the CPU limit, probes
on /health, the HPA and Service pointing at the Deployment)."""

from __future__ import annotations

import os

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from cli_runner import run_cli  # noqa: E402

FOLDER = os.path.join(os.path.dirname(__file__), "..", "deploy", "kubernetes")
VERSION = "1.33.0"  # the oldest Kubernetes still supported upstream when this was written


def documents(name: str) -> list[dict]:
    with open(os.path.join(FOLDER, name), encoding="utf-8") as handle:
        return [document for document in yaml.safe_load_all(handle) if document]


def kubernetes_objects() -> list[tuple[str, dict]]:
    return [
        (name, document)
        for name in ("deployment.yaml", "service.yaml", "hpa.yaml")
        for document in documents(name)
    ]


@pytest.mark.parametrize(("name", "document"), kubernetes_objects(), ids=lambda v: str(v)[:20])
def test_objects_are_valid_against_the_kubernetes_schemas(name, document):
    kubernetes_validate.validate(document, VERSION, strict=True)


def test_a_broken_object_is_refused():
    """The validator is not a no-op: a misspelt field and a wrong type both fail."""
    (deployment,) = documents("deployment.yaml")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)
    (deployment,) = documents("deployment.yaml")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def flag(arguments: list[str], name: str) -> str:
    return arguments[arguments.index(name) + 1]


def test_the_deployment_drains_within_its_grace_period_and_probes_health():
    (deployment,) = documents("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment)
    shutdown = float(flag(server["args"], "--shutdown-timeout"))
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"
    liveness = server["livenessProbe"]
    # A minute of no answer restarts a pod; a batch never takes that long.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60
    threads = {item["name"]: item for item in server["env"]}["HIDDENPOOL_NUM_THREADS"]
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    limits, requests = server["resources"]["limits"], server["resources"]["requests"]
    assert limits["cpu"] == requests["cpu"]  # threads = cores the pod is guaranteed
    assert requests["memory"] == "512Mi" and limits["memory"] == "1Gi"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(server["ports"][0]["containerPort"])
    assert flag(server["args"], "--port") == annotations["prometheus.io/port"]


def test_the_service_and_autoscaler_point_at_the_deployment():
    (deployment,) = documents("deployment.yaml")
    (service,) = documents("service.yaml")
    (autoscaler,) = documents("hpa.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = autoscaler["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == "hiddenpool_requests_in_flight"
    from hiddenpool.server import ray_serve

    assert float(metric["target"]["averageValue"]) == ray_serve.TARGET_ONGOING


def test_the_scrape_job_keys_on_the_deployment_annotations():
    (config,) = documents("prometheus-scrape.yaml")
    (job,) = config["scrape_configs"]
    sources = [rule["source_labels"][0] for rule in job["relabel_configs"]]
    assert "__meta_kubernetes_pod_annotation_prometheus_io_scrape" in sources
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]


def test_the_rayservice_pods_are_valid_and_its_serve_config_is_ray_serves():
    from ray.serve.schema import ServeDeploySchema

    (service,) = documents("rayservice.yaml")
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}}
        template["template"] = group["template"]
        kubernetes_validate.validate(template, VERSION, strict=True)
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    printed = run_cli(
        "serve", "--ray", "--model", "/models/all-minilm-l6-v2-onnx",
        "--served-model-name", "all-MiniLM-L6-v2", "--max-concurrent-requests", "64",
        "--min-replicas", "1", "--max-replicas", "8", "--cpus-per-replica", "2",
        "--host", "0.0.0.0", "--port", "8000", "--print-config", "-",
    )  # fmt: skip
    # The model folder exists only in the pods: named as given, said on stderr.
    assert printed.returncode == 0 and "is not here" in printed.stderr
    assert yaml.safe_load(printed.stdout) == config
    from hiddenpool.server import ray_serve

    expected = ray_serve.config_document(
        ray_serve.ReplicaOptions(
            model="/models/all-minilm-l6-v2-onnx",
            served_model_name="all-MiniLM-L6-v2",
            max_concurrent_requests=64,
            threads=2,
        ),
        ray_serve.Scaling(min_replicas=1, max_replicas=8, cpus_per_replica=2.0),
        host="0.0.0.0",
        port=8000,
    )
    assert config == expected
    worker = cluster["workerGroupSpecs"][0]
    (deployment,) = config["applications"][0]["deployments"]
    cpus = deployment["ray_actor_options"]["num_cpus"]
    assert float(worker["rayStartParams"]["num-cpus"]) >= cpus
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["cpu"]) >= cpus
