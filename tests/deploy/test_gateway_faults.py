"""A replica dies under load behind the real nginx gateway (the compose config), in front of two real
replicas of `python -m app.serve` with the shipped checkpoint, on 127.0.0.1.

The survivor is the session's first replica; the victim is started for this test alone (without the
warmup, which only moves kernel builds out of the first requests) and killed with SIGKILL, as an OOM
kill or a lost GPU would end it: no draining, its connections reset.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from .support import Gateway, Replica, start_replica, stop_process, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

LOAD = 6  # concurrent clients; 50 steps each keep them all in the replicas until the kill


def in_replica(replica: Replica) -> float:
    return replica.gauge("cfg_requests_in_flight", "cfg_queue_depth")


def generate_statuses_by_upstream(gateway: Gateway) -> dict[str, list[int]]:
    """The status of each POST /generate in the gateway's access log, by the replica nginx sent it to."""
    found: dict[str, list[int]] = {}
    for line in gateway.access_log().splitlines():
        match = re.search(r'"POST /generate HTTP/1\.1" (\d{3}) .* upstream=(\S+) ', line)
        if match:
            found.setdefault(match.group(2), []).append(int(match.group(1)))
    return found


def test_killing_a_replica_under_load(replicas: list[Replica], start_gateway, tmp_path: Path) -> None:
    survivor = replicas[0]
    victim = start_replica(tmp_path / "victim.log", CFG_WARMUP="false")
    try:
        wait_for(lambda: httpx.get(f"{victim.url}/readyz", timeout=2).status_code == 200, 240, "victim", victim.proc)
        gateway = start_gateway([r.hostport for r in (survivor, victim)])
        # The survivor is shared with earlier tests: wait until it has finished their work (a job or an
        # abandoned request), which would otherwise count as load here and finish into its counters.
        wait_for(lambda: in_replica(survivor) == 0, 120, "the survivor to be idle")
        before = survivor.counters()
        results: list[tuple[int, float]] = []  # (status, when it came back), one per client

        def client(i: int) -> None:
            body = {"class_label": i % 10, "steps": 50, "sampler": "ddim", "guidance_scale": 3, "seed": 100 + i}
            # The client's own bound only turns a hang into a failure; nginx would wait 330 s.
            response = httpx.post(f"{gateway.url}/generate", json=body, timeout=300)
            results.append((response.status_code, time.monotonic()))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(LOAD)]
        for t in threads:
            t.start()
        # Every request is in one replica or the other, so none is on its way when the kill comes.
        wait_for(lambda: in_replica(survivor) + in_replica(victim) == LOAD, 120, "load in the replicas")
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        for t in threads:
            t.join(timeout=300)
            assert not t.is_alive(), "a client hung after the kill"

        # The victim's requests fail at once with the gateway's 502; nginx does not send them again.
        # Which replica had each request is read from the gateway's access log (upstream=...), which nginx
        # writes as each request ends.
        wait_for(lambda: sum(map(len, generate_statuses_by_upstream(gateway).values())) == LOAD, 10, "the log")
        by_upstream = generate_statuses_by_upstream(gateway)
        assert set(by_upstream) == {survivor.hostport, victim.hostport}, by_upstream
        assert by_upstream[survivor.hostport] == [200] * len(by_upstream[survivor.hostport]), by_upstream
        assert by_upstream[victim.hostport] == [502] * len(by_upstream[victim.hostport]), by_upstream
        on_victim = len(by_upstream[victim.hostport])
        assert 1 <= on_victim < LOAD, f"round robin sent {on_victim} of {LOAD} to the victim"
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] * (LOAD - on_victim) + [502] * on_victim, statuses
        failed_after = [when - killed_at for status, when in results if status == 502]
        assert max(failed_after) < 30, f"the 502s came {failed_after} s after the kill"

        # New requests go to the survivor, whichever replica round robin picks first for them.
        for i in range(4):
            body = {"class_label": i, "steps": 2, "sampler": "ddim", "guidance_scale": 3, "seed": i}
            response = httpx.post(f"{gateway.url}/generate", json=body, timeout=120)
            assert response.status_code == 200, response.text
        assert httpx.get(f"{gateway.url}/readyz", timeout=30).status_code == 200

        # The survivor ran each of its requests once: its own 200s and the four new ones, nothing else.
        after = survivor.counters()
        assert after["ok"] - before["ok"] == LOAD - on_victim + 4
        assert sum(after.values()) - sum(before.values()) == LOAD - on_victim + 4
    finally:
        stop_process(victim.proc, signal.SIGKILL, timeout=30)
