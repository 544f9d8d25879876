"""Preference tuning (DPO): loss vs a hand computation, the reference model, pairs, errors, the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.tasks import PreferenceTask, build_task
from peftbench.tasks.collate import IGNORE_INDEX
from peftbench.tasks.dpo import dpo_loss
from peftbench.tasks.logprobs import response_logprobs
from peftbench.tasks.preference import same_group_pairs
from peftbench.tasks.splits import normalise
from tests.helpers import assert_finite, cli_smoke, tiny_llama, token_batch

PAIRS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Maybe {i}."}
    for i in range(12)
]


def _write_pairs(path: Path, rows: list[dict[str, str]] = PAIRS) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _file_task(tmp_path: Path, tokenizer: Any, **kwargs: Any) -> PreferenceTask:
    task = PreferenceTask(
        data_files=str(_write_pairs(tmp_path / "pairs.jsonl")),
        split={"val": 2, "test": 2},
        probe=None,
        **kwargs,
    )
    task.setup(tokenizer, seed=0)
    return task


# ---- the loss ------------------------------------------------------------------------------------------
def test_dpo_loss_matches_a_hand_computation() -> None:
    policy_w, policy_l = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0])
    ref_w, ref_l = torch.tensor([-11.0, -3.5]), torch.tensor([-11.0, -2.5])
    out = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=0.1)
    # pair 0: ((-10 + 11) - (-12 + 11)) = 2 -> -log sigmoid(0.2); pair 1: (0.5 - 0.5) = 0 -> log 2
    expected = [math.log1p(math.exp(-0.2)), math.log(2.0)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert float(out.loss) == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.05])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.05])
    assert out.margins.tolist() == pytest.approx([0.2, 0.0])
    # beta scales the margin; large margins stay finite (softplus form)
    assert float(dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=1.0).losses[0]) == pytest.approx(
        math.log1p(math.exp(-2.0)), abs=1e-6
    )
    big = dpo_loss(torch.tensor([0.0]), torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert torch.isfinite(big.loss) and float(big.loss) < 1e-6


def test_dpo_loss_gradient_flows_to_the_policy_only() -> None:
    policy = torch.tensor([-5.0, -6.0], requires_grad=True)
    reference = torch.tensor([-5.5, -5.5], requires_grad=True)
    dpo_loss(policy[:1], policy[1:], reference[:1], reference[1:], beta=0.5).loss.backward()
    assert policy.grad is not None and reference.grad is None
    sig = 1 / (1 + math.exp(-0.5 * ((-5.0 + 5.5) - (-6.0 + 5.5))))
    assert policy.grad.tolist() == pytest.approx([-0.5 * (1 - sig), 0.5 * (1 - sig)], abs=1e-6)


def test_response_logprobs_sum_over_labelled_tokens_only() -> None:
    model = tiny_llama()
    ids = token_batch(batch=3, length=8)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[mask == 0] = IGNORE_INDEX
    with torch.no_grad():
        logps, counts = response_logprobs(model, ids, mask, labels)
        log_softmax = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    for row in range(3):
        expected = sum(
            float(log_softmax[row, t - 1, ids[row, t]]) for t in range(1, 8) if labels[row, t] != IGNORE_INDEX
        )
        assert float(logps[row]) == pytest.approx(expected, abs=1e-4)
    assert counts.tolist() == [4, 4, 2]


# ---- the task's loss and reference model -------------------------------------------------------------
def _perturb_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


def test_task_loss_is_dpo_of_policy_vs_base_model(
    tiny_model: Any, tiny_model_and_tokenizer: Any, tmp_path: Path
):
    tokenizer = tiny_model_and_tokenizer[1]
    base = copy.deepcopy(tiny_model)
    task = _file_task(tmp_path, tokenizer, beta=0.25)
    task.head(tiny_model)
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    method.apply(tiny_model)
    task.use_reference(lambda: method.disabled(tiny_model))
    assert task.reference_kind == "adapters_disabled"
    _perturb_adapters(tiny_model)
    batch = next(iter(task.val_dataloader(2)))
    n = batch["pairs"]
    assert batch["input_ids"].shape[0] == 2 * n
    loss, n_tokens = task.loss(tiny_model, batch)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        policy, counts = response_logprobs(tiny_model, *args)
        reference, _ = response_logprobs(base, *args)
    assert not torch.allclose(policy, reference)  # the adapter changes the model
    margins = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    expected = sum(math.log1p(math.exp(-0.25 * float(m))) for m in margins) / n
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert n_tokens == int(counts.sum()) == int((batch["labels"] != IGNORE_INDEX).sum())
    scores = task.evaluate(tiny_model, batch)
    assert scores["reward_margin"] == pytest.approx((0.25 * margins).tolist(), abs=1e-5)
    assert scores["reward_accuracy"] == [100.0 * (float(m) > 0) for m in margins]


def test_reference_is_unchanged_by_training_with_lora(
    tiny_model: Any, tiny_model_and_tokenizer: Any, tmp_path
):
    tokenizer = tiny_model_and_tokenizer[1]
    task = _file_task(tmp_path, tokenizer)
    task.head(tiny_model)
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    method.apply(tiny_model)
    task.use_reference(lambda: method.disabled(tiny_model))
    batch = next(iter(task.train_dataloader(4)))
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])

    def reference_logps() -> torch.Tensor:
        with torch.no_grad(), method.disabled(tiny_model) as ref:
            return response_logprobs(ref, *args)[0]

    before_ref = reference_logps()
    with torch.no_grad():
        before_policy = response_logprobs(tiny_model, *args)[0]
    assert torch.allclose(before_ref, before_policy)  # B = 0: the adapted model is the base at step 0
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    tiny_model.train()
    for _ in range(3):
        loss, _ = task.loss(tiny_model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after_policy = response_logprobs(tiny_model, *args)[0]
    assert torch.equal(reference_logps(), before_ref)
    assert not torch.allclose(after_policy, before_policy)
    assert float(task.loss(tiny_model, batch)[0]) < math.log(2.0)  # started at log 2 (margin 0)


def test_full_fine_tuning_keeps_a_frozen_reference_copy(
    tiny_model: Any, tiny_model_and_tokenizer: Any, tmp_path
):
    tokenizer = tiny_model_and_tokenizer[1]
    task = _file_task(tmp_path, tokenizer)
    task.head(tiny_model)
    method = build_method({"name": "full"})
    method.apply(tiny_model)
    task.use_reference(lambda: method.disabled(tiny_model))
    assert task.reference_kind == "frozen_copy"
    assert task.reference._frozen is not None and task.reference._frozen is not tiny_model
    assert not any(p.requires_grad for p in task.reference._frozen.parameters())
    batch = next(iter(task.train_dataloader(4)))
    loss, _ = task.loss(tiny_model, batch)
    assert float(loss) == pytest.approx(math.log(2.0), abs=1e-5)  # policy == reference before training
    loss.backward()
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad.sign()
    assert float(task.loss(tiny_model, batch)[0]) != pytest.approx(math.log(2.0), abs=1e-4)


# ---- data -------------------------------------------------------------------------------------------
def test_same_group_pairs_reject_another_headline_of_the_same_group() -> None:
    rows = [
        {"source": f"a{i}", "target": f"title {i}", "group": "sport" if i % 2 else "tech"} for i in range(6)
    ] + [{"source": "lonely", "target": "alone", "group": "arts"}]
    pairs, skipped = same_group_pairs(rows)
    assert skipped == 1 and len(pairs) == 6
    by_prompt = {p["prompt"]: p for p in pairs}
    assert by_prompt["a0"]["rejected"] == "title 2" and by_prompt["a4"]["rejected"] == "title 0"
    assert by_prompt["a1"]["rejected"] == "title 3"


def test_bbc_pairs_are_deterministic_disjoint_and_same_section(tiny_model_and_tokenizer: Any) -> None:
    tokenizer = tiny_model_and_tokenizer[1]
    task = PreferenceTask(split={"val": 40, "test": 40, "max_train": 40}, probe=None)
    parts, stats, pairing = task._pairs()
    again, _, _ = task._pairs()
    assert pairing == "same_group" and parts == again
    assert stats["records_read"] == 2225
    from peftbench.tasks.sources import bbc_news

    section = {r["title"]: r["category"] for r in bbc_news().records}
    prompts = {part: {p["prompt"] for p in rows} for part, rows in parts.items()}
    assert not (prompts["train"] & prompts["val"]) and not (prompts["train"] & prompts["test"])
    assert not (prompts["val"] & prompts["test"])
    for rows in parts.values():
        chosen_titles = {p["chosen"] for p in rows}
        for p in rows:
            assert normalise(p["chosen"]) != normalise(p["rejected"])
            assert section[p["chosen"]] == section[p["rejected"]]
            assert p["rejected"] in chosen_titles  # the rejected headline belongs to the same split
    task.setup(tokenizer, seed=0)
    assert task.split_sizes()["train"] <= 40 and task.split_sizes()["test"] > 30


def test_missing_columns_and_encoders_fail_with_one_clear_line(tmp_path: Path, tiny_model_and_tokenizer: Any):
    tokenizer = tiny_model_and_tokenizer[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"no column\(s\) 'text', 'title', 'category'.*'chosen'") as err:
        PreferenceTask(data_files=str(bad), probe=None).setup(tokenizer, seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"task.prompt_column='prompt' is not a column"):
        PreferenceTask(data_files=str(bad), pairing="columns", probe=None).setup(tokenizer, seed=0)
    encoder_tokenizer = type("BertLike", (), {"eos_token_id": None})()
    with pytest.raises(ConfigError, match="needs a causal language model"):
        PreferenceTask(probe=None).setup(encoder_tokenizer, seed=0)
    from transformers import BertConfig, BertForSequenceClassification

    encoder = BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(ConfigError, match=r"task='preference' needs a causal language model"):
        PreferenceTask(probe=None).head(encoder)
    with pytest.raises(ConfigError, match="beta"):
        build_task({"name": "preference", "beta": 0})


# ---- end to end through the CLI ------------------------------------------------------------------------
def test_cli_smoke(tmp_path: Path) -> None:
    record = cli_smoke(
        tmp_path,
        "preference",
        "tiny_llama",
        [
            "task.split.val=6",
            "task.split.test=6",
            "task.split.max_train=8",
            "task.max_source_tokens=32",
            "task.probe.texts=2",
            "task.probe.max_tokens=32",
        ],
    )
    assert record["primary_metric"] == "test/reward_accuracy"
    metrics = record["metrics"]
    keys = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "loss", "probe_loss")
    assert_finite(metrics, (f"test/{key}" for key in keys))
    assert 0.0 <= metrics["test/reward_accuracy"] <= 100.0
    assert math.isfinite(metrics["val/reward_accuracy"])
