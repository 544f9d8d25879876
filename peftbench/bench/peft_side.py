"""HF PEFT's implementation of each peftbench method, built on the same base model for the benchmark.

| peftbench | HF PEFT (0.21) |
|---|---|
| lora | `LoraConfig` (same r, alpha, dropout, rslora, targets) + AdamW |
| lora_fa | the same `LoraConfig` + `peft.optimizers.create_lorafa_optimizer` (freezes A, preconditions B) |
| lora_plus | the same `LoraConfig` + `peft.optimizers.create_loraplus_optimizer(AdamW)` |
| vera | `VeraConfig` (same r, d_initial, dropout, projection seed, targets) + AdamW |
| qlora | transformers `BitsAndBytesConfig` (nf4, double quant, same compute dtype) + `LoraConfig` + AdamW |
| full | the plain transformers model, every parameter trains, AdamW |
| delta_lora, others | no peer: PEFT has no Delta-LoRA (`NoPeer`) |

PEFT's side computes its loss as users do: ``model(input_ids, attention_mask, labels=labels).loss``, i.e.
full `(batch, length, vocab)` logits and transformers' causal-LM loss. Its adapters keep PEFT's defaults
(`autocast_adapter_dtype=True`: fp32 adapters on a bf16 base).
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: what the PEFT side's loss is, stated in the output
LOSS_PATH = (
    "model(input_ids, attention_mask, labels=labels).loss: full (batch, length, vocab) logits, "
    "transformers' causal-LM cross-entropy over the labelled positions"
)

Batch = dict[str, torch.Tensor]


class NoPeer(Exception):
    """HF PEFT has no implementation of this method (or it cannot run here); the message says why."""


@dataclass
class BuildContext:
    """What both sides are built with: device, dtype and optimizer hyper-parameters."""

    device: torch.device
    dtype: torch.dtype
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    gradient_checkpointing: bool
    #: a directory holding the base model as `save_pretrained` writes it (for QLoRA's quantized load)
    pretrained_dir: Callable[[], Path]


@dataclass
class Trainee:
    """One implementation of one method, ready to train: the model, its optimizer and its loss."""

    impl: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[Batch], torch.Tensor]
    loss_path: str
    after_step: Callable[[int], None] = lambda step: None
    notes: list[str] = field(default_factory=list)

    def trainable(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        found = []
        for param in self.model.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                found.append(param)
        return found


def peft_version() -> str | None:
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def hf_loss(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    def loss(batch: Batch) -> torch.Tensor:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
        return out.loss

    return loss


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer: what `model.gradient_checkpointing`
    does in a run (`peftbench.models.loading.enable_gradient_checkpointing`), the same on both sides."""
    from peftbench.models.loading import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)


def _adamw(params: list[nn.Parameter] | list[dict[str, Any]], ctx: BuildContext) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=ctx.lr, betas=ctx.betas, eps=ctx.eps, weight_decay=ctx.weight_decay)


def _targets(method: Any) -> str | list[str]:
    targets = method.target_modules
    return targets if isinstance(targets, str) else list(targets)


def _lora_config(method: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        use_rslora=method.rslora,
        target_modules=_targets(method),
        task_type="CAUSAL_LM",
    )


def _copy_base(base: nn.Module, ctx: BuildContext) -> nn.Module:
    model = copy.deepcopy(base).to(device=ctx.device, dtype=ctx.dtype)
    if ctx.gradient_checkpointing:
        enable_checkpointing(model)
    return model.train()


def _peft_model(base: nn.Module, config: Any) -> nn.Module:
    from peft import get_peft_model

    model = get_peft_model(base, config)
    return model.train()


def _trainee(model: nn.Module, optimizer: torch.optim.Optimizer, notes: list[str]) -> Trainee:
    return Trainee("peft", model, optimizer, hf_loss(model), LOSS_PATH, notes=notes)


def build_lora(method: Any, base: nn.Module, ctx: BuildContext) -> Trainee:
    model = _peft_model(_copy_base(base, ctx), _lora_config(method))
    params = [p for p in model.parameters() if p.requires_grad]
    return _trainee(model, _adamw(params, ctx), ["LoraConfig + torch AdamW"])


def build_lora_fa(method: Any, base: nn.Module, ctx: BuildContext) -> Trainee:
    try:
        from peft.optimizers import create_lorafa_optimizer
    except ImportError as err:  # older PEFT
        raise NoPeer(f"peft {peft_version()} has no peft.optimizers.create_lorafa_optimizer") from err
    model = _peft_model(_copy_base(base, ctx), _lora_config(method))
    optimizer = create_lorafa_optimizer(
        model, r=method.r, lora_alpha=method.alpha, lr=ctx.lr, weight_decay=ctx.weight_decay
    )
    notes = [
        "LoraConfig + create_lorafa_optimizer (A frozen by requires_grad=False; B's gradient "
        "preconditioned by (A A^T)^-1 inside its optimizer)"
    ]
    return _trainee(model, optimizer, notes)


def build_lora_plus(method: Any, base: nn.Module, ctx: BuildContext) -> Trainee:
    from peft.optimizers import create_loraplus_optimizer

    model = _peft_model(_copy_base(base, ctx), _lora_config(method))
    optimizer = create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=ctx.lr,
        loraplus_lr_ratio=method.lr_ratio,
        loraplus_weight_decay=ctx.weight_decay,
        betas=ctx.betas,
        eps=ctx.eps,
    )
    return _trainee(model, optimizer, ["LoraConfig + create_loraplus_optimizer(torch AdamW)"])


def build_vera(method: Any, base: nn.Module, ctx: BuildContext) -> Trainee:
    from peft import VeraConfig

    config = VeraConfig(
        r=method.r,
        target_modules=_targets(method),
        vera_dropout=method.dropout,
        d_initial=method.d_initial,
        projection_prng_key=method.projection_seed,
        save_projection=True,
        task_type="CAUSAL_LM",
    )
    model = _peft_model(_copy_base(base, ctx), config)
    params = [p for p in model.parameters() if p.requires_grad]
    return _trainee(model, _adamw(params, ctx), ["VeraConfig + torch AdamW"])


def build_qlora(method: Any, base: nn.Module, ctx: BuildContext) -> Trainee:
    try:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError as err:
        raise NoPeer(f"transformers cannot build a BitsAndBytesConfig here: {err}") from err
    compute_dtype = method.torch_compute_dtype
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    notes = [
        f"BitsAndBytesConfig({method.quant_type}, double_quant={method.double_quant}, "
        f"compute {method.compute_dtype}) via from_pretrained + LoraConfig + torch AdamW"
    ]
    if method.blocksize != 64:
        notes.append(f"blocksize differs: transformers always uses 64, peftbench {method.blocksize}")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            str(ctx.pretrained_dir()),
            quantization_config=quantization,
            dtype=ctx.dtype,
            device_map={"": str(ctx.device)},
            local_files_only=True,
        )
    except Exception as err:  # e.g. bitsandbytes without a backend for this device
        detail = " ".join(str(err).split())[:200]
        raise NoPeer(f"PEFT QLoRA could not load a 4-bit model on {ctx.device}: {detail}") from err
    # The same bitsandbytes CPU trap as peftbench's (docs/METHODS.md, QLoRA): keep both on the same kernels.
    repack_off = 0
    for module in quantized.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            repack_off += 1
    if repack_off:
        notes.append("support_avx512bf16_for_cpu=False on every Linear4bit, as peftbench does")
    if ctx.device.type == "cpu" and copy_out_of_file(quantized):
        notes.append(
            "tensors still backed by the mmapped safetensors file copied to ordinary memory (the file's "
            "page cache would otherwise count in the CPU resident set)"
        )
    if ctx.gradient_checkpointing:
        enable_checkpointing(quantized)
    model = _peft_model(quantized, _lora_config(method))
    params = [p for p in model.parameters() if p.requires_grad]
    return _trainee(model, _adamw(params, ctx), notes)


def copy_out_of_file(model: nn.Module) -> int:
    """Copy every full-precision parameter and buffer into its own memory; returns how many.

    `from_pretrained` on CPU can leave tensors (e.g. a tied embedding) as views of the mmapped checkpoint,
    which keeps the whole file mapped and resident: the CPU peak (VmHWM) would count the page cache of a
    file that peftbench's side never maps. 4-bit packed weights are left alone (already their own copy).
    """
    copied = 0
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if type(param).__name__ != "Params4bit":
                    param.data = param.data.clone()
                    copied += 1
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
                    copied += 1
    return copied


def build_full(method: Any, base: nn.Module, ctx: BuildContext) -> Trainee:
    model = _copy_base(base, ctx)
    model.requires_grad_(True)
    params = list(model.parameters())  # tied weights appear once
    return _trainee(model, _adamw(params, ctx), ["plain transformers model, every parameter trains"])


PEERS: dict[str, Callable[[Any, nn.Module, BuildContext], Trainee]] = {
    "lora": build_lora,
    "lora_fa": build_lora_fa,
    "lora_plus": build_lora_plus,
    "vera": build_vera,
    "qlora": build_qlora,
    "full": build_full,
}
"""peftbench method name -> builder of HF PEFT's equivalent."""

NO_PEER_REASONS = {"delta_lora": "HF PEFT has no Delta-LoRA"}


def build_peft(method: Any, base: nn.Module, ctx: BuildContext) -> Trainee:
    """HF PEFT's implementation of `method` on a fresh copy of `base`; `NoPeer` when there is none."""
    builder = PEERS.get(method.name)
    if builder is None:
        reason = NO_PEER_REASONS.get(method.name, f"the benchmark has no HF PEFT peer for {method.name}")
        raise NoPeer(reason)
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise NoPeer("HF PEFT is not installed (pip install peft)") from err
    return builder(method, base, ctx)
