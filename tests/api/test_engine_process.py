"""CFG_ENGINE_PROCESS: the engines in a process of their own (app/engine/process.py), tested on the CPU with the
real checkpoint, over the app (TestClient) and over a real `python -m app.serve`: the same images as the engine in
the API's process, progress, cancellation, SIGTERM's drain across the two processes, and an engine process that
dies reported as 503 with the reason."""

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import DEFAULT_MODEL_PATH, Settings
from app.main import create_app
from tests.pngs import same_images

pytestmark = pytest.mark.integration

# Several requests of each kind at once, so that they share forwards: plain CFG, the default request, CADS,
# two step caches, a trace and previews, and a sampler of its own.
BODIES = [
    {"class_label": 3, "num_images": 2, "seed": 11, "steps": 8},
    {"class_label": 3, "num_images": 1, "seed": 12, "steps": 8},
    {"class_label": 5, "seed": 13, "steps": 8, "guidance_scale": 3, "schedule": {"kind": "constant"}},
    {"class_label": 5, "seed": 14, "steps": 8, "guidance_scale": 3, "schedule": {"kind": "constant"}},
    {"class_label": 7, "num_images": 2, "seed": 15, "steps": 8, "cads": {}, "schedule": {"kind": "constant"}},
    {"class_label": 7, "seed": 16, "steps": 8, "cads": {}, "schedule": {"kind": "constant"}},
    {"class_label": 1, "seed": 17, "steps": 9, "cache": {"kind": "deepcache", "interval": 3}},
    {"class_label": 1, "seed": 18, "steps": 9, "cache": {"kind": "deepcache", "interval": 3}},
    {"class_label": 8, "seed": 19, "steps": 6, "sampler": "euler_a", "return_trace": True},
    {"class_label": 2, "seed": 20, "steps": 8, "guidance_scale": 3, "cache": {"kind": "uncond", "every": 3}},
    {"class_label": 2, "seed": 21, "steps": 8, "guidance_scale": 3, "cache": {"kind": "uncond", "every": 3}},
]

# The playground's guidance curve: a call (not a request) to the engine, answered across the pipe.
CURVE_BODIES: tuple[dict, ...] = (
    {},
    {"guidance_scale": 4, "schedule": {"kind": "cosine"}, "noise_level": 0.5, "steps": 9},
)


def draw_together(client: TestClient) -> list[dict]:
    with ThreadPoolExecutor(len(BODIES)) as pool:
        responses = list(pool.map(lambda body: client.post("/generate", json=body), BODIES))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return [r.json() for r in responses]


@pytest.fixture(scope="module")
def split() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(engine_process=True, warmup=False))) as client:
        yield client


def test_the_split_draws_the_images_of_the_engine_in_process(split):
    with TestClient(create_app(Settings(warmup=False))) as alone:
        expected = draw_together(alone)
        models = alone.get("/v1/models").json()
        curves = {str(body): alone.post("/v1/guidance/curve", json=body).json() for body in CURVE_BODIES}
    got = draw_together(split)
    for body, want, have in zip(BODIES, expected, got, strict=True):
        assert same_images(want["images"], have["images"]), body
        assert have["seeds"] == want["seeds"]
    assert have["trace"] == want["trace"]  # the euler_a request's, across the pipe as lists of numbers
    assert split.get("/v1/models").json() == models  # the engine process's entry, as the API's own would be
    for body in CURVE_BODIES:
        assert split.post("/v1/guidance/curve", json=body).json() == curves[str(body)]  # a call across the pipe
    text = split.get("/metrics").text  # each tick's stats cross back and are recorded by the API process
    assert 'cfg_images_generated_total{model="fashion-mnist-cfg"}' in text
    count = [line for line in text.splitlines() if line.startswith('cfg_images_generated_total{model="fashion')]
    assert float(count[0].split()[-1]) >= sum(b.get("num_images", 1) for b in BODIES)


def test_progress_crosses_the_pipe(split):
    with split.stream(
        "POST", "/generate", json={"class_label": 2, "steps": 6, "seed": 4}, headers={"Accept": "text/event-stream"}
    ) as r:
        assert r.status_code == 200, r.read()
        text = "".join(r.iter_text())
    chunks = [c for c in text.split("\n\n") if c.strip()]
    progress = [json.loads(c.split("data: ", 1)[1]) for c in chunks if c.startswith("event: progress")]
    assert [p["step"] for p in progress][-6:] == [1, 2, 3, 4, 5, 6] and chunks[-1].startswith("event: result")


def test_a_load_that_fails_in_the_engine_process_fails_the_startup_with_its_error(tmp_path):
    # The folder passes verification (every file there, the weights' sha256 right) but its config does not fit
    # its weights: only loading them, in the engine process, finds that out.
    folder = tmp_path / "fashion-mnist-cfg"
    shutil.copytree(DEFAULT_MODEL_PATH, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": 3}))
    # The engine process's error, as its own loader words it, is the startup's (/healthz, /readyz and the log).
    with pytest.raises(RuntimeError, match="CheckpointError: checkpoint weights do not match .*config.json"):
        with TestClient(create_app(Settings(engine_process=True, warmup=False, model_path=folder))):
            pass


def metric(client: TestClient, name: str) -> float:
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(name + "{")]
    return float(lines[0].split()[-1])


def test_a_cancelled_job_leaves_the_engine_process(split):
    body = {"class_label": 4, "num_images": 8, "steps": 200, "seed": 1}
    job = split.post("/v1/jobs", json=body).json()
    deadline = time.monotonic() + 60
    while split.get(f"/v1/jobs/{job['id']}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(split, "cfg_requests_in_flight") == 1  # read from the engine process's state
    assert split.delete(f"/v1/jobs/{job['id']}").status_code in (200, 202)
    while metric(split, "cfg_requests_in_flight") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # The engine process dropped it: nothing runs there, and a new request is served at once.
    assert metric(split, "cfg_requests_in_flight") == 0 and metric(split, "cfg_queue_depth") == 0
    assert split.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert split.post("/generate", json={"class_label": 1, "steps": 2}).status_code == 200


def peak_rss(pid: int) -> float:
    """A process's peak resident set in bytes (VmHWM, what getrusage's ru_maxrss reports)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return float(line.split()[1]) * 1024


def test_the_memory_gauge_reads_the_engine_process(split):
    # The model lives in the engine process: the gauge is its peak resident set, not the API process's.
    engine = split.app.state.engine_process.pid
    time.sleep(0.5)  # a state beat after the requests above
    reported = metric(split, "cfg_device_memory_bytes")
    assert reported == pytest.approx(peak_rss(engine), rel=0.05)
    assert abs(reported - peak_rss(engine)) < abs(reported - peak_rss(os.getpid()))  # nearer it than the API's own


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def engine_pid(server) -> int:
    """The server's engine process: its spawned child (multiprocessing's resource tracker is another)."""
    pids = [p for p in children(server.proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(pids) == 1, f"engine processes under the server: {pids}"
    return pids[0]


def gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":  # exited, not reaped yet
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


def post_in_flight(server, steps: int) -> tuple[threading.Thread, dict]:
    """A 4-image request posted from a thread; returns once the server counts it in flight. result["r"]: its
    response, once the thread ends."""
    result: dict = {}

    def post():
        body = {"class_label": 4, "num_images": 4, "steps": steps, "seed": 1}
        result["r"] = httpx.post(f"{server.url}/generate", json=body, timeout=120)

    t = threading.Thread(target=post)
    t.start()
    deadline = time.monotonic() + 60
    while server.metric("cfg_requests_in_flight") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return t, result


def test_sigterm_drains_across_the_processes_then_both_exit(start_server):
    server = start_server(engine_process=1, warmup=0)
    engine = engine_pid(server)
    t, result = post_in_flight(server, steps=60)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert httpx.post(f"{server.url}/generate", json={"class_label": 1}, timeout=10).status_code == 503  # draining
    t.join()
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 4
    assert server.proc.wait(timeout=60) == 0
    assert gone(engine), "the engine process outlived the drained API process"


def test_a_dead_engine_process_is_a_503_with_the_reason(start_server):
    server = start_server(engine_process=1, warmup=0)
    engine = engine_pid(server)
    t, result = post_in_flight(server, steps=200)
    os.kill(engine, signal.SIGKILL)
    t.join()
    reason = "killed by signal 9"
    assert result["r"].status_code == 503 and reason in result["r"].json()["detail"], result["r"].text
    fresh = httpx.post(f"{server.url}/generate", json={"class_label": 1}, timeout=10)
    assert fresh.status_code == 503 and reason in fresh.json()["detail"], fresh.text
    health = httpx.get(f"{server.url}/healthz", timeout=10)
    assert health.status_code == 503 and reason in health.json()["error"], health.text
    ready = httpx.get(f"{server.url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["reason"] == "failed"


def test_the_engine_process_does_not_outlive_a_killed_api_process(start_server):
    server = start_server(engine_process=1, warmup=0)
    engine = engine_pid(server)
    server.proc.kill()
    server.proc.wait()
    assert gone(engine), "the engine process went on after its API process was killed"
