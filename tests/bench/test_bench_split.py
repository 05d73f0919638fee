"""bench/bench_split.py runs end to end on the real checkpoint (1.5 s windows, no warmup: a smoke run, its figures
meaningless): two real servers, one with the engine in its own process, loaded in turn, and the raw loop; an API
change that breaks it fails here rather than on a lent GPU's few minutes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_split_bench_measures_both_servers_and_the_raw_loop(tmp_path):
    argv = [sys.executable, "bench/bench_split.py", "--levels", "1x1,2x2", "--rounds", "1", "--warm", "0.5",
            "--window", "1.5", "--raw", "--port", "8840", "--logs", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "CFG_WARMUP": "0"}
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "x" in line]
    levels = {(int(r[0]), int(r[1])): r for r in rows if r[0].strip().isdigit()}
    assert set(levels) == {(1, 1), (2, 2)}, out.stdout[-3000:]
    for row in levels.values():
        one, split, raw = float(row[2]), float(row[3]), float(row[7])
        assert one > 0 and split > 0 and raw > 0  # both servers answered in the window, and the raw loop ran
    assert (tmp_path / "split-1.log").exists() and (tmp_path / "split-0.log").exists()
