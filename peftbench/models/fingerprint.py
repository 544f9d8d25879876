"""Which base model a run was trained on, by its weights, not its name: the check behind merging several
adapters (`peftbench.merging`) and using a reward model's run as a policy's reward (`peftbench.rl`)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

#: elements hashed per step by `base_fingerprint` (bounds the fp32 copy it makes)
FINGERPRINT_CHUNK = 1 << 22


def base_fingerprint(model: nn.Module) -> str:
    """A SHA-256 over the base model's state: every tensor's name, shape and values, a tied tensor once.

    Exact rather than sampled: two bases that differ in a few entries (a patched row, another revision of
    a checkpoint) differ in their task vectors' reference, and a sample of values can miss that; hashing
    costs about one more read of the weights, less than loading them. Floating tensors are hashed as their
    fp32 values (fp64 ones as fp64), so one checkpoint loaded in bf16 and in fp32 fingerprints alike when its
    values are the same, while a bf16 rounding of an fp32 checkpoint is a different base (its weights move
    by more than a typical task vector). Call it on the base as loaded, before a method changes it; the
    model config (e.g. RoPE's theta) is not part of it.
    """
    digest = hashlib.sha256()
    first_name: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first_name:  # tied: the same tensor under a second name
            digest.update(f"{name} = {first_name[id(tensor)]}\n".encode())
            continue
        first_name[id(tensor)] = name
        values = tensor.detach()
        canonical = values.is_floating_point() and values.element_size() <= 4
        kind = "float" if canonical else str(values.dtype)
        digest.update(f"{name} {kind} {tuple(values.shape)}\n".encode())
        flat = values.reshape(-1)
        for start in range(0, flat.numel(), FINGERPRINT_CHUNK):
            chunk = flat[start : start + FINGERPRINT_CHUNK].to("cpu", torch.float32 if canonical else None)
            digest.update(memoryview(chunk.contiguous().numpy()).cast("B"))
    return "sha256:" + digest.hexdigest()
