#!/usr/bin/env bash
# One install script for the README, CI and the Dockerfile.
#   scripts/install.sh            Python deps (CPU torch unless a GPU is present) + the project
#   scripts/install.sh --system   also the Debian packages: dataset, nginx, prometheus, docker-compose,
#                                 chromium (the playground's browser tests drive it through Playwright)
#   scripts/install.sh --deps     only torch and the project's runtime dependencies (the Dockerfile's
#                                 cached layer: it needs nothing but pyproject.toml and this script)
#   TORCH_FLAVOR=cuda|cpu overrides the GPU detection (the Dockerfile sets it).
#   TORCH_INDEX_URL=URL takes torch from that index instead (the CPU image uses PyTorch's CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."

system=0
deps_only=0
for arg in "$@"; do
  case "$arg" in
    --system) system=1 ;;
    --deps) deps_only=1 ;;
    *) echo "usage: $0 [--system] [--deps]" >&2; exit 2 ;;
  esac
done

if [[ $system == 1 ]]; then
  if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
      dataset-fashion-mnist nginx-light prometheus docker-compose chromium >/dev/null
  fi
fi

PY=${PYTHON:-python3}
flavor=${TORCH_FLAVOR:-}
if [[ -z "$flavor" ]]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then flavor=cuda; else flavor=cpu; fi
fi
torch_index=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
# torch 2.13.0 is the CPU build that lies on this machine's disk; a bare "torch" pulls a multi-GB CUDA build.
if ! $PY -c "import torch" 2>/dev/null; then
  if [[ "$flavor" == cpu ]]; then
    $PY -m pip install -q "${torch_index[@]}" "torch==2.13.0"
  else
    $PY -m pip install -q "${torch_index[@]}" "torch>=2.4,<2.15"
  fi
fi

if [[ $deps_only == 1 ]]; then
  # The runtime dependencies as pyproject.toml lists them, without the project's source.
  mapfile -t deps < <($PY -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")')
  $PY -m pip install -q "${deps[@]}"
else
  $PY -m pip install -q -e ".[dev,int8]"
fi
