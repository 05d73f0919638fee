"""The test tiers (docs/testing.md, tests/conftest.py): the fast tier selects the API and engine tests on the
stand-in, leaves the real checkpoint's tests out, and fails a test of its own that loads the real checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.config import DEFAULT_MODEL_PATH, Settings
from app.models import LoadedModel, load_checkpoint
from tests.conftest import FAST_TIER, REPO


def collected(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if "::" in line]


@pytest.mark.slow  # collects the suite twice in subprocesses
def test_the_fast_tier_selects_the_api_and_engine_tests_and_leaves_the_real_checkpoint_out():
    fast, everything = collected("-m", FAST_TIER), collected()
    assert len(fast) >= 150 and len(everything) > len(fast) + 150
    for subject in ("tests/api/test_request_errors.py", "tests/api/test_jobs.py", "tests/engine/test_engine.py"):
        assert any(t.startswith(subject) for t in fast), subject
    # tests/sampling's tiny-model tests (test_attention_run's) are fast; its solver and run tests are the real model's
    real_ones = ("tests/sampling/test_solvers.py", "tests/sampling/test_run.py", "tests/api/test_guidance_api.py")
    for real in (*real_ones, "tests/api/test_generate.py", "tests/deploy/"):
        assert not any(t.startswith(real) for t in fast), real
        assert any(t.startswith(real) for t in everything), real
    # the engine's images compared with a run sampled alone stay on the real checkpoint
    assert not any("test_result_matches_the_request_sampled_alone" in t for t in fast)


def test_a_fast_tier_test_that_loads_the_real_checkpoint_fails():
    with pytest.raises(pytest.fail.Exception, match="in the fast tier but loads the real checkpoint"):
        load_checkpoint(DEFAULT_MODEL_PATH, "cpu")


@pytest.mark.stand_in
def test_a_stand_in_test_is_served_the_stand_in_with_the_real_checkpoints_interface(loaded: LoadedModel):
    real = json.loads((DEFAULT_MODEL_PATH / "manifest.json").read_text())
    [served] = Settings().model_paths()
    assert served == loaded.path != DEFAULT_MODEL_PATH and served.name == DEFAULT_MODEL_PATH.name
    m = loaded.manifest
    assert (m.name, m.class_names, m.null_label) == (real["name"], real["class_names"], real["null_label"])
    assert m.sample_shape == (real["in_channels"], real["image_size"], real["image_size"])
    assert loaded.scheduler_config == json.loads((DEFAULT_MODEL_PATH / "scheduler/scheduler_config.json").read_text())
    assert m.weights_sha256 != real["weights_sha256"]
    assert loaded.unet is not None and sum(p.numel() for p in loaded.unet.parameters()) < 100_000
