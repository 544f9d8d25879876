"""A trained reward model as a reward: a `task=reward_model` run directory (`peftbench.tasks.reward_model`)
loaded back and scoring prompt + completion text (METHODS.md, "Reinforcement learning from feedback":
rewards "or a trained reward model (a reward-model run directory)"; InstructGPT, arXiv 2203.02155, Sec. 3.5).

`load_reward_model(path)` checks that `path` is one: a run directory (or its `adapter/` directory) with a
`record.json` whose task is `reward_model`, the adapter file holding the head's tensors, and
`adapter/reward_model.json` (the base fingerprint and the encoding); then it rebuilds the base from the run's
own `model` config, checks that these are still the weights it was trained on (`base_fingerprint`), applies
the saved method and head, and keeps the model in eval mode without gradients. Any failed check is a
one-line ConfigError.

Scoring encodes each (prompt, completion) as the training pairs were (`tasks/collate.encode_examples`: the
prompt, a user message, in the chat template; the completion cut to the run's `max_target_tokens` and ended
by EOS), right-pads `batch_size` at a time and reads the head at the last non-padding token. `prompts` are
the user prompts as text, before the chat template (what the RL tasks hand a reward).

`check_policy_base(model)` refuses a policy on another base than the reward model's: the base weights are
compared by fingerprint, not by name (call it on the policy as loaded, before its method is applied).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftbench.errors import ConfigError, bad_value, is_int
from peftbench.rl.reward_protocol import Metadata, check_lengths
from peftbench.tasks.collate import _pad, encode_examples, pad_token_id
from peftbench.tasks.reward_head import HEAD_NAME, attach_head, sequence_rewards
from peftbench.tasks.reward_model import REWARD_MODEL_FILE, REWARD_MODEL_FORMAT

TASK_NAME = "reward_model"
#: a prompt is cut to this many tokens when `max_prompt_tokens` is null (in effect: never)
NO_LIMIT = 1 << 30


@dataclass(frozen=True)
class RewardModelRun:
    """Where a reward-model run's files are, and what they say."""

    run_dir: Path
    adapter_dir: Path
    model_config: dict[str, Any]
    info: dict[str, Any]  # reward_model.json


def _not_one(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"reward_model path={str(path)!r} is not a reward-model run ({why}); accepted: the run directory "
        f"of a task={TASK_NAME} run (record.json, adapter/adapter.safetensors, adapter/{REWARD_MODEL_FILE})"
    )


def locate_reward_model(path: str | Path) -> RewardModelRun:
    """The files of a reward-model run directory (or of its adapter directory); ConfigError if it is not
    one: missing record, adapter, head tensors or reward_model.json, or a record of another task."""
    from safetensors import safe_open

    from peftbench.methods.io import ADAPTER_FILE
    from peftbench.record import RECORD_FILE
    from peftbench.saved_run import ADAPTER_DIR, run_model_config

    path = Path(path).expanduser()
    if not path.is_dir():
        raise _not_one(path, "no such directory")
    run_dir = path.parent if (path / ADAPTER_FILE).is_file() and path.name == ADAPTER_DIR else path
    adapter_dir = run_dir / ADAPTER_DIR
    record_path = run_dir / RECORD_FILE
    if not record_path.is_file():
        raise _not_one(path, f"no {RECORD_FILE}")
    try:
        task = json.loads(record_path.read_text()).get("task")
    except (OSError, ValueError) as err:
        raise _not_one(path, f"{RECORD_FILE} is not readable: {err}") from None
    if task != TASK_NAME:
        raise _not_one(path, f"its task was {task!r}")
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise _not_one(path, f"no {ADAPTER_DIR}/{ADAPTER_FILE}")
    try:
        with safe_open(str(adapter_dir / ADAPTER_FILE), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise _not_one(path, f"{ADAPTER_FILE} is not readable: {err}") from None
    if not {f"{HEAD_NAME}.weight", f"{HEAD_NAME}.bias"} <= keys:
        raise _not_one(path, f"the adapter holds no {HEAD_NAME} tensors")
    try:
        info = json.loads((adapter_dir / REWARD_MODEL_FILE).read_text())
    except (OSError, ValueError):
        raise _not_one(path, f"no readable {ADAPTER_DIR}/{REWARD_MODEL_FILE}") from None
    if not isinstance(info, dict) or info.get("format") != REWARD_MODEL_FORMAT:
        raise _not_one(path, f"{REWARD_MODEL_FILE} is not a {REWARD_MODEL_FORMAT} file")
    if not info.get("base_fingerprint"):
        raise _not_one(path, f"{REWARD_MODEL_FILE} has no base fingerprint (a later stage of a stages run)")
    model_config = run_model_config(run_dir)
    if model_config is None:
        raise _not_one(path, f"{RECORD_FILE} holds no model config")
    return RewardModelRun(run_dir, adapter_dir, model_config, info)


class RewardModelReward:
    """A loaded reward model: `reward(prompts, completions, metadata)` -> `(n,)` float32 rewards on CPU."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        run: RewardModelRun,
        batch_size: int = 16,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.tokenizer = tokenizer
        self.run = run
        self.base_fingerprint: str = run.info["base_fingerprint"]
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_target_tokens = int(run.info["max_target_tokens"])

    def to(self, device: str | torch.device) -> RewardModelReward:
        """Move the model (e.g. to the policy's GPU); returns self."""
        self.model.to(device)
        return self

    def check_policy_base(self, model: nn.Module) -> None:
        """ConfigError when `model` (the policy as loaded, before its method) is another base than the one
        this reward model was trained on (compared by `base_fingerprint`)."""
        from peftbench.models.fingerprint import base_fingerprint

        found = base_fingerprint(model)
        if found != self.base_fingerprint:
            raise ConfigError(
                f"reward_model path={str(self.run.run_dir)!r} was trained on another base model than the "
                f"policy's (base fingerprint {self.base_fingerprint[:19]}..., the policy's {found[:19]}...); "
                "accepted: a reward model trained on the policy's base"
            )

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[Metadata]
    ) -> torch.Tensor:
        check_lengths(prompts, completions, metadata)
        encoded = encode_examples(
            self.tokenizer,
            "{source}",
            list(prompts),
            list(completions),
            self.max_prompt_tokens or NO_LIMIT,
            self.max_target_tokens,
        )
        device = next(self.model.parameters()).device
        pad = pad_token_id(self.tokenizer)
        self.model.eval()
        scores = []
        for start in range(0, len(encoded), self.batch_size):
            rows = [ex.prompt_ids + ex.target_ids for ex in encoded[start : start + self.batch_size]]
            ids = _pad(rows, pad, left=False).to(device)
            mask = _pad([[1] * len(row) for row in rows], 0, left=False).to(device)
            scores.append(sequence_rewards(self.model, ids, mask).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float32)


def load_reward_model(
    path: str,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    device: str | None = None,
) -> RewardModelReward:
    """Load a reward-model run directory as a reward (see the module doc).

    Args:
        path: the run directory of a `task=reward_model` run (or its `adapter/` directory).
        batch_size: sequences scored per forward pass.
        max_prompt_tokens: cut each prompt to this many tokens (null: as given; the RL tasks cut theirs).
        device: where the reward model runs (null: CPU).
    """
    from peftbench.methods.io import load_adapter
    from peftbench.models import load_model
    from peftbench.models.fingerprint import base_fingerprint

    if not is_int(batch_size) or batch_size < 1:
        raise bad_value("reward_model batch_size", batch_size, "an integer >= 1")
    if max_prompt_tokens is not None and (not is_int(max_prompt_tokens) or max_prompt_tokens < 1):
        raise bad_value("reward_model max_prompt_tokens", max_prompt_tokens, "null or an integer >= 1")
    run = locate_reward_model(path)
    model, tokenizer = load_model(run.model_config)
    found, trained = base_fingerprint(model), run.info["base_fingerprint"]
    if found != trained:
        raise ConfigError(
            f"reward_model path={str(run.run_dir)!r}: its model config now loads other base weights than it "
            f"was trained on (fingerprint {found[:19]}..., trained on {trained[:19]}...); "
            "accepted: the same base (restore it, or retrain the reward model)"
        )
    attach_head(model, TASK_NAME)
    load_adapter(model, run.adapter_dir)
    reward = RewardModelReward(model, tokenizer, run, batch_size, max_prompt_tokens)
    return reward.to(device) if device else reward
