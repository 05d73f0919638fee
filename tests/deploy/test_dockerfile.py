"""The Dockerfile and .dockerignore, read as text: no Docker engine here to build them.

What a build would show is checked statically: the install goes through scripts/install.sh like CI's,
the runtime stage runs unprivileged with a health check on /readyz, and the build context holds
every file the Dockerfile copies.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from .support import REPO

pytestmark = pytest.mark.deploy


def instructions(dockerfile: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    pairs = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        pairs.append((keyword.upper(), args.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_build_is_multi_stage() -> None:
    stages = [args for keyword, args in instructions() if keyword == "FROM"]
    assert len(stages) >= 2
    (copy_from,) = [args for keyword, args in final_stage() if keyword == "COPY" and "--from=" in args]
    assert copy_from.startswith("--from=build /opt/venv")


def test_dependencies_install_through_the_ci_script() -> None:
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    assert any(re.search(r"(^|[\s;&|])scripts/install\.sh\b", run) for run in runs), runs
    copies = [args for keyword, args in instructions() if keyword == "COPY"]
    assert any("scripts/install.sh" in args for args in copies)


def test_the_image_installs_the_serve_set_only() -> None:
    """--deps: torch and the runtime dependencies (tests/test_install.py checks what that installs); never the
    test install, and no pip install of its own beside the script."""
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    installs = [run for run in runs if "scripts/install.sh" in run]
    assert installs and all(re.search(r"install\.sh --deps\s*$", run) for run in installs), installs
    assert not any("pip install" in run for run in runs), runs
    # ... with the fleet extra (redis), so that CFG_JOB_STORE=redis://... works in the image
    assert all('SERVE_EXTRAS="$SERVE_EXTRAS"' in run for run in installs), installs
    args = [a for keyword, a in instructions() if keyword == "ARG"]
    assert "SERVE_EXTRAS=fleet" in args, args


def test_ci_installs_through_the_same_script() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    lines = [line.split("#", 1)[0] for line in ci.splitlines()]
    assert any(re.search(r"(^|[\s;&|/])scripts/install\.sh\b", line) for line in lines), ".ci/run"


def test_gpu_by_default_cpu_by_build_arg() -> None:
    args = [args for keyword, args in instructions() if keyword == "ARG"]
    assert "TORCH_FLAVOR=cuda" in args


def test_runtime_runs_one_server_process_unprivileged() -> None:
    stage = final_stage()
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    (cmd,) = [args for keyword, args in stage if keyword == "CMD"]
    argv = json.loads(cmd)
    assert argv[:3] == ["python", "-m", "app.serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert "--workers" not in argv


def test_health_check_asks_readyz() -> None:
    (check,) = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    assert "CMD" in check and "/readyz" in check


def test_embedded_checkpoint_is_the_default_model_path() -> None:
    stage = final_stage()
    (workdir,) = [args for keyword, args in stage if keyword == "WORKDIR"]
    copied = [shlex.split(args) for keyword, args in stage if keyword == "COPY" and "--from" not in args]
    assert ["model_store/fashion-mnist-cfg", "model_store/fashion-mnist-cfg"] in copied
    env = " ".join(args for keyword, args in stage if keyword == "ENV")
    assert f"CFG_MODEL_STORE={workdir}/model_store" in env and "CFG_MODELS=fashion-mnist-cfg" in env
    assert "CFG_MODEL_PATH" not in env  # it would override CFG_MODELS
    assert (REPO / "model_store" / "fashion-mnist-cfg" / "manifest.json").is_file()


def test_the_image_holds_the_default_models_autoguidance_guide_and_the_small_dit() -> None:
    """Shipped beside the default model, not served unless CFG_MODELS names them (docs/autoguidance.md,
    docs/caching.md)."""
    copied = [shlex.split(args) for keyword, args in final_stage() if keyword == "COPY" and "--from" not in args]
    for name in ("fashion-mnist-guide", "fashion-mnist-dit"):
        assert [f"model_store/{name}", f"model_store/{name}"] in copied
        assert not dockerignore_excludes(f"model_store/{name}/manifest.json")
    assert dockerignore_excludes("model_store/other-checkpoint/manifest.json")


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: the last matching pattern wins, a
    pattern matches the path or any folder above it, `*` stays within one path segment."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    for keyword, args in instructions():
        if keyword != "COPY" or "--from" in args:
            continue
        *sources, _ = shlex.split(args)
        for source in sources:
            root = REPO / source
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            assert files, f"COPY {source}: nothing there"
            for file in files:
                relative = str(file.relative_to(REPO))
                if "__pycache__" in relative:
                    continue
                assert not dockerignore_excludes(relative), f".dockerignore drops {relative}"


def test_build_context_leaves_out_the_rest() -> None:
    for path in ("runs/train.log", ".git/HEAD", "tests/conftest.py", "app/__pycache__/x.pyc", "README.md"):
        assert dockerignore_excludes(path), path


def test_install_script_parses_and_rejects_unknown_options() -> None:
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "install.sh")], check=True)
    out = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr
