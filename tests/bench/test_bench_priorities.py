"""bench/bench_priorities.py runs end to end on the real checkpoint (2 s windows: a smoke run, its figures
meaningless): the bench builds its engine as the service does, so an API change that breaks it fails here
rather than at the next measurement."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PHASES = ("idle", "batch alone", "priorities", "one class", "fair shares")


def test_the_priorities_bench_runs_every_phase_and_prints_its_table():
    argv = [sys.executable, "bench/bench_priorities.py", "--window", "2", "--settle", "0", "--threads", "1"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert all(phase in rows for phase in PHASES), out.stdout[-3000:]
    assert "100%" in rows["batch alone"]  # batch alone is its own reference
    assert int(rows["idle"].split("|")[2]) > 0  # interactive requests were answered on the idle service
