#!/usr/bin/env bash
# One install script for the README, CI and the Dockerfile.
#   scripts/install.sh            Python deps (CPU torch unless a GPU is present) + the project
#   scripts/install.sh --system   also the Debian packages: dataset, nginx, prometheus, docker-compose
#   TORCH_FLAVOR=cuda|cpu overrides the GPU detection (the Dockerfile sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--system" ]]; then
  if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
      dataset-fashion-mnist nginx-light prometheus docker-compose >/dev/null
  fi
fi

PY=${PYTHON:-python3}
flavor=${TORCH_FLAVOR:-}
if [[ -z "$flavor" ]]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then flavor=cuda; else flavor=cpu; fi
fi
# torch 2.13.0 is the CPU build that lies on this machine's disk; a bare "torch" pulls a multi-GB CUDA build.
if ! $PY -c "import torch" 2>/dev/null; then
  if [[ "$flavor" == cpu ]]; then
    $PY -m pip install -q "torch==2.13.0"
  else
    $PY -m pip install -q "torch>=2.4,<2.15"
  fi
fi
$PY -m pip install -q -e ".[dev]"
