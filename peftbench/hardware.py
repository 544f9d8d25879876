"""What the machine can do: the CPU's model name and flags, and whether it computes bf16 natively.

bf16 on a CPU without native support (x86 without AVX512-BF16 or AMX, Arm without BF16) is emulated and
10-100x slower; bitsandbytes' 4-bit CPU path then crawls (docs/METHODS.md, QLoRA, "Compute dtype on CPU").
`auto` dtype choices and the records' environment read these facts from here.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

#: CPU flags (as /proc/cpuinfo names them) that give native bf16 arithmetic
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
#: CPU flags worth stating in a record (they decide which kernels run)
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16", "sve")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo `flags` or Arm `Features`; macOS: sysctl)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in {"flags", "Features"}:
                return frozenset(value.split())
        return frozenset()
    if platform.system() == "Darwin":  # Apple silicon: FEAT_BF16 from M2 on
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            )
            return frozenset({"bf16"}) if out.stdout.strip() == "1" else frozenset()
        except (OSError, subprocess.SubprocessError):
            return frozenset()
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (`model name` in /proc/cpuinfo), or what `platform` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or platform.machine()


def native_bf16_flags() -> list[str]:
    """The flags that give this CPU native bf16 (empty: bf16 is emulated)."""
    flags = cpu_flags()
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def notable_cpu_flags() -> dict[str, bool]:
    """Which of `NOTABLE_FLAGS` this CPU has."""
    flags = cpu_flags()
    return {flag: flag in flags for flag in NOTABLE_FLAGS}


def cuda_bf16() -> bool:
    """A CUDA device that computes bf16 natively is available."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def auto_bf16_or_fp32() -> tuple[str, str]:
    """``("bfloat16" | "float32", why)``: bf16 on CUDA and on CPUs with native bf16, fp32 otherwise."""
    if cuda_bf16():
        import torch

        return "bfloat16", f"CUDA device {torch.cuda.get_device_name(0)} computes bf16 natively"
    native = native_bf16_flags()
    if native:
        return "bfloat16", f"CPU {cpu_model()!r} has native bf16 ({', '.join(native)})"
    return "float32", (
        f"CPU {cpu_model()!r} has no native bf16 (no avx512_bf16, amx_bf16 or Arm bf16): bf16 would be "
        "emulated, 10-100x slower"
    )
