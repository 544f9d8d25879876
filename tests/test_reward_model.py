"""The reward model (task=reward_model) and a reward-model run as a reward: the Bradley-Terry loss against
its formula, the head's read position under left and right padding, the metrics, learning an easy
preference, save -> reload as a `Reward` with the same scores (lora, vera, ia3, full, prompt tuning), and the
one-line refusals."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

# the task registry before peftbench.rl: rl.rewards <-> tasks.reinforce import each other (cycle)
import peftbench.tasks  # noqa: F401
from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.rl.rewards import build_reward
from peftbench.tasks import RewardModelTask, build_task
from peftbench.tasks.bradley_terry import bradley_terry_loss
from peftbench.tasks.collate import _pad, encode_examples, pad_token_id
from peftbench.tasks.reward_head import (
    HEAD_NAME,
    ScalarHead,
    attach_head,
    last_token_index,
    sequence_rewards,
)
from tests.conftest import CONF_DIR, tiny_model_cfg

MARKER = "excellent"
WORDS = ["river", "stone", "cloud", "lamp", "garden", "window", "paper", "market", "engine", "forest"]


def _easy_pairs(n: int = 48) -> list[dict[str, Any]]:
    """Chosen always holds the marker word, rejected never: an easy preference to learn."""
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        rows.append(
            {
                "prompt": f"Describe item {i}: the {a} and the {b}.",
                "chosen": f"The {b} is {MARKER} near the {a}.",
                "rejected": f"The {b} is near the {a}.",
                "margin": 0.5 + (i % 3),
            }
        )
    return rows


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task(
    tmp_path: Path, tokenizer: Any, rows: list[dict[str, Any]] | None = None, **kw: Any
) -> RewardModelTask:
    data = _write(tmp_path / "pairs.jsonl", rows if rows is not None else _easy_pairs())
    task = RewardModelTask(data_files=str(data), split={"val": 8, "test": 8}, probe=None, **kw)
    task.setup(tokenizer, seed=0)
    return task


# ---- the loss -------------------------------------------------------------------------------------------
def test_bradley_terry_loss_is_its_formula_with_margin_and_centring() -> None:
    chosen = torch.tensor([1.5, -0.5, 3.0], requires_grad=True)
    rejected = torch.tensor([0.5, 0.25, -4.0], requires_grad=True)

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    plain = bradley_terry_loss(chosen, rejected)
    expected = [-math.log(sig(1.0)), -math.log(sig(-0.75)), -math.log(sig(7.0))]
    assert plain.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert float(plain.loss) == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert plain.margins.tolist() == pytest.approx([1.0, -0.75, 7.0])

    margin = torch.tensor([0.5, 0.0, 2.0])
    out = bradley_terry_loss(chosen, rejected, margin, centring=0.1)
    losses = [-math.log(sig(0.5)), -math.log(sig(-0.75)), -math.log(sig(5.0))]
    sums = [2.0, -0.25, -1.0]
    want = sum(losses) / 3 + 0.1 * sum(s * s for s in sums) / 3
    assert out.losses.tolist() == pytest.approx(losses, abs=1e-6)
    assert float(out.loss) == pytest.approx(want, abs=1e-6)
    assert out.margins.tolist() == pytest.approx([1.0, -0.75, 7.0])  # the data's margin is not subtracted
    # the gradient of the first pair's chosen reward: -(1 - sig(d - m)) / 3 + 0.1 * 2 * (r_c + r_r) / 3
    out.loss.backward()
    assert chosen.grad is not None
    assert float(chosen.grad[0]) == pytest.approx(-(1 - sig(0.5)) / 3 + 0.2 * 2.0 / 3, abs=1e-6)
    # large differences stay finite
    big = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1e4]))
    assert torch.isfinite(big.loss) and float(big.loss) == pytest.approx(1e4)


# ---- the head reads the last real token ---------------------------------------------------------------
def test_last_token_index_under_left_and_right_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


@pytest.mark.parametrize("left", [False, True])
def test_head_reads_the_last_non_padding_token(tiny_model: Any, left: bool) -> None:
    model = tiny_model
    attach_head(model, "reward_model")
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(5, 500, (n,), generator=generator).tolist() for n in (7, 4, 10)]
    pad = 0
    ids = _pad(rows, pad, left=left)
    mask = _pad([[1] * len(r) for r in rows], 0, left=left)
    with torch.no_grad():
        batched = sequence_rewards(model, ids, mask)
        alone = torch.cat([sequence_rewards(model, torch.tensor([r]), torch.ones(1, len(r))) for r in rows])
        # what the head would give at the last position of each unpadded row, computed by hand
        decoder = model.get_decoder()
        by_hand = torch.stack(
            [model.reward_head(decoder(input_ids=torch.tensor([r])).last_hidden_state[0, -1]) for r in rows]
        )
        other_pad = sequence_rewards(model, torch.where(mask.bool(), ids, torch.full_like(ids, 77)), mask)
        changed = [[*r[:-1], r[-1] + 1] for r in rows]
        moved = sequence_rewards(model, _pad(changed, pad, left=left), mask)
    assert torch.allclose(batched, alone, atol=1e-5), (batched, alone)
    assert torch.allclose(alone, by_hand.flatten(), atol=1e-5)
    assert torch.allclose(batched, other_pad, atol=1e-5)  # padding ids are never read
    assert not torch.allclose(batched, moved, atol=1e-4)  # the last real token is


def test_head_is_a_float32_scalar_that_no_method_adapts(tiny_model: Any) -> None:
    head = attach_head(tiny_model, "reward_model")
    assert attach_head(tiny_model, "reward_model") is head  # attached once
    assert head.weight.dtype == torch.float32 and head.weight.shape == (64,)
    assert torch.equal(ScalarHead(64).weight, head.weight)  # the same seeded draw in every run
    build_method({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}).apply(
        tiny_model, head=head
    )
    assert isinstance(tiny_model.reward_head, ScalarHead) and head.weight.requires_grad


def test_the_base_is_fingerprinted_as_loaded_only(tmp_path: Path, tiny_model_and_tokenizer: Any) -> None:
    from peftbench.models.fingerprint import base_fingerprint

    base, tokenizer = tiny_model_and_tokenizer
    task = _task(tmp_path, tokenizer)
    task.head(copy.deepcopy(base))
    assert task.base_fingerprint == base_fingerprint(base)
    adapted = copy.deepcopy(base)
    build_method({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}).apply(
        adapted
    )
    later_stage = _task(tmp_path, tokenizer)
    later_stage.head(adapted)  # a later stage of a stages run: the model holds adapter layers already
    assert later_stage.base_fingerprint is None


# ---- the task: metrics, learning, errors ------------------------------------------------------------------
def test_metrics_are_pair_accuracy_and_margin(tmp_path: Path, tiny_model_and_tokenizer: Any) -> None:
    model, tokenizer = copy.deepcopy(tiny_model_and_tokenizer[0]), tiny_model_and_tokenizer[1]
    task = _task(tmp_path, tokenizer, margin_column="margin")
    task.head(model)
    batch = next(iter(task.val_dataloader(4)))
    n = batch["pairs"]
    assert n == 8 and batch["input_ids"].shape[0] == 16
    with torch.no_grad():
        loss, n_tokens = task.loss(model, batch)
        scores = task.evaluate(model, batch)
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    chosen, rejected = rewards[:n], rewards[n:]
    assert scores["pair_accuracy"] == [100.0 if c > r else 0.0 for c, r in zip(chosen, rejected, strict=True)]
    assert scores["reward_margin"] == pytest.approx((chosen - rejected).tolist(), abs=1e-6)
    assert scores["chosen_reward"] == pytest.approx(chosen.tolist(), abs=1e-6)
    margins = batch["margins"]
    assert sorted(set(margins.tolist())) <= [0.5, 1.5, 2.5] and margins.abs().sum() > 0
    want = torch.nn.functional.softplus(-(chosen - rejected - margins)).mean()
    assert float(loss) == pytest.approx(float(want), abs=1e-6)
    assert n_tokens == int((batch["labels"] != -100).sum())
    assert task.aggregate(scores)["pair_accuracy"] == pytest.approx(sum(scores["pair_accuracy"]) / n)


def test_a_short_training_run_learns_an_easy_preference(
    tmp_path: Path, tiny_model_and_tokenizer: Any
) -> None:
    torch.manual_seed(0)
    model, tokenizer = copy.deepcopy(tiny_model_and_tokenizer[0]), tiny_model_and_tokenizer[1]
    task = _task(tmp_path, tokenizer)
    method = build_method(
        {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    )
    method.apply(model, head=task.head(model))

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            batch = next(iter(task.val_dataloader(8)))
            return sum(task.evaluate(model, batch)["pair_accuracy"]) / batch["pairs"]

    before = accuracy()
    groups = method.param_groups(model, lr=1e-2, weight_decay=0.0)
    optimizer = torch.optim.AdamW(groups)
    model.train()
    losses = []
    for _, batch in zip(range(30), iter(task.train_dataloader(8)), strict=False):
        loss, _ = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    after = accuracy()
    assert after == 100.0 and after > before, (before, after, losses)
    assert losses[-1] < losses[0]


def test_bad_options_are_one_line_errors(tmp_path: Path, tiny_model_and_tokenizer: Any) -> None:
    tokenizer = tiny_model_and_tokenizer[1]
    with pytest.raises(ConfigError, match=r"task.centring=-1.0 is not valid"):
        RewardModelTask(centring=-1.0)
    with pytest.raises(ConfigError, match=r"margin_column='margin' needs pairs read from columns"):
        RewardModelTask(margin_column="margin", split={"val": 8, "test": 8}, probe=None).setup(tokenizer, 0)
    rows = _easy_pairs()
    rows[3]["margin"] = "a lot"
    with pytest.raises(ConfigError, match=r"holds 'a lot'; accepted: finite numbers"):
        _task(tmp_path, tokenizer, rows, margin_column="margin")
    with pytest.raises(ConfigError, match=r"task.margin_column='score' is not a column"):
        _task(tmp_path, tokenizer, margin_column="score")
    with pytest.raises(ConfigError, match="got unknown key"):
        build_task({"name": "reward_model", "beta": 0.1})  # DPO's temperature is not a reward-model key


# ---- a run on disk as a reward -------------------------------------------------------------------------
def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, *extra: str) -> tuple[Path, Any]:
    """A 3-step task=reward_model run in this process: its run directory (record written) and objects."""
    from peftbench.record import write_record
    from peftbench.run import run_single

    data = _write(tmp_path / "pairs.jsonl", _easy_pairs(24))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    overrides = [
        f"method={method}",
        "task=reward_model",
        "model=tiny_llama",
        "logger=none",
        "batch_size=4",
        "trainer.max_steps=3",
        "evaluate_before=false",
        f"task.data_files={data}",
        "task.split.val=4",
        "task.split.test=4",
        "task.probe=null",
        f"results_dir={tmp_path / 'results'}",
        "checkpoint.every_n_steps=null",
        "optim.lr=1e-2",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    record, objects = run_single(cfg)
    write_record(record, run_dir, None)
    return run_dir, objects


def _in_memory_scores(model: Any, tokenizer: Any, prompts: list[str], completions: list[str]) -> torch.Tensor:
    encoded = encode_examples(tokenizer, "{source}", prompts, completions, 1 << 30, 32)
    rows = [e.prompt_ids + e.target_ids for e in encoded]
    ids = _pad(rows, pad_token_id(tokenizer), left=False)
    mask = _pad([[1] * len(r) for r in rows], 0, left=False)
    model.eval()
    with torch.no_grad():
        return sequence_rewards(model, ids, mask)


@pytest.mark.parametrize("method", ["lora", "vera", "ia3", "full", "prompt_tuning"])
def test_a_saved_run_reloads_as_a_reward_with_the_same_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    run_dir, objects = _run(tmp_path, monkeypatch, method)
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "ok" and record["task"] == "reward_model" and record["steps"] == 3
    assert record["params"]["head_trainable"] == 65  # 64 weights + 1 bias, counted beside the method
    assert math.isfinite(record["metrics"]["test/pair_accuracy"])
    assert "test/reward_margin" in record["metrics"]
    reward = build_reward("reward_model", {"reward_model": {"path": str(run_dir), "batch_size": 3}})
    rows = _easy_pairs(5)
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    scores = reward(prompts, completions, [{}] * len(prompts))
    assert scores.dtype == torch.float32 and scores.shape == (10,)
    tokenizer = objects["task"]._tokenizer
    want = _in_memory_scores(objects["model"], tokenizer, prompts, completions)
    assert torch.allclose(scores, want, atol=1e-5), (scores, want)
    # the trained head is what was loaded, not a fresh one
    assert not torch.equal(reward.parts[0][2].model.reward_head.weight, ScalarHead(64).weight)
    assert all(not p.requires_grad for p in reward.parts[0][2].model.parameters())
    # the policy on the same base passes; another base is refused
    from peftbench.models import load_model

    reward.check_policy_base(load_model(tiny_model_cfg())[0])
    with pytest.raises(ConfigError, match="trained on another base model than the policy's"):
        reward.check_policy_base(load_model(tiny_model_cfg(seed=1))[0])


def test_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = _run(tmp_path, monkeypatch, "lora")
    with pytest.raises(ConfigError, match=r"reward=.?nope.? is not valid; accepted: .*reward_model"):
        build_reward("nope")
    with pytest.raises(ConfigError, match=r"unknown: temperature\); accepted: path, batch_size"):
        build_reward("reward_model", {"reward_model": {"path": str(run_dir), "temperature": 1.0}})
    with pytest.raises(ConfigError, match="path missing"):
        build_reward("reward_model")
    with pytest.raises(ConfigError, match="no such directory"):
        build_reward("reward_model", {"reward_model": {"path": str(tmp_path / "nowhere")}})
    with pytest.raises(ConfigError, match="batch_size=0 is not valid"):
        build_reward("reward_model", {"reward_model": {"path": str(run_dir), "batch_size": 0}})

    def refused(directory: Path, needle: str) -> None:
        with pytest.raises(ConfigError, match=needle) as caught:
            build_reward({"reward_model": 1.0}, {"reward_model": {"path": str(directory)}})
        assert "\n" not in str(caught.value) and "is not a reward-model run" in str(caught.value)

    def variant(name: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        for item in ("record.json", "adapter"):
            source = run_dir / item
            if source.is_dir():
                (target / item).mkdir()
                for f in source.iterdir():
                    if f.is_file():
                        (target / item / f.name).write_bytes(f.read_bytes())
            else:
                (target / item).write_bytes(source.read_bytes())
        return target

    no_record = variant("no_record")
    (no_record / "record.json").unlink()
    refused(no_record, "no record.json")
    other_task = variant("other_task")
    record = json.loads((other_task / "record.json").read_text())
    (other_task / "record.json").write_text(json.dumps({**record, "task": "preference"}))
    refused(other_task, "its task was 'preference'")
    no_adapter = variant("no_adapter")
    (no_adapter / "adapter" / "adapter.safetensors").unlink()
    refused(no_adapter, "no adapter/adapter.safetensors")
    no_info = variant("no_info")
    (no_info / "adapter" / "reward_model.json").unlink()
    refused(no_info, "no readable adapter/reward_model.json")
    no_head = variant("no_head")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(no_head / "adapter" / "adapter.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.startswith(HEAD_NAME)}
    save_file(kept, str(no_head / "adapter" / "adapter.safetensors"), metadata={"method": "{}"})
    refused(no_head, "the adapter holds no reward_head tensors")
    unstamped = variant("unstamped")
    info = json.loads((unstamped / "adapter" / "reward_model.json").read_text())
    (unstamped / "adapter" / "reward_model.json").write_text(json.dumps({**info, "base_fingerprint": None}))
    refused(unstamped, "has no base fingerprint")
    # the run's base config now loads other weights than it was trained on
    moved = variant("moved_base")
    info = json.loads((moved / "adapter" / "reward_model.json").read_text())
    (moved / "adapter" / "reward_model.json").write_text(json.dumps({**info, "base_fingerprint": "sha256:0"}))
    with pytest.raises(ConfigError, match="now loads other base weights than it was trained on"):
        build_reward("reward_model", {"reward_model": {"path": str(moved)}})
    # the adapter directory works as well as the run directory
    reward = build_reward("reward_model", {"reward_model": {"path": str(run_dir / "adapter")}})
    assert reward(["a"], ["b"], [{}]).shape == (1,)
