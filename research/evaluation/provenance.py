"""Where and when a result was measured: the machine, the commit and the date, for the reports."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from app.models import Manifest


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    device = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {threads} threads"
    if torch.cuda.is_available():
        device += f", GPU {torch.cuda.get_device_name()}"
    return f"{device}, Python {platform.python_version()}, {platform.system()}"


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (working tree had uncommitted changes)" if dirty else "")


def date_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_provenance(command: str, model_path: Path, manifest: Manifest) -> dict[str, Any]:
    """The fields every report records: the command, when, where, at which commit, with which weights."""
    return {
        "command": command,
        "date_utc": date_utc(),
        "machine": machine_description(),
        "git_commit": git_commit(),
        "checkpoint": str(model_path),
        "checkpoint_sha256": manifest.weights_sha256,
        "checkpoint_steps": manifest.training.get("steps_done"),
        "class_names": list(manifest.class_names),
    }
