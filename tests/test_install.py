"""scripts/install.sh, the README's two commands and .ci/run: which PyTorch build each machine gets, and which
packages the serve and the test installs bring.

The decision is read from `install.sh --plan` (it runs pip's own look-up, then prints the commands instead of
running them) with a stand-in `nvidia-smi` on PATH: this machine has no GPU to show either way. One slow test
runs the real serve install into a fresh virtual environment and serves from it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO, free_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli there
    import tomli as tomllib

pytestmark = pytest.mark.slow  # pip resolves in subprocesses: tens of seconds

INSTALL = REPO / "scripts" / "install.sh"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TEST_TOOLS = {"pytest", "playwright", "ruff", "mypy", "matplotlib", "torchao", "openai", "pytest-timeout"}

# What `nvidia-smi -L` prints and exits with: on a GPU machine; with a driver and no GPU; with no driver loaded.
NVIDIA_SMI = {
    "gpu": ("GPU 0: NVIDIA H200 (UUID: GPU-6d1c0b2e-1a2b-3c4d-5e6f-0123456789ab)", 0),
    "no_device": ("No devices were found", 6),
    "no_driver": ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9),
}


def stub_nvidia_smi(bin_dir: Path, kind: str) -> Path:
    out, code = NVIDIA_SMI[kind]
    bin_dir.mkdir(parents=True, exist_ok=True)
    stub = bin_dir / "nvidia-smi"
    stub.write_text(f"#!/bin/sh\necho '{out}'\nexit {code}\n")
    stub.chmod(0o755)
    return bin_dir


def install_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """The environment with the stub first on PATH and no install overrides but `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_FLAVOR", "TORCH_INDEX_URL", "PYTHON")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return {**env, **extra}


def plan(env: dict[str, str], *args: str) -> tuple[list[str], list[str]]:
    """(decision lines, commands) that `install.sh --plan ARGS` prints."""
    out = subprocess.run(["bash", str(INSTALL), "--plan", *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return [line for line in lines if not line.startswith("+ ")], [line[2:] for line in lines if line.startswith("+ ")]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh virtual environment's python: pip and nothing else, so no torch."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    return str(venv / "bin" / "python")


def fake_wheel(folder: Path, version: str) -> None:
    """A torch wheel pip can read the metadata of: enough for its look-up, never imported."""
    name = f"torch-{version}"
    with zipfile.ZipFile(folder / f"{name}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{name}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        whl.writestr(f"{name}.dist-info/WHEEL", wheel)
        whl.writestr(f"{name}.dist-info/RECORD", "")


def pip_sees_only(folder: Path, *versions: str) -> dict[str, str]:
    """pip settings under which the only torch builds anywhere are `versions` (this machine's pip.conf off)."""
    folder.mkdir(parents=True, exist_ok=True)
    for version in versions:
        fake_wheel(folder, version)
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(folder)}


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("nvidia_smi", ["no_device", "no_driver"])
def test_without_a_gpu_the_cpu_build_pip_can_already_get_is_installed(
    tmp_path: Path, bare_python: str, nvidia_smi: str
) -> None:
    env = install_env(stub_nvidia_smi(tmp_path / "bin", nvidia_smi), PYTHON=bare_python)
    env |= pip_sees_only(tmp_path / "wheels", "2.13.0", "2.13.0+cpu")
    decisions, commands = plan(env)
    assert decisions == ["torch: the CPU build (no NVIDIA GPU: nvidia-smi lists none), from pip's configured sources"]
    assert commands[0] == f"{bare_python} -m pip install -q torch==2.13.0+cpu"


def test_where_pip_can_get_only_the_cuda_build_a_cpu_machine_takes_torch_from_pytorchs_cpu_index(
    tmp_path: Path, bare_python: str
) -> None:
    """PyPI's situation: its Linux torch 2.13.0 is the CUDA build, with no +cpu build beside it."""
    env = install_env(stub_nvidia_smi(tmp_path / "bin", "no_device"), PYTHON=bare_python)
    env |= pip_sees_only(tmp_path / "wheels", "2.13.0")
    decisions, commands = plan(env)
    assert decisions == [f"torch: the CPU build (no NVIDIA GPU: nvidia-smi lists none), from {CPU_INDEX}"]
    assert commands[0] == f"{bare_python} -m pip install -q --index-url {CPU_INDEX} torch==2.13.0"


def test_with_a_gpu_the_cuda_build_comes_from_pips_default_index(tmp_path: Path, bare_python: str) -> None:
    env = install_env(stub_nvidia_smi(tmp_path / "bin", "gpu"), PYTHON=bare_python)
    decisions, commands = plan(env)
    assert decisions == ["torch: the CUDA build (nvidia-smi lists a GPU), from the configured indexes"]
    assert commands[0] == f"{bare_python} -m pip install -q 'torch>=2.4,<2.15'"


def test_torch_flavor_and_torch_index_url_override_the_detection(tmp_path: Path, bare_python: str) -> None:
    gpu = stub_nvidia_smi(tmp_path / "bin", "gpu")
    decisions, commands = plan(install_env(gpu, PYTHON=bare_python, TORCH_FLAVOR="cpu", TORCH_INDEX_URL="file:///x"))
    assert decisions == ["torch: the CPU build (TORCH_FLAVOR=cpu), from file:///x"]
    assert commands[0] == f"{bare_python} -m pip install -q --index-url file:///x torch==2.13.0"
    cpu = stub_nvidia_smi(tmp_path / "bin2", "no_driver")
    decisions, commands = plan(install_env(cpu, PYTHON=bare_python, TORCH_FLAVOR="cuda", TORCH_INDEX_URL="file:///y"))
    assert decisions == ["torch: the CUDA build (TORCH_FLAVOR=cuda), from file:///y"]
    assert commands[0] == f"{bare_python} -m pip install -q --index-url file:///y 'torch>=2.4,<2.15'"
    env = install_env(cpu, PYTHON=bare_python, TORCH_FLAVOR="rocm")
    out = subprocess.run(["bash", str(INSTALL), "--plan"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "TORCH_FLAVOR must be cpu or cuda" in out.stderr


def test_an_installed_torch_is_kept_whatever_the_machine(tmp_path: Path) -> None:
    import torch

    decisions, commands = plan(install_env(stub_nvidia_smi(tmp_path / "bin", "gpu"), PYTHON=sys.executable))
    assert decisions == [f"torch: {torch.__version__} is installed: kept"]
    assert not any("torch" in c.split("install -q", 1)[1] for c in commands if "pip install" in c)


def test_the_serve_install_is_the_project_without_extras_and_the_test_install_adds_them(tmp_path: Path) -> None:
    env = install_env(stub_nvidia_smi(tmp_path / "bin", "no_driver"), PYTHON=sys.executable)
    assert plan(env)[1] == [f"{sys.executable} -m pip install -q -e ."]
    commands = plan(env, "--system")[1]
    assert commands[-1] == f"{sys.executable} -m pip install -q -e '.[test,int8,research,fleet]'"
    apt = next(c for c in commands if c.startswith("apt-get install"))
    packages = {
        "dataset-fashion-mnist",
        "nginx-light",
        "prometheus",
        "docker-compose",
        "chromium",
        "redis-server",
        "wrk",
    }
    assert packages <= set(apt.split())


def test_the_image_install_is_torch_and_the_runtime_dependencies_only(tmp_path: Path) -> None:
    env = install_env(stub_nvidia_smi(tmp_path / "bin", "no_driver"), PYTHON=sys.executable)
    (command,) = plan(env, "--deps")[1]
    prefix = f"{sys.executable} -m pip install -q "
    assert command.startswith(prefix)
    requirements = [arg.strip("'") for arg in command.removeprefix(prefix).split()]
    assert requirements == PYPROJECT["project"]["dependencies"]


def test_serve_extras_add_their_requirements_to_the_image_install(tmp_path: Path) -> None:
    env = install_env(stub_nvidia_smi(tmp_path / "bin", "no_driver"), PYTHON=sys.executable, SERVE_EXTRAS="fleet")
    (command,) = plan(env, "--deps")[1]
    requirements = [arg.strip("'") for arg in command.split(" install -q ", 1)[1].split()]
    fleet = PYPROJECT["project"]["optional-dependencies"]["fleet"]
    assert requirements == PYPROJECT["project"]["dependencies"] + fleet
    assert plan(env)[1] == [f"{sys.executable} -m pip install -q -e '.[fleet]'"]


def test_the_serve_extras_leave_out_the_test_and_research_tools() -> None:
    runtime = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    assert not runtime & TEST_TOOLS
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"pytest", "playwright", "ruff", "mypy"} <= {Requirement(r).name for r in extras["test"]}
    assert "torchao" in {Requirement(r).name for r in extras["int8"]}
    assert "matplotlib" in {Requirement(r).name for r in extras["research"]}


def requirement_closure(requirements: list[str]) -> set[str]:
    """Every distribution these requirements bring, as installed here: markers and extras evaluated."""
    names: set[str] = set()
    todo, done = [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        names.add(key[0])
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(sub)
    return names


def imported_distributions(folder: str) -> dict[str, set[str]]:
    """Third-party distributions that the modules under `folder` import (any import, lazy ones too), with
    the files importing each."""
    module_dists = metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top in ("app", "research", "tests", "bench", "__future__"):
                    continue
                for dist in module_dists.get(top, [top]):
                    found.setdefault(canonicalize_name(dist), set()).add(str(path.relative_to(REPO)))
    return found


def test_every_package_the_code_imports_comes_with_the_install_that_runs_it() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    runtime = PYPROJECT["project"]["dependencies"]
    serve = requirement_closure(runtime)
    # app/: the service; int8 and a Redis job store (fleet) import from their own extras, lazily.
    optional = {"torchao": requirement_closure(extras["int8"]), "redis": requirement_closure(extras["fleet"])}
    for dist, files in imported_distributions("app").items():
        assert dist in optional.get(dist, serve), f"{dist} (imported by {sorted(files)}) comes with no install of app/"
    for folder, installed in (
        ("research", requirement_closure(runtime + extras["research"] + extras["int8"])),
        ("bench", requirement_closure(runtime + extras["research"])),
        (
            "tests",
            requirement_closure(runtime + extras["test"] + extras["int8"] + extras["research"] + extras["fleet"]),
        ),
    ):
        for dist, files in imported_distributions(folder).items():
            assert dist in installed, f"{dist} (imported by {sorted(files)}) is not installed for {folder}/"


def readme_commands() -> list[str]:
    """The README's first two shell blocks: the serve command and the test command."""
    return re.findall(r"```sh\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)[:2]


def test_the_readme_serves_after_the_serve_install_and_tests_after_the_test_install() -> None:
    serve, test = readme_commands()
    assert serve.startswith("bash scripts/install.sh && python3 -m app.serve ")
    assert test == "bash scripts/install.sh --system && python3 -m pytest -q"
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    # CI runs the README's test command, its install and its suite, with the lint, format and type checks between
    install, suite = test.split(" && ")
    assert install in ci and ci[-1] == suite and ci.index(install) < ci.index("python3 -m mypy") < len(ci) - 1
    assert {"python3 -m ruff check .", "python3 -m ruff format --check ."} <= set(ci[ci.index(install) : -1])


def test_ci_fails_when_pytest_collects_no_test(tmp_path: Path) -> None:
    """.ci/run in a copy of the repository whose install does nothing, whose app, research and tests are an empty
    package each (ruff and mypy pass): no test to collect."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "research").mkdir()
    (tmp_path / "research" / "__init__.py").write_text("")
    (tmp_path / ".ci" / "run").write_text((REPO / ".ci" / "run").read_text())
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "install.sh").write_text('echo "$@" > install-args\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    out = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, cwd="/")
    assert (tmp_path / "install-args").read_text().split() == ["--system"]
    assert "no tests ran" in out.stdout and out.returncode == 5


def installed_versions(python: Path) -> dict[str, str]:
    code = "import json, importlib.metadata as m; print(json.dumps({d.name: d.version for d in m.distributions()}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return {canonicalize_name(name): version for name, version in json.loads(out.stdout).items()}


@pytest.mark.slow
def test_the_serve_install_on_a_machine_without_a_gpu_takes_cpu_torch_no_test_tools_and_serves(tmp_path: Path) -> None:
    """The README's serve command into a fresh virtual environment, as this machine's pip is configured
    (it holds the CPU wheel of torch 2.13.0 on disk; elsewhere the script takes it from PyTorch's CPU index)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = install_env(stub_nvidia_smi(tmp_path / "bin", "no_driver"), PYTHON=str(python))
    out = subprocess.run(["bash", str(INSTALL)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    versions = installed_versions(python)
    assert versions["torch"].endswith("+cpu")
    assert not [name for name in versions if name.startswith(("nvidia-", "cuda-", "triton"))]
    assert not TEST_TOOLS & versions.keys()
    # It serves: the real server from that environment, away from the repository's folder.
    port = free_port()
    server = subprocess.Popen(
        [str(python), "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"class_label": 7, "steps": 2, "seed": 1}, timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
    finally:
        server.terminate()
        server.wait(timeout=60)
