# syntax=docker/dockerfile:1
# cfg-serve image: the API server with the embedded Fashion-MNIST checkpoint.
#
#   docker build -t cfg-serve:gpu .                                  CUDA PyTorch (the default)
#   docker build --build-arg TORCH_FLAVOR=cpu -t cfg-serve:cpu .     CPU-only PyTorch, a much smaller image
#   docker run --gpus 1 -p 8000:8000 cfg-serve:gpu
#
# One container serves one GPU with one server process; run more containers for more GPUs.
# Mount another model_store over /srv/cfg/model_store and name its checkpoints in CFG_MODELS to serve them.
# The image also holds the default model's autoguidance guide (docs/autoguidance.md), served with
#   docker run ... -e CFG_MODELS=fashion-mnist-cfg,fashion-mnist-guide cfg-serve:gpu

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build: a virtual environment with torch and the runtime dependencies (the serve set: no test or research
# extras). It depends only on pyproject.toml and scripts/install.sh, so code changes don't reinstall torch.
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_FLAVOR=cuda
# Empty: the script's own choice, PyPI's CUDA build for cuda and PyTorch's CPU index for cpu (PyPI has no
# CPU build of torch for Linux).
ARG TORCH_INDEX_URL=
# pyproject.toml's extras the image serves with: fleet (redis) for CFG_JOB_STORE=redis://... (a shared job store).
ARG SERVE_EXTRAS=fleet
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHON=/opt/venv/bin/python
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
COPY scripts/install.sh scripts/install.sh
RUN TORCH_FLAVOR="$TORCH_FLAVOR" TORCH_INDEX_URL="$TORCH_INDEX_URL" SERVE_EXTRAS="$SERVE_EXTRAS" scripts/install.sh --deps

# Runtime: the environment, the code and the checkpoint; no compilers, no pip cache, not root.
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_FLAVOR=cuda
LABEL org.opencontainers.image.title="cfg-serve" \
      org.opencontainers.image.description="Class-conditional diffusion (classifier-free guidance) inference API" \
      cfg-serve.torch-flavor="${TORCH_FLAVOR}"
RUN groupadd --system --gid 10001 cfg \
 && useradd --system --uid 10001 --gid cfg --home-dir /home/cfg --create-home --shell /usr/sbin/nologin cfg
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CFG_MODEL_STORE=/srv/cfg/model_store \
    CFG_MODELS=fashion-mnist-cfg
WORKDIR /srv/cfg
# The checkpoints change less often than the code: their layers come first. The guide (2.5 MB) is not served
# by default: on a CPU it adds about 40% to the startup's warmup (docs/autoguidance.md); nor is the small DiT
# (8 MB), on which First-Block Cache is judged (docs/caching.md).
COPY model_store/fashion-mnist-cfg model_store/fashion-mnist-cfg
COPY model_store/fashion-mnist-guide model_store/fashion-mnist-guide
COPY model_store/fashion-mnist-dit model_store/fashion-mnist-dit
COPY app app
# Compiled now: the unprivileged user can't write __pycache__ next to the code at run time.
RUN python -m compileall -q app
USER 10001:10001
EXPOSE 8000
# Ready means loaded, warmed up and not draining. The port answers from the start (503 while loading);
# start-period keeps the loading, minutes with CFG_PRECISION=int8, from counting as failures.
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
# One process: it owns the model and its batching loop (exec form, so it gets SIGTERM and drains).
CMD ["python", "-m", "app.serve", "--host", "0.0.0.0", "--port", "8000"]
