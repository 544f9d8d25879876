"""Checks shared by the virtual-token methods' tests (prompt tuning, prefix tuning) against HF PEFT 0.21.2.

Each takes what differs between the methods as arguments: the base, our model (and method) and PEFT's copy
of it, or the test file's `applied` and `peft_copy` that make them, and `offset`, the number of PEFT's
leading logit positions that are not the caller's (PEFT's prompt tuning returns the p virtual positions'
logits in front, peftbench hides them; prefix tuning adds none).
Tolerances are fp32 (1e-5).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from peftbench.methods import build_method
from peftbench.tasks.logprobs import response_logprobs
from peftbench.tasks.objectives import target_token_loss
from tests.helpers import token_batch

# the keys of PEFT's adapter_config.json that every virtual-token export must agree on
PEFT_CONFIG_KEYS = (
    "peft_type",
    "task_type",
    "num_virtual_tokens",
    "token_dim",
    "num_attention_heads",
    "num_layers",
)

# a test file's own `applied(base)` (the model, the method, its layer) and `peft_copy(base, layer)`
Applied = Callable[[torch.nn.Module], tuple[torch.nn.Module, Any, Any]]
PeftCopy = Callable[[torch.nn.Module, Any], torch.nn.Module]


def apply_method(
    base: torch.nn.Module, config: dict[str, Any], layer_type: type[torch.nn.Module]
) -> tuple[torch.nn.Module, Any, Any]:
    """A copy of `base` with `config`'s method applied: the model, the method, its `layer_type` module."""
    model = copy.deepcopy(base)
    method = build_method(config)
    method.apply(model)
    return model, method, next(m for m in model.modules() if isinstance(m, layer_type))


def right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = token_batch(batch=3, length=9)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, -5:] = 0
    return ids, mask


def tiny_bert_classifier() -> torch.nn.Module:
    """A 2-layer random BERT (bidirectional, learned positions) with a 3-label classification head."""
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
    return BertForSequenceClassification(config).eval()


def bert_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 7 tokens for `tiny_bert_classifier`, the second right-padded by 2."""
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask


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


def check_logits_match_peft(
    base: torch.nn.Module, model: torch.nn.Module, reference: torch.nn.Module, offset: int
) -> None:
    """On right-padded rows our logits are PEFT's (from position `offset` on), have the base model's shape
    (the virtual positions are invisible) and differ from its logits (the tokens change the function)."""
    ids, mask = right_padded()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
        untuned = base(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == untuned.shape
    torch.testing.assert_close(ours, theirs[:, offset:], atol=1e-5, rtol=0)
    assert (ours - untuned).abs().max() > 1e-3


def check_loss_with_labels(model: torch.nn.Module, reference: torch.nn.Module, offset: int) -> None:
    """With a masked prompt (so that PEFT, which also predicts labels[0] from the virtual tokens, agrees) our
    loss, PEFT's and the tasks' hidden-state path all equal cross-entropy by hand on PEFT's logits from
    `offset` on; the tasks' log-probabilities sum to minus that loss times the tokens counted."""
    ids, mask = right_padded()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=mask).logits[:, offset:]
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        ours = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        theirs = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        task_loss, n_tokens = target_token_loss(model, ids, mask, labels)  # the tasks' hidden-state path
        logps, _ = response_logprobs(model, ids, mask, labels)
    for value in (ours, theirs, task_loss):
        torch.testing.assert_close(value, by_hand, atol=1e-5, rtol=0)
    assert n_tokens == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(logps.sum(), -by_hand * n_tokens, atol=1e-4, rtol=0)


def check_generation_matches_peft(base: torch.nn.Module, applied: Applied, peft_copy: PeftCopy) -> None:
    """With the method `applied` to `base`, cached `generate` == greedy decoding by the forward of PEFT's copy
    of it, differs from the base model's, and ignores left padding: each row as if generated alone."""
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


def check_disabled_gives_the_base_model(base: torch.nn.Module, applied: Applied) -> None:
    """With the method `applied` to `base`: inside `method.disabled` the model is the base model exactly
    (logits, and DPO's reference path), and the tuned model is back exactly after."""
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


def trained_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One backward pass of the tasks' loss on right-padded rows: each parameter that got a gradient, by name,
    in the model's order."""
    model.train()
    ids, mask = right_padded()
    loss, _ = target_token_loss(model, ids, mask, ids.masked_fill(mask == 0, -100))
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def check_peft_export_loads_in_peft(
    base: torch.nn.Module,
    model: torch.nn.Module,
    exported: tuple[dict[str, Any], dict[str, torch.Tensor]],
    own: dict[str, Any],
    directory: Path,
    offset: int,
    keys: tuple[str, ...] = PEFT_CONFIG_KEYS,
) -> None:
    """`method.peft_export`'s (config, tensors): the config's keys are PEFT's own (`own`, PEFT's config of
    the same method as a dict) and agree with it on `keys`; written to `directory`, PEFT loads it on a copy of
    `base` with our logits (PEFT's from position `offset` on)."""
    config, tensors = exported
    assert set(config) <= set(own)
    for key in keys:
        assert config[key] == own[key], key
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    ids, mask = right_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits[:, offset:],
            model(input_ids=ids, attention_mask=mask).logits,
            atol=1e-5,
            rtol=0,
        )


def check_fp32_trainables_on_bf16_model(applied: Applied) -> None:
    """With the method `applied` to a bf16 `tiny_llama`: every trainable tensor is float32 (METHODS.md,
    "Adapter dtype"), the logits stay bf16 and finite, and one AdamW step at lr 1e-4 changes every element of
    every trainable tensor (in bf16 most would not move: its spacing near 1 is 2^-7)."""
    from tests.helpers import tiny_llama

    base = tiny_llama().to(torch.bfloat16)
    model, _, _ = applied(base)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}, {
        n: p.dtype for n, p in trainable.items()
    }
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    ids, mask = right_padded()
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.dtype == torch.bfloat16 and out.logits.shape == (*ids.shape, base.config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    before = {name: p.detach().clone() for name, p in trainable.items()}
    torch.optim.AdamW(trainable.values(), lr=1e-4, weight_decay=0.0).step()
    for name, p in trainable.items():
        assert (p.detach() != before[name]).all(), f"{name}: {(p == before[name]).sum()} elements unchanged"
    with torch.no_grad():
        assert model.eval()(input_ids=ids, attention_mask=mask).logits.dtype == torch.bfloat16
