#!/usr/bin/env bash
# Run on a lent GPU machine, from the repository root, after bench/gpu/prepare.sh here:
#   run(command="bash bench/gpu/run.sh", carry=[".whl", ".data"], timeout_s=420)        # issue 16's check
#   run(command="bash bench/gpu/run.sh split", carry=[".whl", ".data"], timeout_s=420)  # issue 26's split
#   run(command="bash bench/gpu/run.sh cache", carry=[".whl", ".data"], timeout_s=420)  # First-Block Cache, DiT-XL/2
# Installs the carried wheels (the machine's image has torch but not diffusers, FastAPI, pydantic, uvicorn),
# then runs bench/bench_gpu.py with its results under $OUT (gpu.md, gpu.json, pytest.txt, evaluate.md), or with
# `split`, bench/bench_split.py at 1, 16, 64 and 256 one-image clients and 64 eight-image ones, with the raw loop
# (split.md, and both servers' logs); or with `cache`, bench/bench_cache.py's First-Block Cache on a DiT-XL/2-sized
# model with random weights at 256 px, 16 clients (cache.md).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, diffusers, fastapi; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)"
out="${OUT:-gpu-out}"
mkdir -p "$out"
if [ "${1:-}" = split ]; then
  shift
  timeout 390 python3 bench/bench_split.py --device cuda --levels 1x1,1x16,1x64,1x256,8x64 --max-batch-rows 512 \
    --rounds 2 --warm 2 --window 6 --raw --logs "$out/logs" "$@" 2>&1 | tee "$out/split.md"
elif [ "${1:-}" = cache ]; then
  shift
  timeout 390 python3 bench/bench_cache.py --dit-xl2 --clients 16 --warm 5 --window 10 --rounds 2 --psnr-images 4 \
    --caches '{"kind": "none"}' '{"kind": "first_block", "threshold": 0.1}' '{"kind": "first_block", "threshold": 0.2}' \
    '{"kind": "first_block", "threshold": 0.3}' "$@" 2>&1 | tee "$out/cache.md"
else
  timeout 390 python3 bench/bench_gpu.py --out "$out" --data-dir .data "$@" 2>&1 | tee "$out/log.txt"
fi
