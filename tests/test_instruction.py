"""Instruction tuning: the mixture (deterministic, disjoint, held-out types), files, masks, metrics, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from peftbench.errors import ConfigError
from peftbench.tasks import InstructionTask
from peftbench.tasks.collate import IGNORE_INDEX
from peftbench.tasks.loaders import PASS_START
from peftbench.tasks.sources import aclsum_records
from tests.helpers import assert_finite, cli_smoke

# the scores of every evaluation pass: the mixture's, the seen and unseen types', each type's own
SCORES = (
    "score",
    "score_seen",
    "score_unseen",
    "rouge_l/headline",
    "rouge_l/approach",
    "accuracy/sentiment",
    "accuracy/section",
)

SMALL = {"val": 2, "test": 3, "max_train": 6}


@pytest.fixture(scope="module")
def mixture(tiny_model_and_tokenizer: Any) -> InstructionTask:
    task = InstructionTask(split=SMALL, probe={"texts": 2, "max_tokens": 16})
    task.setup(tiny_model_and_tokenizer[1], seed=0)
    return task


def _sources(task: InstructionTask, part: str) -> list[tuple[str, str]]:
    tokenizer = task._tokenizer
    return [(ex.kind, tokenizer.decode(ex.prompt_ids)) for ex in task._data[part]]


# ---- the default mixture -------------------------------------------------------------------------------
def test_mixture_is_deterministic_disjoint_and_holds_section_out(
    mixture: InstructionTask, tiny_model_and_tokenizer: Any
) -> None:
    again = InstructionTask(split=SMALL, probe=None)
    again.setup(tiny_model_and_tokenizer[1], seed=5)
    for part in ("train", "val", "test"):
        assert _sources(mixture, part) == _sources(again, part)
    types = {part: [kind for kind, _ in _sources(mixture, part)] for part in ("train", "val", "test")}
    assert sorted(set(types["train"])) == ["approach", "headline", "sentiment"]  # `section` held out
    assert types["train"].count("headline") == 6
    for part in ("val", "test"):
        n = SMALL[part]
        assert types[part] == ["headline"] * n + ["sentiment"] * n + ["section"] * n + ["approach"] * n
    prompts = {part: {p for _, p in _sources(mixture, part)} for part in ("train", "val", "test")}
    assert not (prompts["train"] & prompts["val"]) and not (prompts["train"] & prompts["test"])
    assert not (prompts["val"] & prompts["test"])
    assert mixture.stats["held_out_train_dropped"] > 0
    assert mixture.exact_types == {"sentiment", "section"}


def test_bbc_articles_serve_one_type_only(mixture: InstructionTask) -> None:
    records, _ = mixture._mixture()
    headline = {r["source"] for r in records if r["type"] == "headline"}
    section = {r["source"] for r in records if r["type"] == "section"}
    assert headline and section and not (headline & section)
    assert 900 < len(headline) < 1300 and 900 < len(section) < 1300
    approach = {r["target"] for r in records if r["type"] == "approach"}
    assert approach <= {r["approach"] for r in aclsum_records().records}
    assert {r["target"] for r in records if r["type"] == "sentiment"} == {"positive", "negative"}


def test_labels_cover_the_response_and_eos_only(mixture: InstructionTask) -> None:
    tokenizer = mixture._tokenizer
    batch = next(iter(mixture.val_dataloader(8)))
    assert batch[PASS_START] is True and len(batch["types"]) == batch["input_ids"].shape[0]
    for i, reference in enumerate(batch["references"]):
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert int(labelled[-1]) == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]).strip() == reference.strip() or len(labelled) == 48
        prompt_length = int((batch["labels"][i] == IGNORE_INDEX).long().cumprod(0).sum())
        prompt = tokenizer.decode(batch["input_ids"][i, :prompt_length])
        assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
        gen = batch["gen_input_ids"][i][batch["gen_attention_mask"][i] == 1]
        assert tokenizer.decode(gen) == prompt  # the generation prompt is the same, left-padded


def test_scores_per_type_and_overall(
    mixture: InstructionTask, tiny_model_and_tokenizer: Any, monkeypatch
) -> None:
    model = tiny_model_and_tokenizer[0]
    batch = next(iter(mixture.test_dataloader(64)))
    perfect = [r if i % 2 == 0 else "no idea" for i, r in enumerate(batch["references"])]
    monkeypatch.setattr(mixture, "generate", lambda m, b: perfect)
    scores = mixture.evaluate(model, batch)
    assert set(scores) >= {*SCORES, "loss/headline", "probe_loss"}
    assert len(scores["score"]) == len(batch["references"]) == 12
    assert scores["score"][0] == 100.0 and scores["score"][1] < 100.0
    assert len(scores["accuracy/section"]) == len(scores["score_unseen"]) == 3
    assert set(scores["accuracy/sentiment"]) <= {0.0, 100.0}
    assert all(math.isfinite(v) and v > 0 for v in scores["loss/approach"])
    assert len(scores["probe_loss"]) == 1
    later = dict(batch, **{PASS_START: False})
    assert "probe_loss" not in mixture.evaluate(model, later)


# ---- files ----------------------------------------------------------------------------------------------
def test_alpaca_and_chat_files(tmp_path: Path, tiny_model_and_tokenizer: Any) -> None:
    tokenizer = tiny_model_and_tokenizer[1]
    alpaca = [
        {"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else f"Show work {i}", "output": str(2 * i)}
        for i in range(10)
    ] + [{"instruction": "", "input": "", "output": "dropped"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca))
    task = InstructionTask(data_files=str(path), split={"val": 2, "test": 2}, probe=None)
    task.setup(tokenizer, seed=0)
    assert task.split_sizes() == {"train": 6, "val": 2, "test": 2} and task.stats["malformed_dropped"] == 1
    prompt = tokenizer.decode(task._data["train"][0].prompt_ids)
    assert "<|im_start|>user\nAdd" in prompt and task.exact_types == set()
    assert task.held_out_types == []  # null holds nothing out for files (the mixture: section)

    chats = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}"},
            ],
            "kind": "echo" if i % 2 else "say",
        }
        for i in range(12)
    ]
    chat_path = tmp_path / "chat.jsonl"
    chat_path.write_text("\n".join(json.dumps(c) for c in chats))
    chat = InstructionTask(
        data_files=str(chat_path),
        type_column="kind",
        held_out_types=["echo"],
        exact_match_types=["echo", "say"],
        split={"val": 1, "test": 2},
        probe=None,
    )
    chat.setup(tokenizer, seed=0)
    assert {ex.kind for ex in chat._data["train"]} == {"say"}
    assert {ex.kind for ex in chat._data["test"]} == {"say", "echo"}
    example = chat._data["train"][0]
    text = tokenizer.decode(example.prompt_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("assistant\n")
    assert tokenizer.decode(example.target_ids) == f"{example.reference}<|im_end|>"


def test_bad_files_and_models_fail_with_one_clear_line(tmp_path: Path, tiny_model_and_tokenizer: Any) -> None:
    tokenizer = tiny_model_and_tokenizer[1]
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(
        ConfigError, match=r"neither a 'messages' column .* nor 'instruction' and 'output'"
    ) as err:
        InstructionTask(data_files=str(path), probe=None).setup(tokenizer, seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"task.output_column='answer_text' is not a column"):
        InstructionTask(
            data_files=str(path), format="alpaca", instruction_column="question", output_column="answer_text"
        ).setup(tokenizer, seed=0)
    with pytest.raises(ConfigError, match=r"held_out_types=\['nosuch'\]"):
        InstructionTask(held_out_types=["nosuch"], split=SMALL, probe=None).setup(tokenizer, seed=0)
    with pytest.raises(ConfigError, match=r"task.types="):
        InstructionTask(types=["poetry"])
    from transformers import BertConfig, BertForSequenceClassification

    encoder = BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(ConfigError, match=r"task='instruction' needs a causal language model"):
        InstructionTask(probe=None).head(encoder)


# ---- end to end through the CLI ------------------------------------------------------------------------
def test_cli_smoke(tmp_path: Path) -> None:
    record = cli_smoke(
        tmp_path,
        "instruction",
        "tiny_llama",
        [
            "task.split.val=1",
            "task.split.test=2",
            "task.split.max_train=4",
            "task.max_source_tokens=32",
            "task.max_new_tokens=4",
            "task.probe.texts=2",
            "task.probe.max_tokens=32",
        ],
    )
    assert record["primary_metric"] == "test/score" and record["data"] == {"train": 12, "val": 4, "test": 8}
    metrics = record["metrics"]
    assert_finite(metrics, (f"test/{key}" for key in (*SCORES, "loss", "loss/section", "probe_loss")))
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["val/score"])


# ---- the forgetting probe (shared by every task) ----------------------------------------------------------
def test_forgetting_probe_is_fixed_general_text_reported_once_per_pass(tiny_model_and_tokenizer: Any) -> None:
    from peftbench.tasks.probe import ForgettingProbe, probe_texts

    model, tokenizer = tiny_model_and_tokenizer
    texts = probe_texts(3)
    assert texts == probe_texts(3) and len(set(texts)) == 3
    intros = {r["introduction"][:40] for r in aclsum_records().records}
    assert all(" ( " not in t for t in texts) and len(intros) == 250
    probe = ForgettingProbe({"texts": 3, "max_tokens": 16})
    probe.setup(tokenizer)
    value = probe.loss(model)
    assert value is not None and math.isfinite(value) and value > 0
    assert probe.scores(model, {PASS_START: True}) == {"probe_loss": [pytest.approx(value)]}
    assert probe.scores(model, {PASS_START: False}) == {}
    assert ForgettingProbe(None).scores(model, {PASS_START: True}) == {}
    with pytest.raises(ConfigError, match=r"task.probe has unknown key\(s\) size"):
        ForgettingProbe({"size": 3})
