"""RL from feedback as a task: GRPO (Dr.GRPO, DAPO), RLOO and PPO on prompts, with any method.

One class serves `task=grpo`, `task=rloo` and `task=ppo` (conf/task/<name>.yaml set `algorithm` and its
defaults). The prompts are the headline task's (`SummarizationTask`'s data, template and splits: "write a
headline for this news article"); the reference headline is each prompt's metadata, so the default reward,
ROUGE-L against it, is verifiable. Rewards come from `peftbench.rl.rewards.build_reward` (a name, or a
`{name: weight}` sum, with `reward_options`).

A training batch (`batch_size` prompts) is one rollout batch: the task steps the optimizer itself
(`manual_optimization`, peftbench/tasks/stepping.py):
1. sample G completions per prompt with the KV cache, seeded from (seed, optimizer steps done, rank)
   (`rl/rollout.py`): a resumed run draws the same samples; DDP shards prompts, so a group stays on a rank;
2. score them (the reward), and take the reference policy's log-probs (adapters disabled, or a frozen copy:
   `tasks/reference.py`);
3. `epochs` x `minibatches` updates, one real optimizer step each (`rl/updates.py`).
The policy runs without dropout (eval mode) while sampling and updating: the log-probs of the update are
then those of the sampling policy, and the KL to the reference is exactly 0 before the first update for an
adapter that starts as the identity. The batch's statistics (reward mean/std, share of groups with zero
reward spread, KL, clip fraction, completion length, generation tokens/s, generation seconds, step
seconds, a checksum of the sampled token ids) are logged as `train/<key>` and kept in the record
(`record.Rollouts`).

Evaluation (val/test): greedy headlines of the held-out prompts; `reward` (primary: the mean reward of the
greedy completion), ROUGE-1/2/L x 100 against the reference, the loss of the reference headline and the
forgetting probe.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftbench.rl.policy import VALUE_HEAD, new_value_head, policy_logprobs
from peftbench.rl.rewards import build_reward
from peftbench.rl.rollout import Rollout, sample_completions, sampling_seed
from peftbench.rl.updates import UpdateSettings, update_policy
from peftbench.tasks.base import Batch
from peftbench.tasks.collate import CausalLMCollator, Encoded, pad_token_id, truncate_texts
from peftbench.tasks.datatask import Collate
from peftbench.tasks.reference import ReferencePolicy
from peftbench.tasks.rouge import rouge_scores
from peftbench.tasks.sources import map_columns
from peftbench.tasks.splits import split_records
from peftbench.tasks.stepping import StepContext
from peftbench.tasks.summarization import SummarizationTask


@dataclass
class Prompt:
    """One prompt: its tokens (and the reference headline's, for the evaluation loss), the user prompt as
    text (what a reward model reads) and its reference."""

    encoded: Encoded
    text: str


class PromptCollator:
    """Prompts as a batch: `CausalLMCollator`'s evaluation batch (left-padded `gen_input_ids` and
    `gen_attention_mask`, the reference `input_ids`/`labels`, `references`) plus `prompts` (texts) and
    `metadata` (`{"reference": ...}` per prompt, what the verifiable rewards read)."""

    def __init__(self, pad_id: int) -> None:
        self.inner = CausalLMCollator(pad_id, for_generation=True)

    def __call__(self, examples: Sequence[Prompt]) -> dict[str, Any]:
        batch = self.inner([ex.encoded for ex in examples])
        batch["prompts"] = [ex.text for ex in examples]
        batch["metadata"] = [{"reference": ex.encoded.reference} for ex in examples]
        return batch


def completion_texts(tokenizer: Any, rollout: Rollout) -> list[str]:
    """Each completion's tokens up to its first EOS (excluded), decoded without special tokens."""
    lengths = rollout.mask.sum(dim=-1).long().tolist()
    rows = [ids[:n].tolist() for ids, n in zip(rollout.completion_ids, lengths, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def sample_checksum(rollout: Rollout) -> float:
    """A fingerprint of the sampled token ids (exact in a float64 for any vocabulary below 2**20 and
    batches of a few thousand tokens): equal on a resumed run that draws the same samples."""
    ids = (rollout.completion_ids.long() * rollout.mask.long()).cpu()
    weights = torch.arange(1, ids.numel() + 1, dtype=torch.long).view_as(ids) % 997 + 1
    return float((ids * weights).sum())


@dataclass(kw_only=True, eq=False)
class ReinforceTask(SummarizationTask):
    """RL from feedback on the headline prompts (see the module doc).

    Args (besides `SummarizationTask`'s; `max_new_tokens` is the sampling and greedy budget):
        algorithm: grpo | rloo | ppo.
        loss_type: GRPO's flavour: grpo | dr_grpo | dapo (`rl/losses.py: GRPO_VARIANTS`).
        group_size: G, samples per prompt (>= 2).
        temperature: sampling temperature (log-probs are taken at the same one).
        beta: KL coefficient (GRPO: k3 term in the loss; RLOO and PPO: penalty in the reward).
        epsilon, epsilon_high: the clip band `[1 - epsilon, 1 + epsilon_high]` (null: epsilon).
        epochs, minibatches: updates per rollout batch = epochs x minibatches, one optimizer step each.
        gamma, lam, value_coef, value_clip, whiten_advantages: PPO's GAE and value loss.
        reward: a reward name or `{name: weight}` (`rl/rewards.py`); reward_options: `{name: {kwargs}}`.
    """

    primary_metric: ClassVar[str] = "reward"
    manual_optimization: ClassVar[bool] = True

    name: str = "grpo"
    max_new_tokens: int = 16
    algorithm: str = "grpo"
    loss_type: str = "grpo"
    group_size: int = 4
    temperature: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    epochs: int = 1
    minibatches: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    value_coef: float = 0.1
    value_clip: float = 0.2
    whiten_advantages: bool = True
    reward: Any = "rouge_l"
    reward_options: Mapping[str, Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.settings = UpdateSettings(
            algorithm=self.algorithm,
            loss_type=self.loss_type,
            group_size=self.group_size,
            temperature=self.temperature,
            beta=self.beta,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            epochs=self.epochs,
            minibatches=self.minibatches,
            gamma=self.gamma,
            lam=self.lam,
            value_coef=self.value_coef,
            value_clip=self.value_clip,
            whiten_advantages=self.whiten_advantages,
            max_new_tokens=self.max_new_tokens,
        )
        self.settings.check()
        self.reward_fn = build_reward(self.reward, self.reward_options)
        self.reference = ReferencePolicy(self.name)

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Real optimizer steps per training batch (`epochs x minibatches`)."""
        return self.settings.updates_per_batch()

    # ---- data -----------------------------------------------------------------------------------------
    def setup(self, tokenizer: Any, seed: int) -> None:
        """The headline task's data (load, dedupe, split, tokenize), each example with its user prompt as
        text beside its tokens."""
        super().setup(tokenizer, seed)
        columns = {"source": self.source_column, "target": self.target_column}
        records, _ = map_columns(self.read_source(), columns)
        parts = split_records(records, key=lambda r: r["source"], **self.split).parts()
        for part, rows in parts.items():
            sources = truncate_texts(tokenizer, [r["source"] for r in rows], self.max_source_tokens)
            self._data[part] = [
                Prompt(encoded, self.prompt.format(source=source))
                for encoded, source in zip(self._data[part], sources, strict=True)
            ]

    def collator(self, train: bool) -> Collate:
        """Prompt batches (left-padded for generation) with their texts and metadata, train and eval alike."""
        return PromptCollator(pad_token_id(self._tokenizer))

    # ---- model hooks ----------------------------------------------------------------------------------
    def head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """PPO: a value head (zero-initialised `Linear(hidden, 1)`, attached as `model.rl_value_head`, trained
        beside the method, saved with the adapter). GRPO and RLOO add none."""
        super().head(model)
        self.check_rewards_fit(model)
        self.reference.remember(model)
        if not self.settings.uses_values:
            return None
        head = new_value_head(int(model.config.hidden_size))
        setattr(model, VALUE_HEAD, head)
        return head

    def check_rewards_fit(self, model: torch.nn.Module) -> None:
        """A reward that must match the policy (a reward model trained on the same base) checks it here, on
        the model as loaded, before the method is applied: its one-line ConfigError passes through."""
        for _, _, reward in getattr(self.reward_fn, "parts", ()):
            check = getattr(reward, "check_policy_base", None)
            if callable(check):
                check(model)

    def use_reference(self, reference: Any) -> None:
        """The reference policy: adapters disabled, or a frozen copy (`tasks/reference.py`)."""
        self.reference.use(reference)

    # ---- training: one rollout batch ------------------------------------------------------------------
    def training_step(self, context: StepContext, batch: Batch) -> tuple[torch.Tensor, int]:
        """Sample, score, take the reference's log-probs, update (see the module doc)."""
        started = time.perf_counter()
        model, s = context.model, self.settings
        seed = sampling_seed(self._seed, context.steps_done, context.rank)
        tokenizer = self._tokenizer
        rollout = sample_completions(
            model,
            batch["gen_input_ids"],
            batch["gen_attention_mask"],
            group_size=s.group_size,
            max_new_tokens=self.max_new_tokens,
            temperature=s.temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_token_id(tokenizer),
            seed=seed,
        )
        completions = completion_texts(tokenizer, rollout)
        prompts = [p for p in batch["prompts"] for _ in range(s.group_size)]
        metadata = [m for m in batch["metadata"] for _ in range(s.group_size)]
        rewards = self.reward_fn(prompts, completions, metadata).float()
        was_training = model.training
        model.eval()  # no dropout: the updates' log-probs are those of the policy that sampled
        try:
            with torch.no_grad(), self.reference.model(rollout.sequences.device) as reference:
                ref_logp, _ = policy_logprobs(reference, rollout, s.temperature)
            loss, stats = update_policy(model, rollout, rewards, ref_logp, s, context.optimizer_step, seed)
        finally:
            model.train(was_training)
        self.last_rollout = rollout  # for tests and debugging: the token ids this step sampled
        stats |= {
            "generation_s": rollout.seconds,
            "step_s": time.perf_counter() - started,
            "sample_checksum": sample_checksum(rollout),
        }
        context.log(stats)
        return loss, int(rollout.attention_mask.sum())

    # ---- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, batch: Batch) -> dict[str, list[float]]:
        """Per prompt: the reward of the greedy completion, ROUGE-1/2/L x 100 against the reference, and the
        forgetting probe once per pass."""
        texts = self.generate(model, batch)
        rewards = self.reward_fn(batch["prompts"], texts, batch["metadata"]).float()
        scores = rouge_scores(texts, batch["references"])
        return {"reward": rewards.tolist(), **scores, **self.forgetting.scores(model, batch)}
