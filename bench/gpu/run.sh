#!/usr/bin/env bash
# Run on a lent GPU machine (issue 16), from the repository root, after bench/gpu/prepare.sh here:
#   run(command="bash bench/gpu/run.sh", carry=[".whl", ".data"], timeout_s=420)
# Installs the carried wheels (the machine's image has torch but not diffusers, FastAPI, pydantic, uvicorn),
# then runs bench/bench_gpu.py with its results under $OUT (gpu.md, gpu.json, pytest.txt, evaluate.md).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, diffusers, fastapi; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)"
mkdir -p "${OUT:-gpu-out}"
timeout 390 python3 bench/bench_gpu.py --out "${OUT:-gpu-out}" --data-dir .data "$@" 2>&1 | tee "${OUT:-gpu-out}/log.txt"
