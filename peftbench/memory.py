"""Peak-memory probes: the CUDA allocator on GPU, the process high-water mark (VmHWM) on CPU."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    """Start a new peak-measurement window (the model's load and evaluation stay outside it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        with contextlib.suppress(OSError):
            clear_refs.write_text("5")  # Linux: reset the peak resident set size to the current one


def peak_bytes(device: torch.device) -> int:
    """Peak bytes since the last `reset_peak` (CUDA: allocated tensors; CPU: resident set size)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
