"""Prometheus and the Grafana dashboard: the real Prometheus scrapes two real replicas, then every
query of the dashboard runs through Prometheus's HTTP API and must return data.

Grafana itself can't run here; its part is only substituting its own variables into the queries,
which _promql() does the way Grafana would for a 1 s scrape interval.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from app.metrics import create_metrics

from .support import REPO, Replica, free_port, require_tool, stop_process, wait_for

pytestmark = pytest.mark.deploy

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "cfg-serve.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GENERATE = {
    "class_label": "Coat",
    "num_images": 2,
    "steps": 3,
    "sampler": "ddim",
    "guidance_scale": 3,
    "seed": 7,
}
# Grafana's $__rate_interval is at least four scrape intervals; a wider window here keeps the test's
# traffic inside it while the queries are evaluated.
# The dashboard's own variable $model at "All" (its allValue), and Grafana's built-ins.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "15s", "$__range": "5m", "$model": ".*"}


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.extend([panel, *panel.get("panels", [])])  # rows may hold panels
    return [p for p in panels if p.get("type") != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard_panels() for target in panel["targets"]]


def _promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a dashboard variable the test doesn't know: {expr}"
    return expr


def test_shipped_prometheus_config_is_valid() -> None:
    out = subprocess.run(
        [require_tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == datasource["uid"]


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_filters_every_model_labelled_series_by_the_model_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model" and variable["includeAll"] and variable["allValue"] == ".*"
    assert "label_values(cfg_model_info" in variable["query"]["query"]
    labelled = _model_families()
    for title, expr in dashboard_queries():
        for name, labels in re.findall(r"\b(cfg_\w+)\{([^}]*)\}", expr):
            family = re.sub(r"_(total|bucket|sum|count|info)$", "", name)
            if family in labelled:
                assert 'model=~"$model"' in labels, f"{title}: {name} is not filtered by $model"


def _model_families() -> set[str]:
    """The metric families with a model label (created empty: their label names say it)."""
    return {
        collector._name  # type: ignore[attr-defined]  # private: a family with no child yet has no samples to read
        for collector in create_metrics().registry._collector_to_names
        if "model" in getattr(collector, "_labelnames", ())
    }


def test_dashboard_names_only_metrics_the_app_exports() -> None:
    # The series names of app/metrics.py's registry, as the text exposition writes them.
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "histogram": ["_bucket", "_count", "_sum"],
        "info": ["_info"],
    }
    exported = {"up"} | {
        family.name + suffix for family in create_metrics().registry.collect() for suffix in suffixes[family.type]
    }
    for title, expr in dashboard_queries():
        for metric in re.findall(r"\b(cfg_\w+|up)\b(?=\s*[{\[])", expr):
            assert metric in exported, f"{title}: {metric} is not exported by the app"


@pytest.fixture
def prometheus(replicas: list[Replica], tmp_path: Path) -> Iterator[str]:
    """The real Prometheus on the shipped config, scraping the two replicas every second.

    The shipped job finds replicas through Docker's DNS (dns_sd_configs on `app`), which isn't here:
    the test keeps the job and its name and swaps only that discovery for the replicas' addresses.
    """
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cfg-serve"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [r.url.removeprefix("http://") for r in replicas]}]
    config["scrape_configs"] = [job]
    config["global"]["scrape_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                require_tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "prometheus", proc)
        yield url
    finally:
        stop_process(proc)


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def has_data(result: list[dict]) -> bool:
    return any(not math.isnan(float(series["value"][1])) for series in result)


def test_every_dashboard_query_returns_data(replicas: list[Replica], prometheus: str) -> None:
    wait_for(
        lambda: sum(float(s["value"][1]) for s in query(prometheus, 'up{job="cfg-serve"}')) == len(replicas),
        60,
        "both replicas scraped",
    )
    time.sleep(2)  # a sample of every counter before the traffic, so that rate() sees it rise
    for replica in replicas:
        for _ in range(2):
            assert httpx.post(f"{replica.url}/generate", json=GENERATE, timeout=120).status_code == 200
        assert httpx.post(f"{replica.url}/generate", json={**GENERATE, "steps": 0}, timeout=30).status_code == 422

    queries = [(title, _promql(expr)) for title, expr in dashboard_queries()]
    deadline = time.monotonic() + 30
    while True:
        missing = [(title, expr) for title, expr in queries if not has_data(query(prometheus, expr))]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, "dashboard queries without data:\n" + "\n".join(f"  {t}: {e}" for t, e in missing)

    # One `up` series per replica, for the dashboard's per-replica tiles.
    instances = {s["metric"]["instance"] for s in query(prometheus, 'up{job="cfg-serve"}')}
    assert instances == {r.url.removeprefix("http://") for r in replicas}
