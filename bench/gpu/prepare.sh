#!/usr/bin/env bash
# Prepare, on this CPU machine, what a lent GPU machine lacks for bench/bench_gpu.py (issue 16):
#   .whl/   the Python packages its image lacks (it has torch, numpy, pillow, httpx, safetensors,
#           prometheus-client, huggingface-hub; Python 3.12), as wheels for CPython 3.12 on x86-64 Linux;
#   .data/  the Fashion-MNIST files from Debian's dataset-fashion-mnist (for research.evaluate's classifier and FID)
#           and the CPU's cached scoring classifier.
# Both folders are ignored by git (.git/info/exclude). Then, with the device tool:
#   run(command="bash bench/gpu/run.sh", carry=[".whl", ".data"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/../.."
for d in /.whl/ /.data/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .whl && mkdir -p .whl .data
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
# The versions this project is tested with (pip list on the CPU machine, 2026-11-27).
PACKAGES=(diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4
          pydantic-core pydantic-settings==2.14.1 python-dotenv==1.2.2 annotated-types==0.7.0
          typing-inspection==0.4.2 typing-extensions==4.16.0 importlib-metadata==10.2.0 annotated-doc==0.0.7
          opentelemetry-api==1.45.2 lazy-importer==0.1.0 zipp==4.1.2)
# pydantic-core's version is the one pydantic pins.
core=$(python3 - <<'PY'
import importlib.metadata as m
print(m.version("pydantic_core"))
PY
)
PACKAGES=("${PACKAGES[@]/pydantic-core/pydantic-core==$core}")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${PACKAGES[@]}"
# Every requirement of a carried wheel (for Python 3.12) is carried too or in the device image's package list
# (/work/.library/device/KINDS.md, "Python packages already there"): a missing one fails there, at import.
python3 - <<'PY'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
kinds = Path("/work/.library/device/KINDS.md")
image = set()
if kinds.exists():
    m = re.search(r"Packages: (.*)\.", kinds.read_text())
    image = {canon(n.strip()) for n in m.group(1).split(",")} if m else set()
wheels = {canon(w.name.split("-")[0]): w for w in Path(".whl").glob("*.whl")}
missing = []
for name, w in wheels.items():
    meta = next(n for n in zipfile.ZipFile(w).namelist() if n.endswith(".dist-info/METADATA"))
    for line in zipfile.ZipFile(w).read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            env = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
            if req.marker is None or req.marker.evaluate(env):
                if canon(req.name) not in wheels and canon(req.name) not in image:
                    missing.append(f"{name} needs {req}")
if image and missing:
    sys.exit("carried wheels need packages neither carried nor in the device image: " + "; ".join(missing))
print("requirements of the carried wheels: all carried or in the image" if image else "KINDS.md not found: unchecked")
PY
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null
fi
cp /usr/share/datasets/fashion-mnist/*.gz .data/
# The CPU's scoring classifier (trained once by research.evaluate), so the GPU's accuracy and FID use the same one.
classifier=~/.cache/cfg-serve/classifier.safetensors
[ -f $classifier ] || python3 -m research.evaluate --scales 1 --per-class 2 --report /tmp/prep.md --json /tmp/prep.json --img-dir /tmp/prep-img >/dev/null
cp $classifier .data/
du -sh .whl .data
