"""Host-to-device copies that do not wait for the device, and what a device holds.

A plain `tensor.to("cuda")` from pageable host memory synchronizes the stream after the copy: it waits for
every kernel already queued, forwards included. A request's sampler state is built in the event loop's
thread while the engine's thread keeps the GPU busy, so each such copy held the event loop for up to a
tick, and requests were admitted at the GPU's pace (docs/benchmarks.md, the second H200 run). Copied from
pinned memory without blocking, the copy is queued on the stream in order, before any kernel queued after it
that reads the tensor, and the host goes on at once. The pinned buffer is PyTorch's caching host allocator's,
held until the copy is done.
"""

from __future__ import annotations

import resource
import sys

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The host tensor on the device: queued without a sync on CUDA, a plain .to() anywhere else."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def memory_in_use(device: torch.device) -> dict[str, float]:
    """Bytes by kind, for the device-memory gauge: torch's allocated and reserved on CUDA; on the CPU, where the
    model lives in host memory, this process's peak resident set (max_rss). Read in the process that holds the
    models (the engine process's is sent to the API's with CFG_ENGINE_PROCESS)."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
    return {"max_rss": peak_resident_bytes()}


def peak_resident_bytes() -> float:
    """This process's peak resident set: Linux's VmHWM, which starts afresh at exec; getrusage's ru_maxrss keeps
    the peak of the process it was forked from (a spawned engine process would report its parent's), so it is only
    the fallback where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
