"""The machine and the libraries a run ran on (a record's `env`), taken when the run starts."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from peftbench.record import Env

VERSIONED_PACKAGES = ("torch", "lightning", "transformers", "datasets", "hydra-core", "bitsandbytes", "peft")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def environment() -> Env:
    """Host, device, CPU model and the flags that decide its kernels, torch's threads, the 1-minute load
    average and the logical CPUs it compares with (a busy machine runs slower), the GPU if any, the git
    commit and the library versions."""
    import torch

    from peftbench.hardware import cpu_model, notable_cpu_flags

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = None
    return Env(
        host=socket.gethostname(),
        device=gpu or platform.processor() or "cpu",
        cpu_threads=torch.get_num_threads(),
        git_commit=git_commit(),
        versions=versions(),
        cpu_model=cpu_model(),
        cpu_flags=notable_cpu_flags(),
        load_avg_1m=load,
        gpu=gpu,
        cpu_count=os.cpu_count(),
    )
