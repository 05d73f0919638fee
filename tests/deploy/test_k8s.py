"""The Kubernetes manifests, read as YAML: no cluster here, so only their content is checked."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from app.metrics import create_metrics
from app.serve import CLOSE_TIMEOUT_S

from .support import REPO

pytestmark = pytest.mark.deploy

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"  # the oldest minor version the manifests are checked against


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def app_container() -> dict:
    (container,) = load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    return container


def test_one_gpu_per_pod() -> None:
    resources = app_container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1


def test_probes_ask_readyz_and_healthz_on_the_served_port() -> None:
    container = app_container()
    (port,) = container["ports"]
    assert port["containerPort"] == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]


def test_pods_outlive_the_longest_request_and_their_drain_when_stopped() -> None:
    spec = load("deployment.yaml")["spec"]["template"]["spec"]
    container = app_container()
    env = {e["name"]: e["value"] for e in container["env"]}
    assert spec["terminationGracePeriodSeconds"] > float(env["CFG_REQUEST_TIMEOUT_S"])
    # preStop's pause, then the drain (app/serve.py): up to CFG_DRAIN_TIMEOUT_S, then CLOSE_TIMEOUT_S.
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pause + float(env["CFG_DRAIN_TIMEOUT_S"]) + CLOSE_TIMEOUT_S
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_the_startup_probe_waits_for_readyz_through_a_long_warmup() -> None:
    """The port opens at once and /healthz answers from the start: only /readyz says the startup is done.
    Ten minutes cover int8's calibration and compiling before the liveness probe takes over."""
    probe = app_container()["startupProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


def test_service_and_autoscaler_point_at_the_deployment() -> None:
    deployment, service, hpa = load("deployment.yaml"), load("service.yaml"), load("hpa.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == app_container()["ports"][0]["name"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_autoscaler_metrics_are_series_the_app_exports() -> None:
    metrics = create_metrics()
    metrics.add_model("a-model")  # the series of a served model
    metrics.job_backlog.labels(state="waiting")  # set by the lifespan
    exported = [(s.name, s.labels) for family in metrics.registry.collect() for s in family.samples]
    for metric in load("hpa.yaml")["spec"]["metrics"]:
        wanted = metric[metric["type"].lower()]["metric"]
        labels = wanted.get("selector", {}).get("matchLabels", {})
        assert any(name == wanted["name"] and labels.items() <= have.items() for name, have in exported), wanted


def test_the_autoscaler_scales_on_the_shared_backlog_not_taken_yet() -> None:
    (backlog,) = [m for m in load("hpa.yaml")["spec"]["metrics"] if m["type"] == "External"]
    assert backlog["external"]["metric"]["name"] == "cfg_job_backlog"
    assert backlog["external"]["metric"]["selector"]["matchLabels"] == {"state": "waiting"}


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load("kustomization.yaml")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(name: str) -> None:
    """kubernetes-validate (PyPI) bundles the API's schemas: strict, so an unknown or misplaced field fails."""
    for document in documents(name):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_replicas_share_the_redis_job_store_which_keeps_its_file_on_a_volume() -> None:
    env = {e["name"]: e.get("value") for e in app_container()["env"]}
    service, statefulset = documents("redis.yaml")
    port = service["spec"]["ports"][0]["port"]
    assert env["CFG_JOB_STORE"] == f"redis://{service['metadata']['name']}:{port}/0"
    assert service["spec"]["type"] == "ClusterIP"  # the cluster only
    pod = statefulset["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["args"][container["args"].index("--appendonly") + 1] == "yes"
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/data"
    assert [t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]] == [mount["name"]]
