"""QLoRA (docs/METHODS.md, "QLoRA"): a 4-bit NF4 double-quantized base under LoRA adapters."""

from __future__ import annotations

import copy
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from peftbench.errors import ConfigError
from peftbench.methods import build_method, qlora
from peftbench.methods.dense import base_weight
from peftbench.methods.lora import LoRALinear
from peftbench.methods.registry import method_config_file
from peftbench.methods.walker import linear_layer_names
from peftbench.models.params import count_parameters, parameter_bytes
from tests.helpers import clone_model, load_nf4, tiny_llama, token_batch

CONF = Path(__file__).resolve().parents[1] / "conf" / "method" / "qlora.yaml"


def yaml_config(**overrides) -> dict:
    return {**method_config_file(CONF), **overrides}


def apply_qlora(model: nn.Module, seed: int = 0, **overrides) -> tuple[nn.Module, object]:
    # bf16 compute unless a test says otherwise (the yaml's `auto` depends on the machine's CPU)
    method = build_method(yaml_config(**{"dropout": 0.0, "compute_dtype": "bfloat16", **overrides}))
    torch.manual_seed(seed)
    method.apply(model)
    return model, method


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def randomize_b(model: nn.Module, seed: int = 7) -> None:
    """B = 0 at init makes every A gradient zero by construction; a random B lets every adapter
    parameter receive a gradient (and makes the adapters change the output)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            values = torch.randn(layer.lora_B.shape, generator=generator) * 0.05
            layer.lora_B.copy_(values.to(layer.lora_B.dtype))


def llama64(bias: bool = False) -> LlamaForCausalLM:
    """tests.helpers.tiny_llama at hidden size 64: every block linear has in_features % 64 == 0 (which
    bitsandbytes' CPU kernels need at blocksize 64, see `qlora.check_dequantization`) and out % 32 == 0
    (with which its CPU repack, the gradient trap, actually runs instead of failing its own asserts)."""
    return tiny_llama(bias=bias, hidden=64, intermediate=128)


# ----- the quantized base ------------------------------------------------------------------------


def test_yaml_defaults_follow_the_paper() -> None:
    method = build_method(yaml_config())
    assert (method.compute_dtype, method.double_quant, method.quant_type, method.blocksize) == (
        "auto",
        True,
        "nf4",
        64,
    )
    assert method.hyperparameters()["name"] == "qlora"


def test_block_linears_become_nf4_double_quant_linear4bit_with_explicit_compute_dtype() -> None:
    model, _ = apply_qlora(llama64(bias=True))
    layers = lora_layers(model)
    assert len(layers) == 14  # 7 linears x 2 blocks
    for name, layer in layers.items():
        base = layer.base
        assert isinstance(base, bnb.nn.Linear4bit), name
        state = base.weight.quant_state
        assert isinstance(base.weight, bnb.nn.Params4bit) and base.weight.dtype == torch.uint8
        assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested  # double quant
        assert base.compute_dtype == torch.bfloat16 and base.compute_type_is_set
        assert base.support_avx512bf16_for_cpu is False  # the CPU repack trap is off
        assert not base.weight.requires_grad and not base.bias.requires_grad
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # fp32 masters, cast in forward
    # the output head, the embeddings and the norms stay full precision
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert all(
        norm.weight.dtype == torch.float32
        for norm in (model.model.norm, model.model.layers[0].input_layernorm)
    )


def test_untargeted_block_linears_are_quantized_too() -> None:
    """The whole frozen base is 4-bit in QLoRA; target_modules only chooses where adapters go."""
    model, _ = apply_qlora(llama64(), target_modules=["q_proj", "v_proj"])
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(model)} == {"q_proj", "v_proj"}
    quantized = [model.get_submodule(n) for n in linear_layer_names(model)]
    assert len(quantized) == 14 and all(isinstance(m, bnb.nn.Linear4bit) for m in quantized)
    assert all(m.support_avx512bf16_for_cpu is False for m in quantized)


def test_bfloat16_base_model() -> None:
    model, _ = apply_qlora(llama64().to(torch.bfloat16))
    layer = next(iter(lora_layers(model).values()))
    assert layer.base.weight.quant_state.dtype == torch.bfloat16
    assert model(token_batch()).logits.dtype == torch.bfloat16


def test_layers_that_bitsandbytes_dequantizes_wrongly_are_refused() -> None:
    """tiny_llama's hidden size 32 is below blocksize 64: bitsandbytes 0.50.2's CPU kernel dequantizes
    those layers wrongly. QLoRA must refuse them (not train on a corrupted base); blocksize 32 works."""
    torch.manual_seed(0)
    weight = torch.randn(32, 32)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = qlora.reference_dequantize_4bit(packed, state)
    if torch.allclose(bnbf.dequantize_4bit(packed, state), expected, atol=1e-5):
        apply_qlora(tiny_llama())  # this bitsandbytes dequantizes such layers right: nothing to refuse
    else:
        with pytest.raises(ConfigError, match=r"dequantizes layer .* wrongly"):
            apply_qlora(tiny_llama())
    model, _ = apply_qlora(tiny_llama(), blocksize=32)
    for layer in lora_layers(model).values():
        torch.testing.assert_close(
            base_weight(layer.base).float(),
            qlora.reference_dequantize_4bit(layer.base.weight, layer.base.weight.quant_state),
        )


@pytest.mark.parametrize(
    ("key", "value"), [("compute_dtype", "fp8"), ("quant_type", "int4"), ("blocksize", 48), ("r", 0)]
)
def test_bad_hyperparameters_are_config_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"method.{key}"):
        build_method(yaml_config(**{key: value}))


# ----- the CPU trap: gradients after a no-grad eval forward --------------------------------------


def _adapter_grads(model: nn.Module, eval_pass_first: bool) -> dict[str, torch.Tensor]:
    x = token_batch(vocab=128)
    if eval_pass_first:
        model.eval()
        with torch.no_grad():
            model(x)
    model.train()
    model(x, labels=x).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _trap_models(init_b: bool) -> tuple[nn.Module, nn.Module]:
    model, _ = apply_qlora(llama64())
    if init_b:
        randomize_b(model)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("init_b", [False, True], ids=["at_init", "trained_B"])
def test_every_adapter_gets_its_gradient_after_a_no_grad_eval_forward(init_b: bool) -> None:
    reference, model = _trap_models(init_b)
    expected = _adapter_grads(reference, eval_pass_first=False)
    got = _adapter_grads(model, eval_pass_first=True)
    for name, grad in got.items():
        is_a = name.endswith("lora_A")
        if is_a and not init_b:
            continue  # with B = 0, dL/dA = 0 by construction
        assert grad is not None and grad.abs().sum() > 0, f"{name} received no gradient"
        torch.testing.assert_close(grad, expected[name], atol=0, rtol=0, msg=name)


@pytest.mark.skipif(not bnbf.has_avx512bf16(), reason="bitsandbytes repacks only on AVX512-BF16 CPUs")
def test_the_trap_is_real_without_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Canary: without `disable_cpu_repack`, the same test loses gradients on this CPU (so the test above
    tests something). If this starts failing, bitsandbytes fixed the repack: revisit the workaround."""
    monkeypatch.setattr(qlora, "disable_cpu_repack", lambda layer: None)
    _, model = _trap_models(init_b=False)
    assert all(layer.base.support_avx512bf16_for_cpu for layer in lora_layers(model).values())
    got = _adapter_grads(model, eval_pass_first=True)
    lost = [n for n, g in got.items() if n.endswith("lora_B") and (g is None or g.abs().sum() == 0)]
    assert lost, "bitsandbytes no longer drops gradients after a no-grad eval pass"


# ----- numerics ----------------------------------------------------------------------------------


def _dequantized_lora_twin(qmodel: nn.Module, base: nn.Module) -> nn.Module:
    """`base` with LoRA (fp32) on every block linear, each base weight replaced by the dequantized
    NF4 weight of `qmodel`, and the same A, B as `qmodel`."""
    twin = clone_model(base)
    build_method({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}).apply(twin)
    twin_layers = lora_layers(twin)
    with torch.no_grad():
        for name, layer in lora_layers(qmodel).items():
            other = twin_layers[name]
            other.base.weight.copy_(base_weight(layer.base).float())
            other.lora_A.copy_(layer.lora_A.float())
            other.lora_B.copy_(layer.lora_B.float())
    return twin


def test_equals_lora_on_the_dequantized_weights() -> None:
    base = llama64(bias=True)
    qmodel, _ = apply_qlora(clone_model(base), r=4, alpha=8, compute_dtype="float32")
    randomize_b(qmodel)
    twin = _dequantized_lora_twin(qmodel, base)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x).logits, twin(x).logits, atol=1e-5, rtol=0)


def test_bfloat16_compute_is_close_to_the_fp32_computation() -> None:
    base = llama64()
    qmodel, _ = apply_qlora(clone_model(base), r=4, alpha=8)  # compute_dtype bfloat16
    randomize_b(qmodel)
    twin = _dequantized_lora_twin(qmodel, base)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x).logits, twin(x).logits, atol=3e-2, rtol=3e-2)


def test_close_to_full_precision_within_nf4_error() -> None:
    """NF4 changes the function: per weight, the error is at most half an NF4 step times the block absmax."""
    base = llama64()
    qmodel, method = apply_qlora(clone_model(base), compute_dtype="float32")
    for name, layer in lora_layers(qmodel).items():
        w0 = base.get_submodule(name).weight
        err = (base_weight(layer.base).float() - w0).abs().reshape(-1, 64)
        absmax = w0.abs().reshape(-1, 64).amax(dim=1, keepdim=True)
        assert (err <= 0.17 * absmax).all()  # widest NF4 gap (-1 to -0.696) is 0.304 -> half 0.152
    x = token_batch()
    with torch.no_grad():
        q, fp = qmodel(x).logits, base(x).logits
        assert (q - fp).abs().max() < 0.1 * fp.abs().max()
        with method.disabled(qmodel):  # B = 0 at init: exactly the quantized base
            torch.testing.assert_close(qmodel(x).logits, q, atol=0, rtol=0)


def test_matches_peft_on_a_transformers_bitsandbytes_4bit_model(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    base = llama64()
    base.save_pretrained(tmp_path)
    hf = peft.get_peft_model(
        load_nf4(tmp_path, device_map="cpu"),  # CPU repack off: same trap, same fix
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    ).eval()

    ours, _ = apply_qlora(clone_model(base), r=4, alpha=8, compute_dtype="float32")
    randomize_b(ours)
    peft_modules = dict(hf.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            theirs = peft_modules[name]
            # same quantization, bit for bit
            assert torch.equal(theirs.base_layer.weight.data, layer.base.weight.data), name
            theirs_state, our_state = theirs.base_layer.weight.quant_state, layer.base.weight.quant_state
            assert torch.equal(theirs_state.absmax, our_state.absmax) and theirs_state.nested
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
        assert set(lora_layers(ours)) == {n for n, m in peft_modules.items() if hasattr(m, "lora_A")}
        x = token_batch()
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-5, rtol=0)


# ----- counting and memory -----------------------------------------------------------------------


def test_true_parameter_counts() -> None:
    base = llama64()
    model, _ = apply_qlora(clone_model(base), r=4)
    lora = sum(4 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    packed = lora_layers(model)["model.layers.0.mlp.up_proj"].base.weight
    assert packed.numel() == 64 * 128 // 2  # numel() of a packed 4-bit tensor is half the count
    assert sum(p.numel() for p in model.parameters()) < count_parameters(base) + lora
    assert count_parameters(model) == count_parameters(base) + lora
    assert count_parameters(model, trainable_only=True) == lora


def test_4bit_weight_memory_is_about_4x_below_bf16() -> None:
    """Bytes stored (packed weight + absmax + double-quant statistics + codebooks) against bf16."""
    torch.manual_seed(0)
    big = nn.Linear(1024, 1024, bias=False)
    quantized = qlora.quantize_linear(big, torch.bfloat16, True, "nf4", 64)
    ratio = (1024 * 1024 * 2) / parameter_bytes(quantized)
    assert 3.8 < ratio < 4.0, ratio  # 4 bits + 8-bit absmax per 64 + fp32 per 256 absmax: ~3.87x

    model, _ = apply_qlora(llama64())
    bases = [layer.base for layer in lora_layers(model).values()]
    bf16_bytes = sum(2 * m.in_features * m.out_features for m in bases)
    tiny_ratio = bf16_bytes / sum(parameter_bytes(m) for m in bases)
    # the per-layer codebooks (1 KiB for the nested 8-bit code) weigh on 1k-weight layers
    assert tiny_ratio > 1.5, tiny_ratio


# ----- merging -----------------------------------------------------------------------------------


def test_merge_dequantizes_and_adds_the_update() -> None:
    model, method = apply_qlora(llama64(bias=True), r=4, compute_dtype="float32")
    randomize_b(model)
    layers = lora_layers(model)
    expected = {n: base_weight(m.base).float() + m.delta_weight().float() for n, m in layers.items()}
    x = token_batch()
    with torch.no_grad():
        before = model(x).logits
        method.merge(model)
        after = model(x).logits
    for name, weight in expected.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear and merged.bias is not None
        torch.testing.assert_close(merged.weight, weight, atol=0, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
