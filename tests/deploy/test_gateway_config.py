"""The gateway's nginx config as compose renders it: valid for the real nginx, and saying what it must."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.config import Settings

from .support import (
    compose_config,
    gateway_env,
    nginx_main_conf,
    nginx_test,
    render_gateway,
)

pytestmark = pytest.mark.deploy


def rendered_compose_gateway(tmp_path: Path) -> str:
    conf_d = render_gateway(gateway_env(), tmp_path / "conf.d")
    return (conf_d / "default.conf").read_text()


def directives(conf: str) -> str:
    """The config without comments."""
    return "\n".join(line.split("#", 1)[0] for line in conf.splitlines())


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    found = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert found is not None, value
    number, unit = found.groups()
    return int(number) * units[unit or "s"]


def test_compose_rendered_config_passes_nginx_t(tmp_path: Path) -> None:
    conf_d = render_gateway(gateway_env(), tmp_path / "conf.d")
    conf = nginx_main_conf(tmp_path, conf_d)
    checked = nginx_test(tmp_path, conf)
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


def test_every_template_variable_is_set_by_compose(tmp_path: Path) -> None:
    left = re.findall(r"\$\{?GATEWAY_\w+", directives(rendered_compose_gateway(tmp_path)))
    assert left == [], f"not set in the gateway's compose environment: {sorted(set(left))}"


def test_nginx_variables_survive_rendering(tmp_path: Path) -> None:
    # envsubst must only touch GATEWAY_*: nginx's own variables are what the config runs on.
    conf = rendered_compose_gateway(tmp_path)
    for variable in ("$binary_remote_addr", "$http_x_api_key", "$cfg_app", "$proxy_add_x_forwarded_for"):
        assert variable in conf


def test_replicas_are_resolved_per_request_through_docker_dns(tmp_path: Path) -> None:
    conf = directives(rendered_compose_gateway(tmp_path))
    assert re.search(r"resolver\s+127\.0\.0\.11\b[^;]*valid=\d+s", conf)
    assert re.search(r"set\s+\$cfg_app\s+app:8000;", conf)
    # proxy_pass through a variable is what makes nginx ask the resolver at request time.
    targets = re.findall(r"proxy_pass\s+([^;]+);", conf)
    assert targets and all(t == "http://$cfg_app" for t in targets), targets


def test_posts_are_never_retried_on_another_replica(tmp_path: Path) -> None:
    # Only failures to connect (nothing sent yet) go to the next replica: without non_idempotent, nginx
    # never passes a POST on once it has been sent. tests/deploy/test_gateway_faults.py runs both cases.
    # /v1/jobs adds http_404 for a job another replica holds: a POST is never passed on for that either.
    conf = directives(rendered_compose_gateway(tmp_path))
    assert re.findall(r"proxy_next_upstream\s+([^;]+);", conf) == ["error timeout", "error timeout http_404"]
    assert "non_idempotent" not in conf


def test_read_timeout_outlasts_the_slowest_allowed_generation(tmp_path: Path) -> None:
    conf = directives(rendered_compose_gateway(tmp_path))
    (read_timeout,) = re.findall(r"proxy_read_timeout\s+(\w+);", conf)
    app_env = compose_config()["services"]["app"]["environment"]
    app_timeout = float(app_env["CFG_REQUEST_TIMEOUT_S"])
    assert app_timeout == Settings.model_fields["request_timeout_s"].default
    # The app answers 504 itself at its timeout; the gateway must still be listening then.
    assert seconds(read_timeout) > app_timeout


def test_body_size_is_capped_small(tmp_path: Path) -> None:
    conf = directives(rendered_compose_gateway(tmp_path))
    (limit,) = re.findall(r"client_max_body_size\s+(\w+);", conf)
    assert limit == "64k"


def test_rate_limit_answers_429(tmp_path: Path) -> None:
    conf = directives(rendered_compose_gateway(tmp_path))
    assert re.search(r"limit_req_zone\s+\$binary_remote_addr\s+zone=cfg_per_client:\w+\s+rate=5r/s;", conf)
    assert "limit_req_status 429;" in conf
    assert len(re.findall(r"limit_req\s+zone=cfg_per_client\b", conf)) == 3  # /generate, /v1/ and /v1/jobs


def test_api_key_is_off_by_default() -> None:
    assert gateway_env()["GATEWAY_API_KEY"] == ""
