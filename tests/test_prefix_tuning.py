"""Prefix tuning (Li & Liang 2021) against HF PEFT 0.21.2's PrefixTuningConfig on copied weights.

P' and the MLP's input are d_kv = n_kv x head_dim wide, as PEFT's (`token_dim`; METHODS.md): on a model
without grouped-query attention d_kv is the hidden size d, under GQA (`tiny_llama`: 4 query, 2 key/value
heads) it is smaller. PEFT runs with `prefix_projection=True` and our P' and MLP copied in, on both kinds of
model. Tolerances are fp32 (1e-5).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.methods.io import load_adapter, save_adapter
from peftbench.methods.prefix_tuning import PrefixEncoder
from tests.helpers import tiny_llama, token_batch
from tests.virtual_token_checks import (
    PEFT_CONFIG_KEYS,
    apply_method,
    bert_batch,
    check_disabled_gives_the_base_model,
    check_fp32_trainables_on_bf16_model,
    check_generation_matches_peft,
    check_logits_match_peft,
    check_loss_with_labels,
    check_peft_export_loads_in_peft,
    right_padded,
    tiny_bert_classifier,
    trained_gradients,
)

peft = pytest.importorskip("peft")
P = 5


def tiny_mha(seed: int = 0) -> LlamaForCausalLM:
    """tiny_llama's shape without grouped-query attention (4 key/value heads), so d_kv = d."""
    return tiny_llama(seed=seed, tie=False, kv_heads=4)


def applied(base: torch.nn.Module, **hyper: int) -> tuple[torch.nn.Module, object, PrefixEncoder]:
    return apply_method(base, {"name": "prefix_tuning", "num_virtual_tokens": P, **hyper}, PrefixEncoder)


def peft_reference(base: torch.nn.Module, p: int = P, encoder_hidden_size: int = 512) -> torch.nn.Module:
    """PEFT's prefix tuning with the MLP (`prefix_projection=True`) on a copy of `base`."""
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=p,
        prefix_projection=True,
        encoder_hidden_size=encoder_hidden_size,
    )
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def peft_copy(base: torch.nn.Module, layer: PrefixEncoder) -> torch.nn.Module:
    """PEFT (prefix_projection=True) with our P' and MLP copied in."""
    model = peft_reference(base, layer.num_virtual_tokens, layer.transform[0].out_features)
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(layer.embedding)
        encoder.transform.load_state_dict(layer.transform.state_dict())
    return model


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("make_base", [tiny_mha, tiny_llama], ids=["mha", "gqa"])
def test_logits_match_peft(make_base) -> None:
    base = make_base()
    model, _, layer = applied(base)
    d_kv = base.config.num_key_value_heads * 8  # head_dim 8
    assert layer.embedding.shape == (P, d_kv)  # P' is (p, d_kv): narrower than d = 32 under GQA
    assert layer.transform[0].in_features == d_kv
    assert layer.prefixes().shape == (P, 2 * 2 * d_kv)  # (p, 2 L d_kv)
    check_logits_match_peft(base, model, peft_copy(base, layer), offset=0)


@pytest.mark.parametrize("p", [P, 20])
@pytest.mark.parametrize("hidden", [32, 64], ids=["tests-tiny-llama", "conf-tiny-llama"])
def test_trainable_count_equals_peft_under_grouped_query_attention(hidden: int, p: int) -> None:
    """GQA (4 query, 2 key/value heads): P' (p, d_kv) and the MLP (d_kv -> 512 -> 2 L d_kv) count as PEFT's.
    With hidden 64 this is `model=tiny_llama`'s shape: 82,720 at p = 5 and 83,200 at p = 20 (a P' and an MLP
    input of width d = 64 made it 99,264 and 100,224)."""
    base = tiny_llama(hidden=hidden, intermediate=2 * hidden)
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    model, _, layer = applied(base, num_virtual_tokens=p)
    d_kv = base.config.num_key_value_heads * hidden // base.config.num_attention_heads
    layers = base.config.num_hidden_layers
    expected = p * d_kv + (d_kv + 1) * 512 + (512 + 1) * 2 * layers * d_kv
    assert trainable_count(model) == trainable_count(peft_reference(base, p=p)) == expected
    if hidden == 64:
        assert expected == {5: 82_720, 20: 83_200}[p]
    # and the logits are PEFT's with the same P' and MLP
    check_logits_match_peft(base, model, peft_copy(base, layer), offset=0)


def test_loss_with_labels_equals_the_hand_computation() -> None:
    base = tiny_mha()
    model, _, layer = applied(base)
    check_loss_with_labels(model, peft_copy(base, layer), offset=0)


def test_generation_matches_peft_and_ignores_left_padding() -> None:
    """Cached `generate` (the prefixes prefilled into generate's cache) == greedy decoding by PEFT's forward.
    (PEFT 0.21.2's own `generate` under transformers 5.24 passes its prefix as `past_key_values` beside
    generate's `cache` and loses it: its output is the base model's, so it is no oracle.)"""
    check_generation_matches_peft(tiny_mha(seed=3), applied, peft_copy)


def test_disabled_gives_the_base_model() -> None:
    check_disabled_gives_the_base_model(tiny_llama(), applied)


def test_gradients_reach_only_the_prefix_parameters() -> None:
    model, _, _ = applied(tiny_llama())
    grads = trained_gradients(model)
    expected = ["model.prefix_tuning.embedding"] + [
        f"model.prefix_tuning.transform.{i}.{kind}" for i in (0, 2) for kind in ("bias", "weight")
    ]
    assert sorted(grads) == expected
    assert all(grad.abs().sum() > 0 for grad in grads.values())


def test_adapter_file_keeps_only_the_prefixes(tmp_path: Path) -> None:
    base = tiny_llama()
    model, method, layer = applied(base)
    assert set(method.adapter_state_dict(model)) == {
        f"model.prefix_tuning.{n}" for n, _ in layer.named_parameters()
    }
    assert set(method.final_state_dict(model)) == {"model.prefix_tuning.prefix"}
    path = save_adapter(model, method, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    loaded = next(m for m in fresh.modules() if isinstance(m, PrefixEncoder))
    assert not loaded.reparameterised and [n for n, _ in loaded.named_parameters()] == ["prefix"]
    ids, mask = right_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )
        # the checkpoint form (P' and the MLP) still loads, to go on training
        other, other_method, _ = applied(base)
        other_method.load_adapter_state_dict(other, method.adapter_state_dict(model))
        torch.testing.assert_close(
            other(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )


def test_peft_export_loads_in_peft(tmp_path: Path) -> None:
    base = tiny_llama()
    model, method, _ = applied(base)
    config, tensors = method.peft_export(model)
    reference = peft_reference(base)
    assert {k: v.shape for k, v in tensors.items()} == {
        k: v.shape for k, v in peft.get_peft_model_state_dict(reference).items()
    }
    own = reference.peft_config["default"].to_dict()
    keys = (*PEFT_CONFIG_KEYS, "prefix_projection", "encoder_hidden_size")
    check_peft_export_loads_in_peft(base, model, (config, tensors), own, tmp_path, offset=0, keys=keys)


def test_encoder_classifier_trains_prefixes() -> None:
    """BERT (bidirectional, learned positions): PEFT 0.21.2 refuses prefix tuning there under transformers
    5.24 (it looks for `past_key_values`), so the checks are structural: padding invariance, disabling,
    gradients."""
    base = tiny_bert_classifier()
    model, method, _ = applied(base, num_virtual_tokens=4)
    ids, mask = bert_batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    alone = model(input_ids=ids[1:, :5], attention_mask=mask[1:, :5]).logits
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=0)
    with torch.no_grad(), method.disabled(model):
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits
        )
    assert (logits - base(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-4
    logits.sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in model.named_parameters() if n.startswith("bert.prefix_tuning.")
    }


def test_refuses_gradient_checkpointing() -> None:
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        build_method({"name": "prefix_tuning"}).apply(model)
    later, _, _ = applied(tiny_llama())  # switched on after apply: refused at the first training step
    later.gradient_checkpointing_enable()
    later.train()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        later(token_batch())


def test_refuses_sliding_window_attention() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        sliding_window=4,
    )
    with pytest.raises(ConfigError, match="sliding-window"):
        build_method({"name": "prefix_tuning"}).apply(MistralForCausalLM(config))


@pytest.mark.parametrize(
    ("key", "value"), [("num_virtual_tokens", 0), ("encoder_hidden_size", -3), ("num_virtual_tokens", 1.5)]
)
def test_bad_hyperparameters(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        build_method({"name": "prefix_tuning", key: value})


def test_trainable_tensors_are_fp32_on_a_bf16_model() -> None:
    """P' and the MLP: float32 on a bf16 model, cast to bf16 in the forward; one AdamW step moves them all."""
    check_fp32_trainables_on_bf16_model(applied)
