"""The compose files, validated by the real docker-compose, and docs/deployment.md's account of them.

No Docker engine here: `docker-compose config` checks and resolves the files, nothing is started.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from app.serve import CLOSE_TIMEOUT_S

from .support import REPO, compose_config

pytestmark = pytest.mark.deploy

SERVICES = {"app", "gateway", "redis", "prometheus", "grafana"}


def published_ports(service: dict) -> list[str]:
    """Published ports as `[host_ip:]published`, from either of the forms compose prints."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            host_ip = port.get("host_ip")
            ports.append(f"{host_ip}:{port['published']}" if host_ip else str(port["published"]))
        else:
            parts = str(port).split("/")[0].split(":")
            ports.append(":".join(parts[:-1]))
    return ports


def volumes(service: dict) -> list[tuple[str, str]]:
    """(source, target) pairs; bind sources relative to the repository, as `./path`."""
    pairs = []
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("/"):
            source = "./" + str(Path(source).relative_to(REPO))
        pairs.append((source, target))
    return pairs


def comparable(service: dict) -> dict:
    """The service with its volumes in a fixed order: `extends` may reorder them."""
    return {**service, "volumes": sorted(service.get("volumes", []))}


def deployment_section() -> str:
    page = (REPO / "docs" / "deployment.md").read_text()
    match = re.search(r"<!-- deployment:start -->(.*?)<!-- deployment:end -->", page, re.S)
    assert match, "docs/deployment.md has no <!-- deployment:start --> ... <!-- deployment:end --> section"
    return match.group(1)


def documented_services() -> dict[str, dict]:
    """docs/deployment.md's service table: | `name` | image | published port | volumes |."""
    services = {}
    for line in deployment_section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.fullmatch(r"`[\w-]+`", cells[0]):
            continue
        name = cells[0].strip("`")
        if name not in SERVICES:
            continue
        services[name] = {
            "image": re.findall(r"`([^`]+)`", cells[1])[0],
            "ports": re.findall(r"`([^`]+)`", cells[2]),
            "volumes": re.findall(r"`([^`]+)` → `([^`]+)`", cells[3]),
        }
    return services


@pytest.mark.parametrize("compose_file", ["docker-compose.yml", "docker-compose.cpu.yml"])
def test_compose_file_is_valid(compose_file: str) -> None:
    assert set(compose_config(compose_file)["services"]) == SERVICES


def test_only_gateway_and_grafana_publish_ports() -> None:
    services = compose_config()["services"]
    assert {name for name, s in services.items() if s.get("ports")} == {"gateway", "grafana"}
    # Grafana's admin login is only for the Docker host unless GRAFANA_BIND says otherwise.
    assert published_ports(services["grafana"]) == ["127.0.0.1:3000"]


def test_app_can_be_scaled() -> None:
    app = compose_config()["services"]["app"]
    # `--scale app=N` fails on a fixed container name or host port.
    assert "container_name" not in app
    assert "ports" not in app
    assert app["expose"] == ["8000"]


def test_app_reserves_one_gpu() -> None:
    app = compose_config()["services"]["app"]
    (device,) = app["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert device["capabilities"] == ["gpu"]
    assert app["environment"]["CFG_DEVICE"] == "cuda"
    assert app["build"]["args"]["TORCH_FLAVOR"] == "cuda"


def test_cpu_variant_differs_only_in_the_device() -> None:
    gpu, cpu = compose_config()["services"], compose_config("docker-compose.cpu.yml")["services"]
    for name in SERVICES - {"app"}:
        assert comparable(cpu[name]) == comparable(gpu[name]), f"{name} differs between the compose files"
    gpu_app, cpu_app = dict(gpu["app"]), dict(cpu["app"])
    assert cpu_app.pop("build")["args"]["TORCH_FLAVOR"] == "cpu"
    assert cpu_app.pop("image") == "cfg-serve:cpu"
    assert "deploy" not in cpu_app
    assert cpu_app["environment"] == gpu_app["environment"] | {"CFG_DEVICE": "cpu"}
    for key in ("build", "image", "deploy", "environment"):
        gpu_app.pop(key)
    cpu_app.pop("environment")
    assert cpu_app == gpu_app


def seconds(duration: str) -> float:
    """A compose duration such as `340s`, `5m` or `1m30s`, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)([hms])", duration))


def test_replicas_are_healthy_when_ready_and_outlive_their_drain() -> None:
    app = compose_config()["services"]["app"]
    check = app["healthcheck"]
    assert "/readyz" in " ".join(check["test"])
    assert seconds(check["start_period"]) >= 600  # loading and an int8 warmup, which answer 503
    drain = float(app["environment"]["CFG_DRAIN_TIMEOUT_S"].split(":-")[-1].rstrip("}"))
    assert seconds(app["stop_grace_period"]) > drain + CLOSE_TIMEOUT_S


def test_services_find_each_other() -> None:
    services = compose_config()["services"]
    app_port = services["app"]["expose"][0]
    assert services["gateway"]["environment"]["GATEWAY_UPSTREAM"] == f"app:{app_port}"

    prometheus = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "cfg-serve"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["app"] and sd["type"] == "A" and str(sd["port"]) == app_port

    datasources = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["url"] == f"http://prometheus:{services['prometheus']['expose'][0]}"


def test_replicas_share_the_redis_job_store_which_persists_its_jobs() -> None:
    services = compose_config()["services"]
    store = services["app"]["environment"]["CFG_JOB_STORE"]
    assert store == f"redis://redis:{services['redis']['expose'][0]}/0"
    redis = services["redis"]
    command = redis["command"]
    assert command[0] == "redis-server" and command[command.index("--appendonly") + 1] == "yes"
    assert ("redis-data", "/data") in volumes(redis)  # the append-only file on a volume
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert not redis.get("ports")  # the compose network only


def test_mounted_files_exist() -> None:
    for compose_file in ("docker-compose.yml", "docker-compose.cpu.yml"):
        for service in compose_config(compose_file)["services"].values():
            for source, _ in volumes(service):
                if source.startswith("./"):
                    assert (REPO / source).exists(), f"{compose_file} mounts missing {source}"


def test_the_deployment_page_agrees_with_the_compose_file() -> None:
    services = compose_config()["services"]
    documented = documented_services()
    assert set(documented) == set(services)
    for name, service in services.items():
        assert documented[name]["image"] == service["image"], name
        assert documented[name]["ports"] == published_ports(service), name
        assert documented[name]["volumes"] == volumes(service), name


def test_the_deployment_page_override_examples_are_valid(tmp_path: Path) -> None:
    snippets = re.findall(r"```yaml\n(.*?)```", deployment_section(), re.S)
    assert len(snippets) >= 2
    for i, snippet in enumerate(snippets):
        override = tmp_path / f"override{i}.yml"
        override.write_text(textwrap.dedent(snippet))
        services = compose_config("docker-compose.yml", str(override))["services"]
        for name, service in yaml.safe_load(override.read_text())["services"].items():
            if "aliases" in str(service.get("networks")):
                # A replica of its own: found by the gateway and Prometheus under the name `app`.
                assert services[name]["networks"]["default"]["aliases"] == ["app"]
                assert "count" not in str(services[name]["deploy"])
            for key, value in service.get("environment", {}).items():
                if key == "CFG_MODEL_PATH":
                    mounted = [target for _, target in volumes(services[name])]
                    assert any(value.startswith(target + "/") for target in mounted), value
