"""Reinforcement learning from feedback: the pure tensor core (advantages, losses, rewards, statistics).

Nothing here touches the training loop. Conventions shared by every module:

- a rollout batch holds `n_prompts * G` completions, a prompt's G samples next to each other (row
  `p * G + i` is sample i of prompt p), so that `rewards.view(n_prompts, G)` gives the groups;
- token tensors are `(batch, T)` over the completion tokens only, right-padded; `mask` is 1 on the tokens
  of a completion up to and including its first EOS and 0 after (`losses.completion_mask`);
- per-token tensors (log-probs, values, rewards) are float32 and unmasked: every function takes the mask.
"""
