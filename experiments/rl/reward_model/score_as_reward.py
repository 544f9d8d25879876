"""Load the committed reward-model run as a reward (what PPO does) and score its own held-out test pairs.

    python experiments/rl/reward_model/score_as_reward.py experiments/rl/reward_model/run

Rebuilds the run's test pairs from its record (same data, split and lengths), hands the reward the user
prompts as text (article cut to the run's max_source_tokens, in the headline prompt) with the chosen and the
rejected headline as completions, and prints the pair accuracy and mean margin it gives: they must equal the
run's own `test/pair_accuracy` and `test/reward_margin` (the same model, reloaded from disk). It also checks
the policy base (SmolLM2 as loaded) against the reward model's fingerprint.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import peftbench.tasks  # noqa: F401  (the task registry before peftbench.rl)
from peftbench.models import load_model
from peftbench.rl.rewards import build_reward
from peftbench.tasks import build_task
from peftbench.tasks.collate import truncate_texts


def main(run_dir: Path) -> None:
    record = json.loads((run_dir / "record.json").read_text())
    started = time.perf_counter()
    reward = build_reward("reward_model", {"reward_model": {"path": str(run_dir), "batch_size": 16}})
    loaded_s = time.perf_counter() - started
    scorer = reward.parts[0][2]
    task = build_task(record["config"]["task"])
    parts, _, _ = task._pairs()
    pairs = parts["test"]
    articles = truncate_texts(scorer.tokenizer, [p["prompt"] for p in pairs], task.max_source_tokens)
    prompts = [task.prompt.format(source=a) for a in articles]
    started = time.perf_counter()
    scores = reward(
        prompts * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], [{}] * (2 * len(pairs))
    )
    scored_s = time.perf_counter() - started
    n = len(pairs)
    margins = scores[:n] - scores[n:]
    policy, _ = load_model(record["config"]["model"])
    reward.check_policy_base(policy)  # raises ConfigError on another base
    print(
        json.dumps(
            {
                "pairs": n,
                "pair_accuracy_as_reward": 100.0 * float((margins > 0).float().mean()),
                "reward_margin_as_reward": float(margins.mean()),
                "record_test_pair_accuracy": record["metrics"]["test/pair_accuracy"],
                "record_test_reward_margin": record["metrics"]["test/reward_margin"],
                "policy_base_check": "same base: accepted",
                "load_s": round(loaded_s, 1),
                "score_s": round(scored_s, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
