"""RL from feedback through training (task=grpo/rloo/ppo, peftbench/tasks/reinforce.py), on the tiny Llama.

The tensor maths (advantages, losses, clipping, GAE, rewards) is checked in tests/test_rl_core.py; here: the
reference policy of every method, the update through the task's training step, the optimizer steps the
LightningModule takes for a task that steps the optimizer itself, learning, resume and the refusals.
"""

from __future__ import annotations

import copy
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.module import PeftModule
from peftbench.rl.advantages import group_advantages
from peftbench.rl.policy import policy_logprobs
from peftbench.tasks import build_task
from peftbench.tasks.reinforce import ReinforceTask, completion_texts
from peftbench.tasks.sampler import resumable_train_loader
from peftbench.tasks.stepping import StepContext
from tests.conftest import tiny_model_cfg
from tests.helpers import bare_trainer
from tests.test_method_matrix import ROWS, method_config

SMALL = {"max_source_tokens": 16, "max_new_tokens": 4, "split": {"val": 2, "test": 2, "max_train": 16}}


def rl_task(tokenizer: Any, **options: Any) -> ReinforceTask:
    task = build_task({"name": "grpo", "algorithm": "grpo", "probe": None, **SMALL, **options})
    assert isinstance(task, ReinforceTask)
    task.setup(tokenizer, 0)
    return task


@pytest.fixture(scope="module")
def tokenizer(tiny_model_and_tokenizer: tuple[Any, Any]) -> Any:
    return tiny_model_and_tokenizer[1]


def attach(task: ReinforceTask, model: torch.nn.Module, method_name: str, **overrides: Any) -> Any:
    """Apply a method as build.py does (the task's head beside it, then the reference handed over)."""
    torch.manual_seed(0)
    method = build_method({**method_config(method_name), **overrides})
    method.apply(model, head=task.head(model))
    task.use_reference(lambda: method.disabled(model))
    return method


def one_step(task: ReinforceTask, model: torch.nn.Module, step: Callable[[torch.Tensor], None]) -> dict:
    """The task's training step on its first training batch, outside Lightning; its logged statistics."""
    logged: list[dict[str, float]] = []
    batch = next(iter(task.train_dataloader(2)))
    task.training_step(StepContext(model, 0, 0, 1, step, lambda s: logged.append(dict(s))), batch)
    return logged[0]


# ----- the reference policy of every method --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ROWS))
def test_kl_to_the_reference_before_the_first_update(name: str, tokenizer: Any) -> None:
    """0 exactly for adapters that start at zero (and for methods kept beside a frozen copy), within float
    rounding (1e-6) for PiSSA (whose residual cancels only up to rounding): this also catches a `disabled()`
    that does not give the base back. Soft prompts change the function from the start: KL > 0 there."""
    from peftbench.models import load_model

    bias = ROWS[name].model_kwargs.get("bias", False)
    overrides = {"random_config": {"attention_bias": True, "mlp_bias": True}} if bias else {}
    model, _ = load_model(tiny_model_cfg(**overrides))
    task = rl_task(tokenizer)
    attach(task, model, name)
    stats = one_step(task, model, lambda loss: None)  # no update: the policy as initialised
    if name in ("prompt_tuning", "prefix_tuning"):
        assert stats["kl"] > 1e-4
    elif ROWS[name].identity_atol:
        assert 0 <= stats["kl"] <= 1e-6
    else:
        assert stats["kl"] == 0.0 and stats["kl_per_token"] == 0.0


# ----- the update ----------------------------------------------------------------------------------------
def length_reward(prompts: Any, completions: list[str], metadata: Any) -> torch.Tensor:
    """A reward with spread on a random model: the completion's length in characters / 10."""
    return torch.tensor([len(c) / 10 for c in completions], dtype=torch.float32)


@pytest.mark.parametrize(("algorithm", "per_completion"), [("grpo", "mean"), ("rloo", "sum")])
def test_one_update_without_kl_has_the_reinforce_gradient(
    algorithm: str, per_completion: str, tiny_model: Any, tokenizer: Any
) -> None:
    """beta 0, one update per batch: the gradient the step takes is REINFORCE's, `-A_i` times the completion's
    log-prob (its token mean for GRPO, its sum for RLOO), by autograd on the same samples."""
    task = rl_task(tokenizer, algorithm=algorithm, beta=0.0, group_size=4)
    task.reward_fn = length_reward
    attach(task, tiny_model, "lora")
    with torch.no_grad():  # B != 0: gradients reach A as well
        for name, param in tiny_model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.normal_(0, 0.02)
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    grads: list[list[torch.Tensor]] = []

    def step(loss: torch.Tensor) -> None:
        grads.append([g.clone() for g in torch.autograd.grad(loss, params)])

    one_step(task, tiny_model, step)
    rollout = task.last_rollout
    rewards = length_reward(None, completion_texts(tokenizer, rollout), None)
    advantages = (
        group_advantages(rewards, 4)
        if algorithm == "grpo"
        else rewards - (rewards.view(-1, 4).sum(1, keepdim=True) - rewards.view(-1, 4)).view(-1) / 3
    )
    assert advantages.abs().sum() > 0
    tiny_model.eval()
    logp, _ = policy_logprobs(tiny_model, rollout, 1.0)
    per_row = (logp * rollout.mask).sum(-1)
    if per_completion == "mean":
        per_row = per_row / rollout.mask.sum(-1)
    expected = torch.autograd.grad(-(advantages * per_row).mean(), params)
    assert len(grads) == 1
    assert any(g.abs().sum() > 0 for g in expected)
    for got, want in zip(grads[0], expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_delta_lora_under_ppo_hears_of_every_real_optimizer_step(
    tiny_model: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PPO with 2 epochs x 2 minibatches: 4 real optimizer steps per Lightning batch. Every one of them is
    clipped (trainer.gradient_clip_val under manual optimization), moves the scheduler and calls the
    method's `after_optimizer_step` with the count done: 1, 2, ..., 8 over two batches."""
    task = rl_task(tokenizer, algorithm="ppo", epochs=2, minibatches=2, group_size=4)
    task.reward_fn = length_reward
    method = attach(task, tiny_model, "delta_lora")
    assert task.reference.kind == "frozen_copy"  # Delta-LoRA changes the base: the reference is a copy
    counts: list[int] = []
    original = method.after_optimizer_step
    monkeypatch.setattr(
        method, "after_optimizer_step", lambda m, step: (counts.append(step), original(m, step))
    )
    norms: list[float] = []
    optim = OmegaConf.create(
        {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}
        | {"schedule": "linear", "warmup_ratio": 0.0}
    )
    module = PeftModule(tiny_model, method, task, optim)
    module.manual_clip = (0.01, "norm")
    clip = module.clip_gradients

    def clip_and_measure(*args: Any, **kwargs: Any) -> None:
        clip(*args, **kwargs)
        grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    monkeypatch.setattr(module, "clip_gradients", clip_and_measure)
    base_before = copy.deepcopy({n: p.detach().clone() for n, p in tiny_model.named_parameters()})
    trainer = bare_trainer(8)
    trainer.fit(module, train_dataloaders=resumable_train_loader(task.train_dataloader(2), 0))
    assert counts == [1, 2, 3, 4, 5, 6, 7, 8]
    assert trainer.global_step == 8 and len(module.step_stats) == 2
    assert len(norms) == 8 and max(norms) <= 0.01 + 1e-6
    assert module.lr_schedulers().last_epoch == 8  # type: ignore[union-attr]
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # linear decay, done
    changed = [n for n, p in tiny_model.named_parameters() if not torch.equal(p, base_before[n])]
    assert any("rl_value_head" in n for n in changed)  # the value head trains beside the method
    assert any(k in module.step_stats[-1] for k in ("value_loss", "value_clip_fraction"))


def test_a_toy_reward_rises_over_a_few_steps(tokenizer: Any) -> None:
    """Reward 1 for a first token the untuned model gives ~23% of its probability (a sharpened random model:
    logits x 8); 8 GRPO steps through the LightningModule raise that probability. (Full fine-tuning: the
    tiny model's LoRA moves too little in 8 steps to show it.)"""
    from peftbench.models import load_model

    model, _ = load_model(tiny_model_cfg())
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    task = rl_task(tokenizer, group_size=8, max_new_tokens=1, beta=0.0)
    batch = next(iter(task.train_dataloader(16)))

    def p_first(token: int) -> float:
        model.eval()
        with torch.no_grad():
            logits = model(
                input_ids=batch["gen_input_ids"], attention_mask=batch["gen_attention_mask"]
            ).logits
        return float(logits[:, -1].softmax(-1)[:, token].mean())

    target = tokenizer.convert_tokens_to_ids("Ċ")  # "\n"
    word = tokenizer.decode([target])
    task.reward_fn = lambda p, c, m: torch.tensor([float(x == word) for x in c])
    before = p_first(target)
    method = attach(task, model, "full")
    optim = OmegaConf.create(
        {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}
        | {"schedule": "constant", "warmup_ratio": 0.0}
    )
    module = PeftModule(model, method, task, optim)
    bare_trainer(8).fit(module, train_dataloaders=resumable_train_loader(task.train_dataloader(2), 0))
    after = p_first(target)
    assert 0.15 < before < 0.3 and after > before + 0.1
    rewards = [s["reward_mean"] for s in module.step_stats]
    assert sum(rewards[4:]) > sum(rewards[:4])


# ----- resume --------------------------------------------------------------------------------------------
TIMING = ("generation_s", "step_s", "generation_tokens_per_s")


def test_a_resumed_run_draws_the_same_samples_and_ends_equal(tmp_path: Path) -> None:
    """Killed after its step-2 checkpoint and launched again, a GRPO run samples the same token ids in every
    step (their checksums), logs the same rewards and KL, and ends with the adapter of the uninterrupted
    run. The `format` reward (at most 2 words) gives the random model's samples different rewards, so the
    adapter moves."""
    from tests.test_resume import adapter, record, run_and_signal, run_cli

    args = [
        "experiment=smoke",
        "task=grpo",
        "task.reward=format",
        "task.reward_options={format:{max_words:2}}",
        "logger=none",
        "optim.lr=1e-2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_on_success=true",
        "task.split.max_train=10",
    ]
    straight = run_cli(args, tmp_path / "a", tmp_path / "results")
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_and_signal(args, tmp_path / "b", tmp_path / "results", "step=2.ckpt", signal.SIGKILL)
    resumed = run_cli(args, tmp_path / "b", tmp_path / "results")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ra, rb = record(tmp_path / "a"), record(tmp_path / "b")
    assert rb["resumed_from"] is not None and rb["steps"] == ra["steps"] == 4
    history_a, history_b = ra["rollouts"]["history"], rb["rollouts"]["history"]
    assert len(history_a) == len(history_b) == 4
    for a, b in zip(history_a, history_b, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {
            k: v for k, v in b.items() if k not in TIMING
        }
    assert len({h["sample_checksum"] for h in history_a}) == 4  # each step draws new samples
    assert any(h["reward_std"] > 0 for h in history_a)
    assert ra["history"]["train_loss"] == rb["history"]["train_loss"]
    (ta, _), (tb, _) = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(v.abs().sum() > 0 for k, v in ta.items() if "lora_B" in k)  # it did learn something


# ----- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"reward": "bleu"}, "reward='bleu'"),
        ({"reward": {"rouge_l": 1.0, "length": 0.5}}, "reward='length'"),
        ({"group_size": 1}, "task.group_size=1"),
        ({"algorithm": "rloo", "group_size": 1}, "task.group_size=1"),
        ({"algorithm": "a2c"}, "task.algorithm='a2c'"),
        ({"loss_type": "grpo_plus"}, "loss_type='grpo_plus'"),
        ({"epochs": 0}, "task.epochs=0"),
        ({"temperature": 0}, "task.temperature=0"),
    ],
)
def test_bad_options_are_one_line_before_training(options: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_task({"name": "grpo", **options})
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_data_without_prompts_and_trainer_settings_are_refused(tmp_path: Path, tokenizer: Any) -> None:
    from peftbench.validation import check_stepping_task

    data = tmp_path / "no_prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"body": f"article {i}", "title": f"t {i}"}) + "\n" for i in range(20))
    )
    task = build_task(
        {"name": "grpo", "data_files": str(data), "probe": None, "split": {"val": 2, "test": 2}}
    )
    with pytest.raises(ConfigError, match="'text'"):
        task.setup(tokenizer, 0)
    ppo = build_task({"name": "ppo", "algorithm": "ppo", "epochs": 4, "minibatches": 2})
    with pytest.raises(ConfigError, match=r"trainer.max_steps=10 is not valid; accepted: a multiple of 8"):
        check_stepping_task(ppo, OmegaConf.create({"max_steps": 10, "accumulate_grad_batches": 1}))
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=2"):
        check_stepping_task(ppo, OmegaConf.create({"max_steps": 16, "accumulate_grad_batches": 2}))
    check_stepping_task(ppo, OmegaConf.create({"max_steps": 16, "accumulate_grad_batches": 1}))


def test_a_reward_model_on_another_base_is_refused_when_the_policy_is_built(tiny_model: Any) -> None:
    """A reward part with `check_policy_base` (the reward-model reward) sees the policy before the method is
    applied; its one-line ConfigError passes through `head`."""
    from peftbench.rl.rewards import WeightedReward

    class OtherBase:
        def check_policy_base(self, model: torch.nn.Module) -> None:
            raise ConfigError("reward_model path='x' was trained on another base model than the policy's")

        def __call__(self, prompts: Any, completions: Any, metadata: Any) -> torch.Tensor:
            return torch.zeros(len(completions))

    task = build_task({"name": "grpo"})
    task.reward_fn = WeightedReward((("reward_model", 1.0, OtherBase()),))
    with pytest.raises(ConfigError, match="another base"):
        task.head(tiny_model)
