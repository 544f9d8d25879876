"""Prompt tuning (Lester et al. 2021) against HF PEFT 0.21.2's PromptTuningConfig on copied prompts.

PEFT returns logits for the p virtual positions too; peftbench hides them, so the comparisons take PEFT's
logits from position p on. Tolerances are fp32 (1e-5).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.methods.prompt_tuning import PromptEmbedding
from peftbench.tasks.logprobs import response_logprobs
from peftbench.tasks.objectives import target_token_loss
from tests.helpers import tiny_llama, token_batch

peft = pytest.importorskip("peft")
P = 5


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*Position ids are not supported.*")


def applied(base: torch.nn.Module, p: int = P) -> tuple[torch.nn.Module, object, PromptEmbedding]:
    model = copy.deepcopy(base)
    method = build_method({"name": "prompt_tuning", "num_virtual_tokens": p})
    method.apply(model)
    layer = next(m for m in model.modules() if isinstance(m, PromptEmbedding))
    return model, method, layer


def peft_copy(base: torch.nn.Module, layer: PromptEmbedding, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=layer.num_virtual_tokens)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(layer.embedding)
    return model


def right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = token_batch(batch=3, length=9)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, -5:] = 0
    return ids, mask


def test_logits_match_peft_on_the_real_positions() -> None:
    base = tiny_llama()
    model, _, layer = applied(base)
    reference = peft_copy(base, layer)
    ids, mask = right_padded()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
        untuned = base(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == untuned.shape  # the virtual positions are invisible
    torch.testing.assert_close(ours, theirs[:, P:], atol=1e-5, rtol=0)
    assert (ours - untuned).abs().max() > 1e-3  # the prompt does change the function


def test_init_samples_vocabulary_embeddings_from_the_seed() -> None:
    base = tiny_llama(vocab=4096)  # a vocabulary large enough that two seeds share no row by chance
    torch.manual_seed(7)
    first = applied(base, p=8)[2].embedding.detach()
    torch.manual_seed(7)
    again = applied(base, p=8)[2].embedding.detach()
    torch.manual_seed(8)
    other = applied(base, p=8)[2].embedding.detach()
    table = base.get_input_embeddings().weight
    rows = [int((table == row).all(dim=1).nonzero()[0]) for row in first]  # each row is a token's embedding
    assert len(rows) == 8 and len(set(rows)) > 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_loss_with_labels_equals_the_hand_computation() -> None:
    base = tiny_llama()
    model, _, layer = applied(base)
    reference = peft_copy(base, layer)
    ids, mask = right_padded()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a masked prompt, so PEFT (which also predicts labels[0] from the prompt) agrees
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=mask).logits[:, P:]
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        ours = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        theirs = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        task_loss, n_tokens = target_token_loss(model, ids, mask, labels)  # the tasks' hidden-state path
        logps, _ = response_logprobs(model, ids, mask, labels)
    torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(task_loss, by_hand, atol=1e-5, rtol=0)
    assert n_tokens == int((labels[:, 1:] != -100).sum())
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
    """Cached `generate` == greedy decoding by PEFT's forward. (PEFT 0.21.2's own `generate` under
    transformers 5.24 drifts from its forward after the first step, by up to 0.1 in these logits, so it is no
    oracle.)"""
    base = tiny_llama(seed=3)
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


def test_gradients_reach_only_the_prompt() -> None:
    model, _, layer = applied(tiny_llama())
    model.train()
    ids, mask = right_padded()
    loss, _ = target_token_loss(model, ids, mask, ids.masked_fill(mask == 0, -100))
    loss.backward()
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    assert with_grad == ["model.prompt_tuning.embedding"]
    assert layer.embedding.grad.abs().sum() > 0


def test_peft_export_loads_in_peft(tmp_path: Path) -> None:
    base = tiny_llama()
    model, method, layer = applied(base)
    with torch.no_grad():
        layer.embedding.add_(0.1 * torch.randn_like(layer.embedding))  # "trained"
    config, tensors = method.peft_export(model)
    own = peft_copy(base, layer).peft_config["default"].to_dict()
    assert set(config) <= set(own)
    for key in (
        "peft_type",
        "task_type",
        "num_virtual_tokens",
        "token_dim",
        "num_attention_heads",
        "num_layers",
    ):
        assert config[key] == own[key], key
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids, mask = right_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits[:, P:],
            model(input_ids=ids, attention_mask=mask).logits,
            atol=1e-5,
            rtol=0,
        )


def test_encoder_classifier_matches_peft() -> None:
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
    model, method, layer = applied(base, p=4)
    reference = peft_copy(base, layer, task_type="SEQ_CLS")
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(
            ours, reference(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0
        )
        assert model.bert(input_ids=ids, attention_mask=mask).last_hidden_state.shape[1] == ids.shape[1]
    assert method.peft_export(model)[0]["task_type"] == "SEQ_CLS"


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "20"])
def test_bad_num_virtual_tokens(value: object) -> None:
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        build_method({"name": "prompt_tuning", "num_virtual_tokens": value})
