"""Prompt tuning (Lester et al. 2021) against HF PEFT 0.21.2's PromptTuningConfig on copied prompts.

PEFT returns logits for the p virtual positions too; peftbench hides them, so the comparisons take PEFT's
logits from position p on. Tolerances are fp32 (1e-5).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.methods.prompt_tuning import PromptEmbedding
from tests.helpers import tiny_llama
from tests.virtual_token_checks import (
    apply_method,
    bert_batch,
    check_disabled_gives_the_base_model,
    check_fp32_trainables_on_bf16_model,
    check_generation_matches_peft,
    check_logits_match_peft,
    check_loss_with_labels,
    check_peft_export_loads_in_peft,
    tiny_bert_classifier,
    trained_gradients,
)

peft = pytest.importorskip("peft")
P = 5


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*Position ids are not supported.*")


def applied(base: torch.nn.Module, p: int = P) -> tuple[torch.nn.Module, object, PromptEmbedding]:
    return apply_method(base, {"name": "prompt_tuning", "num_virtual_tokens": p}, PromptEmbedding)


def peft_copy(base: torch.nn.Module, layer: PromptEmbedding, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=layer.num_virtual_tokens)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(layer.embedding)
    return model


def test_logits_match_peft_on_the_real_positions() -> None:
    base = tiny_llama()
    model, _, layer = applied(base)
    # the virtual positions are invisible; the prompt does change the function
    check_logits_match_peft(base, model, peft_copy(base, layer), offset=P)


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
    check_loss_with_labels(model, peft_copy(base, layer), offset=P)


def test_generation_matches_peft_and_ignores_left_padding() -> None:
    """Cached `generate` == greedy decoding by PEFT's forward. (PEFT 0.21.2's own `generate` under
    transformers 5.24 drifts from its forward after the first step, by up to 0.1 in these logits, so it is no
    oracle.)"""
    check_generation_matches_peft(tiny_llama(seed=3), applied, peft_copy)


def test_disabled_gives_the_base_model() -> None:
    check_disabled_gives_the_base_model(tiny_llama(), applied)


def test_gradients_reach_only_the_prompt() -> None:
    model, _, layer = applied(tiny_llama())
    assert list(trained_gradients(model)) == ["model.prompt_tuning.embedding"]
    assert layer.embedding.grad.abs().sum() > 0


def test_peft_export_loads_in_peft(tmp_path: Path) -> None:
    base = tiny_llama()
    model, method, layer = applied(base)
    with torch.no_grad():
        layer.embedding.add_(0.1 * torch.randn_like(layer.embedding))  # "trained"
    own = peft_copy(base, layer).peft_config["default"].to_dict()
    check_peft_export_loads_in_peft(base, model, method.peft_export(model), own, tmp_path, offset=P)


def test_encoder_classifier_matches_peft() -> None:
    base = tiny_bert_classifier()
    model, method, layer = applied(base, p=4)
    reference = peft_copy(base, layer, task_type="SEQ_CLS")
    ids, mask = bert_batch()
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


def test_trainable_tensors_are_fp32_on_a_bf16_model() -> None:
    """The soft prompt: float32 on a bf16 model, cast to bf16 in the forward; one AdamW step moves it all."""
    check_fp32_trainables_on_bf16_model(applied)
