"""The pure core of RL from feedback (peftbench.rl): advantages, losses, rewards, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from peftbench.errors import ConfigError
from peftbench.rl.advantages import (
    check_group_size,
    gae,
    group_advantages,
    kl_penalised_rewards,
    ppo_token_rewards,
    rloo_advantages,
    rloo_baseline,
    whiten,
)
from peftbench.rl.losses import (
    aggregate,
    clipped_surrogate,
    completion_logprobs,
    completion_mask,
    entropy_stat,
    grpo_variant,
    k3_kl,
    policy_loss,
    reinforce_loss,
    token_logprobs,
    value_loss,
)
from peftbench.rl.rewards import FormatReward, LabelMatchReward, RougeLReward, build_reward
from peftbench.rl.stats import mean_stats, rollout_stats, zero_spread_share
from tests.helpers import tiny_llama

# A ragged right-padded mask: completions of 3, 1, 4 and 2 tokens.
RAGGED = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)


# ---- advantages -----------------------------------------------------------------------------------------
def test_group_advantages_sum_to_zero_and_equal_rewards_give_zero() -> None:
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.4, 2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 0.0, 3.0])
    for scale in ("group", "none"):
        advantages = group_advantages(rewards, 4, scale=scale).view(3, 4)
        assert torch.allclose(advantages.sum(dim=1), torch.zeros(3), atol=1e-6)
        assert torch.equal(advantages[1], torch.zeros(4))  # equal rewards: exactly 0
    group = rewards[:4]
    expected = (group - group.mean()) / (group.std() + 1e-4)
    assert torch.allclose(group_advantages(rewards, 4)[:4], expected)
    assert torch.allclose(group_advantages(rewards, 4, scale="none")[:4], group - group.mean())
    with pytest.raises(ConfigError):
        group_advantages(rewards, 4, scale="batch")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [1, 0, -2, True, 2.0, "4"])
def test_group_size_below_two_is_refused_in_one_line(bad: object) -> None:
    with pytest.raises(ConfigError, match="integer >= 2") as err:
        check_group_size(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        group_advantages(torch.zeros(4), bad)  # type: ignore[arg-type]


def test_rewards_that_do_not_split_into_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_rloo_baseline_matches_a_brute_force_loop() -> None:
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0))
    k = 3
    brute = []
    for i in range(12):
        start = i - i % k
        others = [float(rewards[j]) for j in range(start, start + k) if j != i]
        brute.append(sum(others) / len(others))
    assert torch.allclose(rloo_baseline(rewards, k), torch.tensor(brute), atol=1e-6)
    assert torch.allclose(rloo_advantages(rewards, k), rewards - torch.tensor(brute), atol=1e-6)
    assert torch.allclose(rloo_advantages(rewards, k).view(4, 3).sum(dim=1), torch.zeros(4), atol=1e-5)


def test_kl_penalised_rewards() -> None:
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    got = kl_penalised_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, beta=0.1)
    assert torch.allclose(got, torch.tensor([1.0 - 0.1 * (0.5 - 1.0), 2.0 - 0.1 * (0.0 + 0.5 + 2.5)]))


def _hand_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    advantages, next_value, next_advantage = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        advantages[t] = next_advantage = delta + gamma * lam * next_advantage
        next_value = values[t]
    return advantages


def test_gae_matches_a_hand_computed_recursion_on_ragged_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(4, 4, generator=generator), torch.randn(4, 4, generator=generator)
    advantages, returns = gae(rewards, values, RAGGED, gamma=0.9, lam=0.8)
    for row in range(4):
        n = int(RAGGED[row].sum())
        hand = _hand_gae(rewards[row, :n].tolist(), values[row, :n].tolist(), 0.9, 0.8)
        assert torch.allclose(advantages[row, :n], torch.tensor(hand), atol=1e-6)
        assert torch.equal(advantages[row, n:], torch.zeros(4 - n))
        assert torch.allclose(returns[row, :n], torch.tensor(hand) + values[row, :n], atol=1e-6)
    # gamma = lam = 1: the return is the sum of the rewards still to come (Monte Carlo).
    _, returns = gae(rewards, values, RAGGED, gamma=1.0, lam=1.0)
    future = (rewards * RAGGED).flip(-1).cumsum(-1).flip(-1) * RAGGED
    assert torch.allclose(returns, future, atol=1e-5)


def test_ppo_token_rewards_put_the_score_on_the_last_token() -> None:
    logp_old, ref = torch.full((4, 4), -1.0), torch.full((4, 4), -1.5)
    got = ppo_token_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]), logp_old, ref, RAGGED, beta=0.1)
    expected = -0.1 * 0.5 * RAGGED
    for row, last in enumerate([2, 0, 3, 1]):
        expected[row, last] += row + 1.0
    assert torch.allclose(got, expected)


def test_whiten_over_masked_positions() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    white = whiten(x, mask)
    kept = white[mask.bool()]
    assert abs(float(kept.mean())) < 1e-6 and abs(float(kept.var()) - 1.0) < 1e-5
    assert torch.equal(white[~mask.bool()], torch.zeros(4))
    assert abs(float(whiten(x, mask, shift_mean=False)[mask.bool()].mean()) - 2.5) < 1e-5


# ---- log-probs ------------------------------------------------------------------------------------------
def test_completion_mask_ends_at_the_first_eos() -> None:
    ids = torch.tensor([[5, 6, 2, 0, 2], [2, 7, 7, 7, 7], [5, 6, 7, 8, 9], [5, 3, 9, 2, 2]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert torch.equal(completion_mask(ids, [2, 3]), expected.float())
    assert torch.equal(completion_mask(ids, 2)[3], torch.tensor([1.0, 1, 1, 1, 0]))


def test_token_logprobs_and_entropy() -> None:
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([[0, 6, 3], [1, 1, 2]])
    for temperature in (1.0, 0.7):
        full = torch.log_softmax(logits / temperature, dim=-1)
        expected = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(token_logprobs(logits, tokens, temperature), expected, atol=1e-6)
    uniform = entropy_stat(torch.zeros(2, 3, 7), torch.ones(2, 3))
    assert abs(float(uniform) - math.log(7)) < 1e-6


def test_completion_logprobs_match_the_sampling_distribution_with_left_padded_prompts() -> None:
    """Recomputed in one forward pass, the log-probs equal those of sampling with the KV cache."""
    model = tiny_llama(seed=3)
    prompts = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.manual_seed(4)
    out = model.generate(
        input_ids=prompts,
        attention_mask=prompt_mask,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=6,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    completion = out.sequences[:, 5:]
    sampled = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    sampled = sampled.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    attention = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
    with torch.no_grad():
        logp = completion_logprobs(model, out.sequences, attention, completion.shape[1])
    mask = completion_mask(completion, model.config.eos_token_id)
    assert torch.allclose(logp * mask, sampled * mask, atol=1e-4)


# ---- losses ---------------------------------------------------------------------------------------------
def test_k3_kl_is_zero_for_equal_policies_and_never_negative() -> None:
    logp = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(k3_kl(logp, logp.clone()), torch.zeros(3, 5))
    other = logp + torch.randn(3, 5, generator=torch.Generator().manual_seed(6)) * 3
    assert bool((k3_kl(logp, other) >= 0).all())
    # Unbiased for KL(p || q) on samples of p.
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.1, 0.3, 0.3, 0.3])
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(7))
    estimate = k3_kl(p.log()[samples], q.log()[samples]).mean()
    assert abs(float(estimate) - float((p * (p / q).log()).sum())) < 0.01


def test_aggregations_match_hand_computations_on_ragged_masks() -> None:
    per_token = torch.arange(16, dtype=torch.float32).view(4, 4) - 5.0
    rows = [
        [v for v, m in zip(per_token[i].tolist(), RAGGED[i].tolist(), strict=True) if m] for i in range(4)
    ]
    assert math.isclose(
        float(aggregate(per_token, RAGGED, "sequence_mean")), sum(sum(r) / len(r) for r in rows) / 4
    )
    assert math.isclose(float(aggregate(per_token, RAGGED, "sequence_sum")), sum(sum(r) for r in rows) / 4)
    total, count = sum(sum(r) for r in rows), sum(len(r) for r in rows)
    assert math.isclose(float(aggregate(per_token, RAGGED, "token_mean")), total / count)
    assert math.isclose(float(aggregate(per_token, RAGGED, "token_mean", normaliser=20)), total / 20)
    assert math.isclose(float(aggregate(per_token, RAGGED, "constant")), total / 16)
    assert math.isclose(float(aggregate(per_token, RAGGED, "constant", normaliser=4 * 8)), total / 32)
    with pytest.raises(ConfigError):
        aggregate(per_token, RAGGED, "mean")  # type: ignore[arg-type]


def test_grpo_variants() -> None:
    assert grpo_variant("grpo") == ("group", "sequence_mean")
    assert grpo_variant("dr_grpo") == ("none", "constant")
    assert grpo_variant("dapo") == ("group", "token_mean")
    with pytest.raises(ConfigError, match="accepted: grpo, dr_grpo, dapo"):
        grpo_variant("ppo")


def test_clipping_is_exactly_where_the_gradient_vanishes() -> None:
    ratios = torch.tensor([[0.5, 0.85, 1.0, 1.15, 1.5], [0.5, 0.85, 1.0, 1.15, 1.5]])
    advantages = torch.tensor([1.0, -1.0])
    old = torch.full((2, 5), -2.0)
    logp = (old + ratios.log()).requires_grad_()
    loss, ratio, clipped = clipped_surrogate(logp, old, advantages, eps_low=0.2)
    assert torch.allclose(ratio, ratios)
    expected_clipped = torch.tensor([[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(clipped, expected_clipped)
    # A > 0: -min(rho, clip(rho)); A < 0: max(rho, clip(rho)).
    assert torch.allclose(loss[0], -torch.tensor([0.5, 0.85, 1.0, 1.15, 1.2]))
    assert torch.allclose(loss[1], torch.tensor([0.8, 0.85, 1.0, 1.15, 1.5]))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.equal(grad == 0, expected_clipped)
    assert torch.allclose(grad[~expected_clipped], (-advantages.unsqueeze(1) * ratios)[~expected_clipped])
    # DAPO's clip-higher: the upper bound moves, the lower one stays.
    _, _, clipped = clipped_surrogate(logp, old, advantages, eps_low=0.2, eps_high=0.6)
    assert torch.equal(clipped, torch.tensor([[0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool))
    _, stats = policy_loss(logp, old, advantages, torch.ones(2, 5))
    assert float(stats["clip_fraction"]) == pytest.approx(0.2)


def _llama_logprobs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(8))
    logp = completion_logprobs(model, ids, torch.ones_like(ids), completion_length=4)
    return logp, RAGGED


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
def test_one_update_without_kl_has_the_reinforce_gradient(aggregation: str) -> None:
    model = tiny_llama(seed=9)
    params = [p for p in model.parameters() if p.requires_grad]
    logp, mask = _llama_logprobs(model)
    advantages = group_advantages(torch.tensor([0.2, 0.9, 0.4, 0.0]), 2)
    loss, stats = policy_loss(logp, logp.detach(), advantages, mask, aggregation=aggregation, beta=0.0)
    assert float(stats["clip_fraction"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    grpo = torch.autograd.grad(loss, params, retain_graph=True)
    weighted = -advantages.unsqueeze(1) * logp * mask  # REINFORCE's surrogate, normalised by hand
    if aggregation == "sequence_mean":
        reinforce = (weighted.sum(dim=1) / mask.sum(dim=1)).mean()
    elif aggregation == "token_mean":
        reinforce = weighted.sum() / mask.sum()
    else:
        reinforce = weighted.sum() / mask.numel()
    expected = torch.autograd.grad(reinforce, params)
    # The values differ (the surrogate is -A at ratio 1), the gradients do not.
    assert float(loss) == pytest.approx(
        float(aggregate(-advantages.unsqueeze(1).expand(4, 4), mask, aggregation))
    )
    for got, want in zip(grpo, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in grpo)


def test_kl_term_and_rloo_loss() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.1]], requires_grad=True)
    ref = torch.tensor([[-1.2, -2.0, -1.0], [-0.4, -0.9, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([0.5, -0.5])
    loss, stats = policy_loss(logp, logp.detach(), advantages, mask, ref_logp=ref, beta=0.04)
    kl = k3_kl(logp, ref).detach()
    plain, _ = policy_loss(logp, logp.detach(), advantages, mask)
    per_sequence_kl = (kl * mask).sum(1) / mask.sum(1)
    assert math.isclose(float(loss - plain), 0.04 * float(per_sequence_kl.mean()), rel_tol=1e-4)
    assert math.isclose(float(stats["kl_per_token"]), float((kl * mask).sum() / mask.sum()), rel_tol=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp.detach(), advantages, mask, beta=0.1)
    rloo = reinforce_loss(logp, advantages, mask)
    assert math.isclose(float(rloo), float(-(0.5 * (-3.0) + -0.5 * (-1.3)) / 2), rel_tol=1e-6)


def test_clipped_value_loss() -> None:
    values = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.0, 2.5], [0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 2.0], [0.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # Per token: max((v - R)^2, (clip(v, old +- 0.2) - R)^2).
    hand = [max(1.0, 1.3**2), 1.0, max(0.0, 0.3**2), 0.25, max(0.0, 0.8**2)]
    assert math.isclose(float(loss), 0.5 * sum(hand) / 5, rel_tol=1e-6)
    assert float(stats["value_clip_fraction"]) == pytest.approx(3 / 5)


# ---- rewards --------------------------------------------------------------------------------------------
def test_rouge_l_reward() -> None:
    completions = [
        "the cat sat on the mat",
        "The cat on mat.",
        "dogs bark loudly",
        "the cat sat on the mat\nmore",
    ]
    meta = [{"reference": "the cat sat on the mat"}] * 4
    got = RougeLReward()(["p"] * 4, completions, meta)
    # LCS 4 of 4 predicted and 6 reference words: F = 2 * 1 * (2/3) / (1 + 2/3) = 0.8.
    assert torch.allclose(got, torch.tensor([1.0, 0.8, 0.0, 1.0]))
    with pytest.raises(ConfigError, match="'reference'"):
        RougeLReward()(["p"], ["x"], [{"label": "y"}])
    with pytest.raises(ValueError, match="one of each"):
        RougeLReward()(["p"], ["x", "y"], meta[:2])


def test_label_match_and_format_rewards() -> None:
    completions = ["Positive.", "positive, clearly", "negative", "  POSITIVE  \nnegative"]
    meta = [{"label": "positive"}] * 4
    assert LabelMatchReward()(["p"] * 4, completions, meta).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert LabelMatchReward(prefix=True)(["p"] * 4, completions, meta).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert LabelMatchReward()(["p"], ["anything"], [{"label": ""}]).tolist() == [0.0]
    texts = ["two words", "", "one two three four", "a\nb", "  padded  "]
    assert FormatReward(min_words=1, max_words=3)(["p"] * 5, texts, [{}] * 5).tolist() == [1, 0, 0, 0, 1]
    assert FormatReward(max_words=3, single_line=False)(["p"] * 5, texts, [{}] * 5).tolist() == [
        1,
        0,
        0,
        1,
        1,
    ]
    with pytest.raises(ConfigError, match="min_words"):
        FormatReward(min_words=5, max_words=2)


def test_weighted_sum_of_rewards() -> None:
    reward = build_reward({"rouge_l": 0.5, "format": 0.25}, {"format": {"max_words": 5}})
    completions = ["the cat on mat", "the cat sat on the mat"]
    meta = [{"reference": "the cat sat on the mat"}] * 2
    got = reward(["p", "p"], completions, meta)
    assert torch.allclose(got, torch.tensor([0.5 * 0.8 + 0.25, 0.5 * 1.0 + 0.0]))
    parts = reward.components(["p", "p"], completions, meta)
    assert set(parts) == {"rouge_l", "format"} and parts["format"].tolist() == [1.0, 0.0]
    assert torch.equal(build_reward("label_match")(["p"], ["yes"], [{"label": "Yes"}]), torch.tensor([1.0]))


@pytest.mark.parametrize(
    ("weights", "options", "message"),
    [
        ({"bleu": 1.0}, None, "reward='bleu' is not valid; accepted: rouge_l, label_match, format"),
        ({"rouge_l": 1.0}, {"blue": {}}, "reward='blue' is not valid"),
        ({"rouge_l": -1.0}, None, "a finite number >= 0"),
        ({"rouge_l": float("nan")}, None, "a finite number >= 0"),
        ({"rouge_l": True}, None, "a finite number >= 0"),
        ({"rouge_l": "1"}, None, "a finite number >= 0"),
        ({"rouge_l": 0, "format": 0.0}, None, "not all 0"),
        ({}, None, "accepted: a reward name"),
        ({"format": 1.0}, {"format": {"max_chars": 3}}, "bad options"),
    ],
)
def test_bad_reward_configs_are_refused_in_one_line(
    weights: dict, options: dict | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        build_reward(weights, options)
    assert "\n" not in str(err.value)


# ---- statistics and a toy run ---------------------------------------------------------------------------
def test_rollout_stats() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    logp = torch.full((6, 4), -1.0)
    stats = rollout_stats(rewards, 2, torch.ones(6, 4), logp=logp, ref_logp=logp.clone(), clip_fraction=0.25)
    assert stats["zero_spread_groups"] == pytest.approx(2 / 3)
    assert stats["reward_mean"] == pytest.approx(4 / 6)
    assert stats["reward_std"] == pytest.approx(float(rewards.std(unbiased=False)))
    assert stats["kl"] == 0.0 and stats["kl_per_token"] == 0.0 and stats["clip_fraction"] == 0.25
    assert stats["completion_length"] == 4.0
    mask = RAGGED.repeat(2, 1)[:6]
    ref = logp - 0.5
    stats = rollout_stats(rewards, 3, mask, logp=logp, ref_logp=ref, generation_seconds=2.0)
    per_token = math.exp(-0.5) + 0.5 - 1
    assert stats["kl_per_token"] == pytest.approx(per_token)
    assert stats["kl"] == pytest.approx(per_token * float(mask.sum()) / 6)
    assert stats["generation_tokens_per_s"] == pytest.approx(float(mask.sum()) / 2.0)
    assert stats["completion_length"] == pytest.approx(float(mask.sum()) / 6)
    assert zero_spread_share(torch.tensor([0.3, 0.3 + 1e-9, 0.0, 1.0]), 2) == 0.5
    assert mean_stats([{"a": 1.0, "b": torch.tensor(2.0)}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}


def test_a_toy_reward_rises_under_grpo_updates() -> None:
    """A one-step 'language model' (logits over 6 tokens for each of 4 prompts); reward 1 for token 2."""
    torch.manual_seed(10)
    logits = torch.zeros(4, 6, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=2.0)
    group, means = 8, []
    for _ in range(15):
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1).repeat_interleave(group, dim=0)
            tokens = torch.multinomial(probs, 1)
        rewards = (tokens.squeeze(1) == 2).float()
        means.append(float(torch.softmax(logits.detach(), -1)[:, 2].mean()))  # the expected reward
        logp = token_logprobs(logits.repeat_interleave(group, dim=0).unsqueeze(1), tokens)
        loss, _ = policy_loss(logp, logp.detach(), group_advantages(rewards, group), torch.ones_like(logp))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert means[0] == pytest.approx(1 / 6) and means[-1] > 0.5


@pytest.mark.parametrize(
    "module",
    ["peftbench.rl.losses", "peftbench.rl.rewards", "peftbench.rl.reward_model", "peftbench.tasks.reinforce"],
)
def test_rl_modules_import_first_in_a_fresh_interpreter(module: str) -> None:
    """`peftbench.rl.rewards` uses text helpers from `peftbench.tasks`, whose registry imports the RL task:
    importing either first in a fresh process must not hit a circular import."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
