"""Prefix tuning (Li & Liang 2021) against HF PEFT 0.21.2's PrefixTuningConfig on copied weights.

With `prefix_projection=True` PEFT's MLP input width is d_kv (it takes `token_dim` = n_kv x head_dim under
grouped-query attention), ours is the hidden size d (the paper's, METHODS.md): the two coincide on a model
without GQA, where P' and the MLP are copied; on `tiny_llama` (GQA) the prefixes themselves are copied into
PEFT with `prefix_projection=False`. Tolerances are fp32 (1e-5).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.methods.io import load_adapter, save_adapter
from peftbench.methods.prefix_tuning import PrefixEncoder
from peftbench.tasks.logprobs import response_logprobs
from peftbench.tasks.objectives import target_token_loss
from tests.helpers import tiny_llama, token_batch

peft = pytest.importorskip("peft")
P = 5


def tiny_mha(seed: int = 0) -> LlamaForCausalLM:
    """tiny_llama's shape without grouped-query attention (4 key/value heads), so d_kv = d."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
    )
    return LlamaForCausalLM(config).eval()


def applied(base: torch.nn.Module, **hyper: int) -> tuple[torch.nn.Module, object, PrefixEncoder]:
    model = copy.deepcopy(base)
    method = build_method({"name": "prefix_tuning", "num_virtual_tokens": P, **hyper})
    method.apply(model)
    return model, method, next(m for m in model.modules() if isinstance(m, PrefixEncoder))


def peft_copy(base: torch.nn.Module, layer: PrefixEncoder) -> torch.nn.Module:
    """PEFT with our P' and MLP (prefix_projection=True, MHA base) or our prefixes (projection off)."""
    projection = base.config.num_key_value_heads == base.config.num_attention_heads
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=P,
        prefix_projection=projection,
        encoder_hidden_size=layer.transform[0].out_features,
    )
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        if projection:
            encoder.embedding.weight.copy_(layer.embedding)
            encoder.transform.load_state_dict(layer.transform.state_dict())
        else:
            encoder.embedding.weight.copy_(layer.prefixes())
    return model


def right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = token_batch(batch=3, length=9)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, -5:] = 0
    return ids, mask


@pytest.mark.parametrize("make_base", [tiny_mha, tiny_llama], ids=["mha-projection", "gqa-prefixes"])
def test_logits_match_peft(make_base) -> None:
    base = make_base()
    model, _, layer = applied(base)
    assert layer.embedding.shape == (P, 32)  # P' is (p, d) also under GQA
    assert layer.prefixes().shape == (P, 2 * 2 * base.config.num_key_value_heads * 8)  # (p, 2 L d_kv)
    reference = peft_copy(base, layer)
    ids, mask = right_padded()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
        untuned = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - untuned).abs().max() > 1e-3


def test_loss_with_labels_equals_the_hand_computation() -> None:
    base = tiny_mha()
    model, _, layer = applied(base)
    reference = peft_copy(base, layer)
    ids, mask = right_padded()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=mask).logits
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        ours = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        theirs = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        task_loss, n_tokens = target_token_loss(model, ids, mask, labels)  # the tasks' hidden-state path
        logps, _ = response_logprobs(model, ids, mask, labels)
    for value in (ours, theirs, task_loss):
        torch.testing.assert_close(value, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(logps.sum(), -by_hand * n_tokens, atol=1e-4, rtol=0)


def generate(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation with the KV cache: the tokens and the logits of every step (steps, batch, vocab)."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits)


def greedy_without_cache(
    model: torch.nn.Module, ids: torch.Tensor, steps: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by full forward passes (no cache): the tokens and each step's last-position logits."""
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1])
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits)


def test_generation_matches_peft_and_ignores_left_padding() -> None:
    """Cached `generate` (the prefixes prefilled into generate's cache) == greedy decoding by PEFT's forward.
    (PEFT 0.21.2's own `generate` under transformers 5.24 passes its prefix as `past_key_values` beside
    generate's `cache` and loses it: its output is the base model's, so it is no oracle.)"""
    base = tiny_mha(seed=3)
    model, _, layer = applied(base)
    reference = peft_copy(base, layer)
    ids = token_batch(batch=2, length=6, seed=5)
    ours, our_logits = generate(model, ids, torch.ones_like(ids))
    theirs, their_logits = greedy_without_cache(reference, ids)
    _, base_logits = generate(base, ids, torch.ones_like(ids))
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(our_logits, their_logits, atol=1e-5, rtol=0)
    assert (our_logits - base_logits).abs().max() > 1e-3
    # left padding (as the summarization task generates): each row as if generated alone
    batch = torch.cat([ids[:1], torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids[1:, 3:]], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    padded, padded_logits = generate(model, batch, mask)
    alone, alone_logits = generate(model, ids[1:, 3:], torch.ones_like(ids[1:, 3:]))
    assert torch.equal(padded[0], ours[0]) and torch.equal(padded[1, 3:], alone[0])
    torch.testing.assert_close(padded_logits[:, 1], alone_logits[:, 0], atol=1e-5, rtol=0)


def test_disabled_gives_the_base_model() -> None:
    base = tiny_llama()
    model, method, _ = applied(base)
    ids, mask = right_padded()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=mask).logits
        with method.disabled(model) as reference:
            off = reference(input_ids=ids, attention_mask=mask).logits
            off_logps, _ = response_logprobs(reference, ids, mask, labels)  # DPO's reference path
        again = model(input_ids=ids, attention_mask=mask).logits
        base_logps, _ = response_logprobs(base, ids, mask, labels)
    torch.testing.assert_close(off, base(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    torch.testing.assert_close(off_logps, base_logps, atol=0, rtol=0)
    torch.testing.assert_close(again, tuned, atol=0, rtol=0)


def test_gradients_reach_only_the_prefix_parameters() -> None:
    model, _, _ = applied(tiny_llama())
    model.train()
    ids, mask = right_padded()
    loss, _ = target_token_loss(model, ids, mask, ids.masked_fill(mask == 0, -100))
    loss.backward()
    with_grad = sorted(name for name, p in model.named_parameters() if p.grad is not None)
    expected = ["model.prefix_tuning.embedding"] + [
        f"model.prefix_tuning.transform.{i}.{kind}" for i in (0, 2) for kind in ("bias", "weight")
    ]
    assert with_grad == expected
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


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
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=512
        ),
    )
    own = reference.peft_config["default"].to_dict()
    assert set(config) <= set(own)
    keys = ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers")
    for key in (*keys, "prefix_projection", "encoder_hidden_size"):
        assert config[key] == own[key], key
    assert {k: v.shape for k, v in tensors.items()} == {
        k: v.shape for k, v in peft.get_peft_model_state_dict(reference).items()
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids, mask = right_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
            atol=1e-5,
            rtol=0,
        )


def test_encoder_classifier_trains_prefixes() -> None:
    """BERT (bidirectional, learned positions): PEFT 0.21.2 refuses prefix tuning there under transformers
    5.24 (it looks for `past_key_values`), so the checks are structural: padding invariance, disabling,
    gradients."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    base = BertForSequenceClassification(config).eval()
    model, method, _ = applied(base, num_virtual_tokens=4)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
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
