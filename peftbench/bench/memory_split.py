"""Peak memory of a training step, split into weights / gradients / optimizer state / activations.

- weights: `parameter_bytes(model)` (parameters and buffers, quantization statistics included);
- gradients: bytes of every parameter's ``.grad`` right after backward;
- optimizer state: bytes of the tensors in ``optimizer.state`` after a step;
- activations: bytes of the tensors autograd saves for backward during one forward, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` with each storage counted once and the model's own
  parameters and buffers left out (those are weights, already counted);
- peak: `peftbench.memory.peak_bytes` after `reset_peak` (the CUDA allocator, or the CPU process
  high-water mark VmHWM), minus what the process held before the method's model copy was built, so the
  peak is the model, its training state and its step's working memory, not the other models of the run.

On CPU, glibc may keep freed heap memory in the resident set; `release_cpu_memory` collects garbage and
trims the heap (malloc_trim) before every baseline, so one side's freed memory is not charged to the next.
The allocator is otherwise left as it is, so step times stay those of an ordinary process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftbench.memory import peak_bytes, reset_peak
from peftbench.models import parameter_bytes


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_cpu_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (before taking a baseline)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def current_bytes(device: torch.device) -> int:
    """Memory held now: allocated CUDA tensors, or the CPU process's resident set (VmRSS)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_source(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated (tensors only; the caching allocator reserves more)"
    return "process resident-set high-water mark (VmHWM), the whole process, all threads"


@dataclass
class MemoryWindow:
    """Baseline before a model copy is built, then a peak window over its training steps."""

    device: torch.device
    baseline: int = 0
    after_build: int = 0

    def start(self) -> None:
        """Call before building the model copy."""
        release_cpu_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        self.baseline = current_bytes(self.device)

    def built(self) -> None:
        """Call once the model and optimizer exist: the peak window starts here (loading and quantizing
        stay outside it)."""
        release_cpu_memory()
        self.after_build = current_bytes(self.device)
        reset_peak(self.device)

    def peak(self) -> dict[str, int]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        raw = peak_bytes(self.device)
        return {
            "peak_bytes": max(0, raw - self.baseline),
            "process_peak_bytes": raw,
            "baseline_bytes": self.baseline,
            "after_build_bytes": max(0, self.after_build - self.baseline),
        }


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
        return None
    nbytes = storage.nbytes()
    if nbytes == 0:
        return None
    return storage.data_ptr(), nbytes


def owned_storages(model: nn.Module) -> set[int]:
    """Data pointers of the model's parameters and buffers (and 4-bit quantization statistics)."""
    keys: set[int] = set()
    for tensor in _model_tensors(model):
        key = _storage_key(tensor)
        if key is not None:
            keys.add(key[0])
    return keys


def _model_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    for param in model.parameters():
        yield param
        quant_state = getattr(param, "quant_state", None)
        while quant_state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(quant_state, name, None)
                if isinstance(value, torch.Tensor):
                    yield value
            quant_state = getattr(quant_state, "state2", None)
    yield from model.buffers()


@dataclass
class SavedTensorBytes:
    """Bytes of the tensors autograd saves for backward while the context is open.

    Each storage counts once (views and tensors saved by several nodes share it); storages of `exclude`
    (the model's weights) are skipped. The hooks keep no reference to the tensors, so nothing is held
    longer than autograd itself holds it.
    """

    exclude: set[int] = field(default_factory=set)
    seen: dict[int, int] = field(default_factory=dict)
    weight_hits: int = 0

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is not None:
            ptr, nbytes = key
            if ptr in self.exclude:
                self.weight_hits += 1
            else:
                self.seen[ptr] = max(nbytes, self.seen.get(ptr, 0))
        return tensor

    @contextlib.contextmanager
    def recording(self) -> Iterator[SavedTensorBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


def grad_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of the gradients held by `params` (each tensor once)."""
    seen: set[int] = set()
    total = 0
    for param in params:
        grad = param.grad
        if grad is None or id(param) in seen:
            continue
        seen.add(id(param))
        total += grad.numel() * grad.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (moments, step counters; each storage once)."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            key = _storage_key(value)
            if key is None or key[0] in seen:
                continue
            seen.add(key[0])
            total += key[1]
    return total


def weight_bytes(model: nn.Module) -> int:
    return parameter_bytes(model)
