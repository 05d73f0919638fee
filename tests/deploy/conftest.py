"""Real processes for the deployment tests: app replicas, the Debian nginx and Prometheus, all on 127.0.0.1.

The compose stack itself can't run here (no Docker engine): these fixtures run the same programs with
the same configuration files, rendered the way the containers render them, on free local ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .support import (
    TEST_UPSTREAM,
    Gateway,
    Replica,
    free_port,
    gateway_env,
    nginx_main_conf,
    nginx_test,
    render_gateway,
    require_tool,
    running_replicas,
    stop_process,
    wait_for,
)


@pytest.fixture(scope="session")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    """Two app replicas, started once for all the deployment tests that need the real app."""
    logs = tmp_path_factory.mktemp("replicas")
    env = {**os.environ, "CFG_DEVICE": "cpu"}
    with running_replicas(logs, env) as started:
        yield started


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start the real nginx on the compose gateway config, in front of the given upstream servers.

    Docker's DNS (127.0.0.11) isn't here, and two local replicas differ by port, which an A record
    can't say: GATEWAY_UPSTREAM names an upstream {} group of them instead. nginx looks a proxy_pass
    variable up among the upstream groups before asking the resolver, so the rendered config is
    otherwise exactly the compose one.
    """
    gateways: list[Gateway] = []

    def start(servers: list[str], **overrides: str) -> Gateway:
        prefix = tmp_path / f"gateway{len(gateways)}"
        port = free_port()
        env = gateway_env(**{"GATEWAY_LISTEN": f"127.0.0.1:{port}", "GATEWAY_UPSTREAM": TEST_UPSTREAM, **overrides})
        conf_d = render_gateway(env, prefix / "conf.d")
        upstream = "\n".join(f"        server {s};" for s in servers)
        conf = nginx_main_conf(prefix, conf_d, f"    upstream {TEST_UPSTREAM} {{\n{upstream}\n    }}")
        checked = nginx_test(prefix, conf)
        assert checked.returncode == 0, checked.stderr
        with open(prefix / "stdout.log", "wb") as out, open(prefix / "stderr.log", "wb") as err:
            proc = subprocess.Popen(
                [
                    require_tool("nginx"),
                    "-e",
                    "stderr",
                    "-p",
                    str(prefix),
                    "-c",
                    str(conf),
                    "-g",
                    "daemon off;",
                ],
                stdout=out,
                stderr=err,
            )
        gateway = Gateway(f"http://127.0.0.1:{port}", prefix, proc, env)
        gateways.append(gateway)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 15, "nginx", proc)
        return gateway

    yield start
    for gateway in gateways:
        stop_process(gateway.proc, signal.SIGQUIT, timeout=10)
