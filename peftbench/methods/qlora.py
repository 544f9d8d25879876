"""QLoRA: LoRA on a frozen 4-bit NormalFloat base (Dettmers et al. 2023, arXiv 2305.14314).

Sec. 3: the base linear layers are stored in NF4 (blocksize 64) with double quantization of the absmax
constants and are dequantized to the compute dtype (bf16) for every matmul; LoRA adapters (fp32 master
weights, cast to the compute dtype in the forward) sit on ALL linear layers of the blocks. lm_head,
embeddings and norms stay full precision. ``compute_dtype: auto`` (the default) is bf16 on CUDA and on CPUs
with native bf16, fp32 elsewhere (emulated bf16 makes the 4-bit CPU kernels 10-100x slower); the record
states the choice and the capability it came from (`describe`). Quantization uses bitsandbytes'
``Linear4bit``; the LoRA part is `peftbench.methods.lora` unchanged.

Export: `LoRA.peft_export` unchanged, a PEFT LORA adapter (PEFT's QLoRA is a LoRA config over a base loaded
with ``BitsAndBytesConfig(load_in_4bit=True, ...)``); it loads on the 4-bit base it trained on, or on the
full-precision base (then without the quantization error the adapter was trained against).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from peftbench import hardware
from peftbench.errors import ConfigError, bad_value
from peftbench.methods.lora import LoRA
from peftbench.methods.registry import register
from peftbench.methods.walker import find_targets, linear_layer_names, replace_module

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
#: `compute_dtype` values: a dtype, or `auto` (bf16 where the device computes it natively, else fp32)
COMPUTE_DTYPE_CHOICES = ("auto", *COMPUTE_DTYPES)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as err:  # pragma: no cover - bitsandbytes is a dependency, but may fail to load
        raise ConfigError(f"method=qlora needs bitsandbytes, which failed to import ({err})") from None
    return bnb


def disable_cpu_repack(layer: nn.Module) -> None:
    """Keep a Linear4bit on the autograd-aware kernel path on CPU.

    bitsandbytes 0.50.2 on an AVX512-BF16 CPU repacks the weight in place on the first eval-mode forward
    whose input needs no grad, and from then on uses `gemv_4bit`, which has no autograd kernel: backward
    then sends no gradient through the base layer (adapters upstream get none, or a wrong one). The repack
    also breaks `dequantize_4bit` (and so merging). See docs/METHODS.md, QLoRA, "CPU trap".
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def reference_dequantize_4bit(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """What bitsandbytes' ``dequantize_4bit`` must return, in plain torch (fp32): two 4-bit codes per
    byte (high nibble first) over the flattened weight, one absmax per `blocksize` consecutive values,
    the absmax itself 8-bit quantized per `state2.blocksize` values plus `offset` with double quant."""
    numel = math.prod(quant_state.shape)
    flat = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel].long()
    values = quant_state.code.float()[codes]
    absmax = quant_state.absmax
    if quant_state.nested:
        state2 = quant_state.state2
        scaled = state2.code.float()[absmax.long()]
        absmax = _per_block(scaled, state2.absmax.float(), state2.blocksize) + quant_state.offset
    return _per_block(values, absmax.float(), quant_state.blocksize).reshape(quant_state.shape)


def _per_block(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] * scales[i // blocksize]`` (the last block may be partial)."""
    index = torch.arange(values.numel(), device=values.device) // blocksize
    return values * scales[index]


def check_dequantization(name: str, layer: nn.Module) -> None:
    """Refuse a 4-bit layer that bitsandbytes dequantizes wrongly.

    bitsandbytes 0.50.2's CPU NF4 dequantize kernel (the one every CPU forward uses) indexes the absmax
    blocks per row, while `quantize_4bit` blocks the flattened weight: when in_features is not a multiple
    of the blocksize (e.g. 32 with blocksize 64) the dequantized weight is silently wrong (errors of the
    order of the weights themselves). Checked once per layer at attach time, on every device.
    """
    weight = layer.weight
    expected = reference_dequantize_4bit(weight.data, weight.quant_state)
    got = _bnb().functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scale = expected.abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    if not torch.allclose(got, expected, rtol=1e-2, atol=1e-3 * float(scale)):
        state = weight.quant_state
        raise ConfigError(
            f"method=qlora: bitsandbytes {_bnb().__version__} dequantizes layer {name!r} (shape "
            f"{list(state.shape)}) wrongly on {weight.device.type} with method.blocksize={state.blocksize} "
            f"(its CPU kernel needs in_features divisible by the blocksize); accepted: a blocksize dividing "
            f"in_features={state.shape[-1]} (32 works on CPU), or a model whose in_features are multiples "
            f"of {state.blocksize}"
        )


def quantize_linear(
    layer: nn.Linear, compute_dtype: torch.dtype, double_quant: bool, quant_type: str, blocksize: int
) -> nn.Module:
    """A frozen ``bnb.nn.Linear4bit`` holding `layer`'s weights, quantized on the weights' device."""
    bnb = _bnb()
    weight = layer.weight
    device = weight.device
    # Built on "meta" so nn.Linear's random init of a full-size weight is skipped; every tensor is set below.
    quantized = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        compute_dtype=compute_dtype,  # explicit: bitsandbytes' default is None (follow the input)
        compress_statistics=double_quant,
        quant_type=quant_type,  # explicit: bitsandbytes' default is fp4
        quant_storage=torch.uint8,
        device="meta",
    )
    # Params4bit.to(device) on an unquantized tensor runs `_quantize(device)` (quantize_4bit on that device).
    quantized.weight = bnb.nn.Params4bit(
        weight.detach().contiguous(),
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=double_quant,
        blocksize=blocksize,
        quant_storage=torch.uint8,
        module=quantized,
    ).to(device)
    if layer.bias is not None:
        quantized.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    disable_cpu_repack(quantized)
    return quantized.train(layer.training)


@register
@dataclasses.dataclass
class QLoRA(LoRA):
    """LoRA (as `lora`) whose frozen base linear layers are 4-bit NF4 with double quantization."""

    name: ClassVar[str] = "qlora"
    mergeable: ClassVar[bool] = True  # merge = dequantize W0 + s B A (LoRALinear.merged)
    #: the 4-bit base is not the full-precision base: at init the model computes the *quantized* base
    #: model's function exactly (B = 0), not the original one.
    identity_at_init: ClassVar[bool] = False

    compute_dtype: str = "auto"
    double_quant: bool = True
    quant_type: str = "nf4"
    blocksize: int = 64

    def validate(self) -> None:
        super().validate()
        if self.compute_dtype not in COMPUTE_DTYPE_CHOICES:
            raise bad_value("method.compute_dtype", self.compute_dtype, COMPUTE_DTYPE_CHOICES)
        if self.quant_type not in QUANT_TYPES:
            raise bad_value("method.quant_type", self.quant_type, QUANT_TYPES)
        if self.blocksize not in BLOCKSIZES:
            raise bad_value("method.blocksize", self.blocksize, BLOCKSIZES)
        if not isinstance(self.double_quant, bool):
            raise bad_value("method.double_quant", self.double_quant, "true or false")

    def resolved_compute_dtype(self) -> tuple[str, str]:
        """``(dtype name, why)``: `compute_dtype` itself, or what `auto` picks on this machine (bf16 on CUDA
        and on CPUs with native bf16, fp32 elsewhere: emulated bf16 makes the 4-bit CPU path crawl;
        docs/METHODS.md, QLoRA, "Compute dtype on CPU")."""
        if self.compute_dtype != "auto":
            return self.compute_dtype, "set by method.compute_dtype"
        return hardware.auto_bf16_or_fp32()

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.resolved_compute_dtype()[0]]

    def describe(self) -> dict[str, Any]:
        """The hyper-parameters plus the compute dtype actually used and why (stated in every record)."""
        chosen, why = self.resolved_compute_dtype()
        return {**self.hyperparameters(), "compute_dtype_used": chosen, "compute_dtype_why": why}

    def quantize(self, model: nn.Module) -> None:
        """Store every linear layer of the blocks in 4 bits (not only the targeted ones: the whole frozen
        base is 4-bit in QLoRA; the output head, embeddings and norms stay full precision)."""
        bnb = _bnb()
        for name in linear_layer_names(model):
            layer = model.get_submodule(name)
            if isinstance(layer, bnb.nn.Linear4bit):  # already 4-bit (e.g. loaded with BitsAndBytesConfig)
                disable_cpu_repack(layer)
            elif type(layer) is nn.Linear:
                layer = quantize_linear(
                    layer, self.torch_compute_dtype, self.double_quant, self.quant_type, self.blocksize
                )
                replace_module(model, name, layer)
            else:
                raise ConfigError(
                    f"method=qlora cannot quantize layer {name!r} of type {type(layer).__name__}; "
                    "accepted: nn.Linear or bitsandbytes Linear4bit"
                )
            check_dequantization(name, layer)

    def attach(self, model: nn.Module) -> None:
        find_targets(model, self.target_modules)  # a bad selection fails before anything is quantized
        self.quantize(model)
        super().attach(model)  # LoRALinear keeps A, B in fp32 (`adapter_dtype`), cast in the forward
