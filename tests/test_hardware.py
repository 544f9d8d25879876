"""`compute_dtype: auto` (docs/METHODS.md, QLoRA, "Compute dtype on CPU"): bf16 on CUDA and on CPUs with
native bf16, fp32 elsewhere; the choice and the capability it came from are stated in the record."""

from __future__ import annotations

import pytest
import torch

from peftbench import hardware
from peftbench.methods import build_method


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(hardware, "cuda_bf16", lambda: False)
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Test CPU")
    return monkeypatch


@pytest.mark.parametrize(
    ("flags", "expected", "named"),
    [
        ({"avx2", "avx512f"}, "float32", "no native bf16"),
        ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16", "avx512_bf16"),
        ({"amx_bf16", "amx_tile"}, "bfloat16", "amx_bf16"),
        ({"fp", "asimd", "bf16"}, "bfloat16", "bf16"),  # Arm
    ],
)
def test_auto_picks_bf16_only_where_the_cpu_computes_it_natively(
    cpu_only: pytest.MonkeyPatch, flags: set[str], expected: str, named: str
) -> None:
    cpu_only.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    method = build_method({"name": "qlora"})
    assert method.compute_dtype == "auto"
    facts = method.describe()
    assert facts["compute_dtype_used"] == expected and named in facts["compute_dtype_why"]
    assert "Test CPU" in facts["compute_dtype_why"]
    assert method.torch_compute_dtype == getattr(torch, expected)
    assert facts["compute_dtype"] == "auto"  # the config stays what the user asked for


def test_cuda_means_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cuda_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Test GPU")
    assert hardware.auto_bf16_or_fp32() == ("bfloat16", "CUDA device Test GPU computes bf16 natively")


def test_an_explicit_dtype_is_kept_and_said_so(cpu_only: pytest.MonkeyPatch) -> None:
    cpu_only.setattr(hardware, "cpu_flags", lambda: frozenset())
    facts = build_method({"name": "qlora", "compute_dtype": "bfloat16"}).describe()
    assert facts["compute_dtype_used"] == "bfloat16" and "method.compute_dtype" in facts["compute_dtype_why"]


def test_this_machine_is_described_consistently() -> None:
    hardware.cpu_flags.cache_clear()
    native = hardware.native_bf16_flags()
    chosen, _ = hardware.auto_bf16_or_fp32()
    if not hardware.cuda_bf16():
        assert (chosen == "bfloat16") == bool(native)
    assert set(hardware.notable_cpu_flags()) == set(hardware.NOTABLE_FLAGS)
