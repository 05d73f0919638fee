#!/usr/bin/env bash
# Installs cfg-serve into the Python that will run it ($PYTHON, default python3): one script for the README,
# CI and the Dockerfile.
#
#   scripts/install.sh            the serve install: PyTorch (below), the runtime dependencies, the project
#                                 (editable); nothing for tests, benchmarks or research
#   scripts/install.sh --system   the test install (the README's test command and CI): also the extras test
#                                 (pytest, httpx, Playwright, the OpenAI client, PyYAML, ruff, mypy), int8 (torchao),
#                                 research (matplotlib) and fleet (redis), which the suite exercises, and the
#                                 Debian packages it drives: dataset, nginx, prometheus, docker-compose, chromium,
#                                 redis-server
#   scripts/install.sh --deps     PyTorch and the runtime dependencies only, without the project's source (the
#                                 Dockerfile's cached layer: it needs nothing but pyproject.toml and this script)
#   scripts/install.sh --plan     print what the other options would install and why; install nothing
#   SERVE_EXTRAS=fleet scripts/install.sh [--deps]
#                                 the serve install with these extras of pyproject.toml too (comma-separated):
#                                 the image takes fleet (redis), for CFG_JOB_STORE=redis://...
#
# Which PyTorch (a bare "torch" requirement on Linux pulls PyPI's CUDA build: ~2.7 GB with its nvidia-*
# packages, useless without an NVIDIA GPU):
#   1. A torch that $PYTHON already imports is kept as it is, whatever its build.
#   2. The flavor: TORCH_FLAVOR=cpu|cuda if set; otherwise cuda when `nvidia-smi -L` lists a GPU, else cpu.
#   3. cpu:  torch==2.13.0+cpu if pip can already get that CPU build from its own configuration (a local
#            wheel, a configured index); otherwise torch==2.13.0 from PyTorch's CPU index (CPU_INDEX below).
#      cuda: torch>=2.4,<2.15 from pip's configured indexes (PyPI's default build is the CUDA one).
#   TORCH_INDEX_URL=URL takes torch from that index instead, either flavor.
set -euo pipefail
cd "$(dirname "$0")/.."

CPU_INDEX=https://download.pytorch.org/whl/cpu
CPU_TORCH=2.13.0     # the CPU build this project is tested with
CUDA_TORCH=">=2.4,<2.15"
TEST_EXTRAS=test,int8,research,fleet
DEBIAN_PACKAGES=(dataset-fashion-mnist nginx-light prometheus docker-compose chromium redis-server wrk)

system=0
deps_only=0
plan=0
for arg in "$@"; do
  case "$arg" in
    --system) system=1 ;;
    --deps) deps_only=1 ;;
    --plan) plan=1 ;;
    *) echo "usage: $0 [--system] [--deps] [--plan]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

# Runs a command, or with --plan prints it as a shell would take it.
run() {
  if [[ $plan == 0 ]]; then "$@"; return; fi
  local arg line="+"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=+@-]+$ ]]; then line+=" $arg"; else line+=" '$arg'"; fi
  done
  echo "$line"
}

# cuda or cpu, and why, on stdout: "FLAVOR REASON".
torch_flavor() {
  if [[ -n "${TORCH_FLAVOR:-}" ]]; then
    echo "$TORCH_FLAVOR TORCH_FLAVOR=$TORCH_FLAVOR"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "cuda nvidia-smi lists a GPU"
  else
    echo "cpu no NVIDIA GPU: nvidia-smi lists none"
  fi
}

# Whether pip, as configured here, can get the CPU build without being pointed at CPU_INDEX. --no-deps: only
# torch's own wheel is looked for (a local one is only read; a remote one lands in pip's cache). A pip older
# than 22.2 has no --dry-run: it always takes CPU_INDEX.
pip_sees_cpu_torch() {
  $PY -m pip install --dry-run --no-deps --ignore-installed -q "torch==$CPU_TORCH+cpu" >/dev/null 2>&1
}

install_torch() {
  local installed flavor reason index=()
  if installed=$($PY -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "torch: $installed is installed: kept"
    return
  fi
  read -r flavor reason < <(torch_flavor)
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then index=(--index-url "$TORCH_INDEX_URL"); fi
  case "$flavor" in
    cpu)
      if [[ ${#index[@]} == 0 ]] && pip_sees_cpu_torch; then
        echo "torch: the CPU build ($reason), from pip's configured sources"
        run $PY -m pip install -q "torch==$CPU_TORCH+cpu"
      else
        [[ ${#index[@]} != 0 ]] || index=(--index-url "$CPU_INDEX")
        echo "torch: the CPU build ($reason), from ${index[1]}"
        run $PY -m pip install -q "${index[@]}" "torch==$CPU_TORCH"
      fi
      ;;
    cuda)
      echo "torch: the CUDA build ($reason), from ${index[1]:-the configured indexes}"
      run $PY -m pip install -q "${index[@]}" "torch$CUDA_TORCH"
      ;;
    *) echo "TORCH_FLAVOR must be cpu or cuda, not '$flavor'" >&2; exit 2 ;;
  esac
}

if [[ $system == 1 ]] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  run apt-get update -qq
  if [[ $plan == 1 ]]; then
    run apt-get install -y -qq --no-install-recommends "${DEBIAN_PACKAGES[@]}"
  else
    apt-get install -y -qq --no-install-recommends "${DEBIAN_PACKAGES[@]}" >/dev/null
  fi
fi

install_torch

if [[ $deps_only == 1 ]]; then
  # The runtime dependencies and those of SERVE_EXTRAS, as pyproject.toml lists them.
  mapfile -t deps < <(SERVE_EXTRAS="${SERVE_EXTRAS:-}" $PY -c '
import os, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [e for e in os.environ["SERVE_EXTRAS"].split(",") if e]
unknown = [e for e in extras if e not in project["optional-dependencies"]]
if unknown:
    raise SystemExit(f"SERVE_EXTRAS: no extra {unknown} in pyproject.toml")
print(*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e]), sep="\n")')
  run $PY -m pip install -q "${deps[@]}"
elif [[ $system == 1 ]]; then
  run $PY -m pip install -q -e ".[$TEST_EXTRAS]"
elif [[ -n ${SERVE_EXTRAS:-} ]]; then
  run $PY -m pip install -q -e ".[$SERVE_EXTRAS]"
else
  run $PY -m pip install -q -e .
fi
