"""Classification: data, splits, the encoder's classifier head, the causal LM's verbaliser, errors, CLI."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from peftbench.errors import ConfigError
from peftbench.methods import build_method
from peftbench.tasks import ClassificationTask, build_task
from peftbench.tasks.classification import LabelledText
from peftbench.tasks.collate import IGNORE_INDEX
from peftbench.tasks.labels import answer_matches, confusion_matrix, macro_f1
from peftbench.tasks.loaders import PASS_START
from peftbench.tasks.objectives import target_token_loss
from peftbench.tasks.sources import rotten_tomatoes
from tests.helpers import assert_finite, cli_smoke

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = {"val": 8, "test": 8, "max_train": 16}


def _task(**kwargs: Any) -> ClassificationTask:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "task" / "classification.yaml"))
    cfg.update({"split": SMALL, "probe": None, **kwargs})
    return build_task(cfg)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def encoder() -> tuple[Any, Any]:
    """The embedded MiniLM encoder with a 2-label head (read-only: deep-copy before changing it)."""
    from peftbench.models import load_model

    cfg = OmegaConf.load(CONF / "model" / "minilm_l6.yaml")
    cfg.num_labels = 2
    return load_model(cfg)


# ---- data -----------------------------------------------------------------------------------------------
def test_rotten_tomatoes_loader_keeps_reviews_only() -> None:
    raw = rotten_tomatoes()
    assert len(raw.records) == 12808 and raw.stats["plot_dropped"] == 1097
    assert {r["category"] for r in raw.records} == {"fresh", "rotten"}


def test_splits_are_deterministic_disjoint_and_seed_free(tiny_model_and_tokenizer: Any) -> None:
    tokenizer = tiny_model_and_tokenizer[1]
    a, b = _task(), _task()
    a.setup(tokenizer, seed=0)
    b.setup(tokenizer, seed=7)
    assert a._records == b._records
    texts = {part: {r["text"] for r in rows} for part, rows in a._records.items()}
    assert a.split_sizes() == {"train": 16, "val": 8, "test": 8}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"])
    assert not (texts["val"] & texts["test"])
    assert a.labels == ["rotten", "fresh"] and a.num_labels == 2


def test_topic_config_covers_every_bbc_section(tiny_model_and_tokenizer: Any) -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "task" / "topic_classification.yaml"))
    cfg.update({"split": SMALL, "probe": None})
    task = build_task(cfg)
    task.setup(tiny_model_and_tokenizer[1], seed=0)
    assert (
        task.num_labels == 5 and task.stats["other_label_dropped"] == 0 and task.stats["records_read"] == 2225
    )


def test_local_file_with_label_discovery_and_clear_column_errors(
    tmp_path: Path, tiny_model_and_tokenizer: Any
):
    tokenizer = tiny_model_and_tokenizer[1]
    path = tmp_path / "reviews.csv"
    rows = [f"review {i},{['bad', 'good', 'meh'][i % 3]}" for i in range(30)]
    path.write_text("body,stars\n" + "\n".join(rows) + "\n")
    task = ClassificationTask(
        data_files=str(path),
        text_column="body",
        label_column="stars",
        split={"val": 3, "test": 3},
        probe=None,
    )
    task.setup(tokenizer, seed=0)
    assert (
        task.labels == ["bad", "good", "meh"] and task.num_labels == 3 and task.split_sizes()["train"] == 24
    )
    with pytest.raises(ConfigError, match=r"task.text_column='text' is not a column.*accepted: body, stars"):
        ClassificationTask(data_files=str(path), probe=None).setup(tokenizer, seed=0)
    with pytest.raises(ConfigError, match=r"task.num_labels=2 but .* has 3 labels"):
        ClassificationTask(
            data_files=str(path), text_column="body", label_column="stars", num_labels=2, probe=None
        ).setup(tokenizer, seed=0)
    with pytest.raises(ConfigError, match=r"task.labels \['great'\] never occur in column 'stars'"):
        ClassificationTask(
            data_files=str(path),
            text_column="body",
            label_column="stars",
            labels=["bad", "great"],
            probe=None,
        ).setup(tokenizer, seed=0)
    with pytest.raises(ConfigError, match=r"task\.formulation='guess'"):
        ClassificationTask(formulation="guess")


# ---- the classifier formulation (encoder) -------------------------------------------------------------
def test_encoder_head_trains_beside_the_method_and_is_separate(encoder: Any) -> None:
    model, tokenizer = copy.deepcopy(encoder[0]), encoder[1]
    task = _task()
    task.setup(tokenizer, seed=0)
    head = task.head(model)
    assert head is model.classifier and task.formulation == "classifier"
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    method.apply(model, head=head)
    head_ids = {id(p) for p in head.parameters()}
    method_ids = {id(p) for _, p in method.trainable_parameters(model)}
    assert head_ids and method_ids and not (head_ids & method_ids)  # counted separately
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head_ids | method_ids
    batch = next(iter(task.train_dataloader(4)))
    assert set(batch) >= {"input_ids", "attention_mask", "class_labels"} and "labels" not in batch
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    before = model.classifier.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss, n = task.loss(model, batch)
    assert n == 4 and math.isfinite(float(loss))
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.classifier.weight, before)
    model.eval()
    scores = task.evaluate(model, next(iter(task.test_dataloader(4))))
    assert len(scores["accuracy"]) == 8 and set(scores["accuracy"]) <= {0.0, 100.0}
    assert "probe_loss" not in scores  # an encoder has no LM head to probe


def test_sequence_classification_llama_head_is_score() -> None:
    from peftbench.models import load_model
    from tests.conftest import tiny_model_cfg

    model, tokenizer = load_model(tiny_model_cfg(architecture="sequence_classification", num_labels=2))
    task = _task()
    task.setup(tokenizer, seed=0)
    assert task.head(model) is model.score and task.formulation == "classifier"
    with pytest.raises(ConfigError, match=r"model.num_labels=2 but task 'topic_classification' has 5 labels"):
        t = _task(
            name="topic_classification", dataset="bbc_news", labels=None, label_words=None, num_labels=5
        )
        t.setup(tokenizer, seed=0)
        t.head(model)


# ---- the verbaliser formulation (causal LM) -----------------------------------------------------------
def test_verbaliser_labels_mask_everything_but_the_label_word(tiny_model_and_tokenizer: Any) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    task = _task()
    task.setup(tokenizer, seed=0)
    assert task.head(model) is None and task.formulation == "verbaliser"
    batch = next(iter(task.test_dataloader(4)))
    assert batch[PASS_START] is True
    words = ["negative", "positive"]
    for i in range(batch["input_ids"].shape[0]):
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == words[int(batch["class_labels"][i])]
        start = int(batch["prompt_lengths"][i])
        assert (batch["labels"][i, :start] == IGNORE_INDEX).all()
        assert torch.equal(batch["labels"][i, start : start + len(labelled)], labelled)
        prompt = tokenizer.decode(batch["input_ids"][i, :start])
        assert "positive or negative" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_verbaliser_prediction_is_argmax_over_label_first_tokens(tiny_model_and_tokenizer: Any) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    task = _task()
    task.setup(tokenizer, seed=0)
    task.head(model)
    batch = next(iter(task.test_dataloader(4)))
    first = [tokenizer("negative", add_special_tokens=False)["input_ids"][0]]
    first.append(tokenizer("positive", add_special_tokens=False)["input_ids"][0])
    predicted = task.predict(model, batch)
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            logits = model(input_ids=batch["input_ids"][i : i + 1, :n]).logits[0]  # unpadded, full logits
            position = int(batch["prompt_lengths"][i]) - 1
            assert int(predicted[i]) == int(logits[position, first].argmax())
    scores = task.evaluate(model, batch)
    truth = batch["class_labels"].tolist()
    assert scores["accuracy"] == [100.0 * (p == t) for p, t in zip(predicted.tolist(), truth, strict=True)]
    loss, n_tokens = task.loss(model, batch)
    assert n_tokens == len(truth)  # one token per label word here
    reference, _ = target_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert float(loss) == pytest.approx(float(reference), abs=1e-5)


def test_incompatible_model_and_formulation_fail_with_one_clear_line(
    encoder: Any, tiny_model_and_tokenizer: Any
) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    task = _task(formulation="classifier")
    task.setup(tokenizer, seed=0)
    with pytest.raises(ConfigError, match=r"needs a sequence-classification model") as err:
        task.head(model)
    assert "\n" not in str(err.value)
    enc_task = _task(formulation="verbaliser")
    enc_task.setup(encoder[1], seed=0)
    with pytest.raises(ConfigError, match=r"needs a causal language model.*BertForSequenceClassification"):
        enc_task.head(encoder[0])
    clash = _task(label_words=["goodness", "good"])
    clash.setup(tokenizer, seed=0)
    with pytest.raises(ConfigError, match="start with the same token"):
        clash.head(model)


# ---- metrics ---------------------------------------------------------------------------------------------
# a known confusion over 3 classes (rows: truth, columns: prediction), 10 examples:
#   truth 0: predicted 0, 0, 1      -> class 0: tp 2, fp 1 (a 2 predicted as 0), fn 1
#   truth 1: predicted 1, 1         -> class 1: tp 2, fp 1 (a 0 predicted as 1), fn 0
#   truth 2: predicted 2, 0, 2, 2, 2 -> class 2: tp 4, fp 0, fn 1
# F1 = 2tp / (2tp + fp + fn): 4/6, 4/5, 8/9; macro = their mean
TRUTH = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
PREDICTED = [0, 0, 1, 1, 1, 2, 0, 2, 2, 2]
MACRO_F1 = 100 * (4 / 6 + 4 / 5 + 8 / 9) / 3


def test_macro_f1_of_a_known_confusion_matrix() -> None:
    confusion = confusion_matrix(TRUTH, PREDICTED, 3)
    assert confusion.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 4]]
    assert macro_f1(confusion) == pytest.approx(MACRO_F1)
    # a label that never occurs and is never predicted is left out; one predicted but absent counts as 0
    assert macro_f1(confusion_matrix([0, 1], [0, 1], 3)) == pytest.approx(100.0)
    assert macro_f1(confusion_matrix([0, 0], [0, 2], 3)) == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert answer_matches("Positive.", "positive") and not answer_matches("negative", "positive")


def test_macro_f1_through_the_module_is_the_whole_pass_not_a_batch_mean(
    tmp_path: Path, tiny_model_and_tokenizer: Any
) -> None:
    """The module gathers `evaluate`'s per-example labels over the pass; the task's `aggregate` computes
    macro-F1 from the pass's confusion matrix (batches of 4 split the 10 examples 4 + 4 + 2)."""
    import lightning as L

    from peftbench.module import PeftModule

    model, tokenizer = tiny_model_and_tokenizer
    path = tmp_path / "three.csv"
    path.write_text("text,category\n" + "".join(f"text {i},{'abc'[i % 3]}\n" for i in range(30)))
    task = ClassificationTask(
        data_files=str(path), label_words=["red", "green", "blue"], split={"val": 3, "test": 3}, probe=None
    )
    task.setup(tokenizer, seed=0)
    task.head(model)
    word = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("red", "green", "blue")]
    task._data["test"] = [LabelledText([5, 6, 7, *word[t]], t, 3, word[t]) for t in TRUTH]
    scripted = iter(PREDICTED)  # the "model's" predictions, in loader order
    task.predict = lambda model, batch: torch.tensor(
        [next(scripted) for _ in range(len(batch["class_labels"]))]
    )
    task.eval_batch_size = 4
    module = PeftModule(model, build_method({"name": "lora", "r": 2}), task, OmegaConf.create({"lr": 1e-3}))
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.test(module, dataloaders=task.test_dataloader(4), verbose=False)[0]
    assert metrics["test/macro_f1"] == pytest.approx(MACRO_F1, abs=1e-4)
    assert metrics["test/accuracy"] == pytest.approx(80.0)  # 8 of 10 on the diagonal
    assert "test/label" not in metrics and "test/predicted" not in metrics
    per_batch = [
        macro_f1(confusion_matrix(TRUTH[i : i + 4], PREDICTED[i : i + 4], 3)) for i in range(0, 10, 4)
    ]
    # averaging per-batch F1s (per batch, or per example as the module averages scores) would be wrong
    assert abs(sum(per_batch) / 3 - MACRO_F1) > 0.5
    assert abs((4 * per_batch[0] + 4 * per_batch[1] + 2 * per_batch[2]) / 10 - MACRO_F1) > 0.5


# ---- end to end through the CLI ------------------------------------------------------------------------
def test_cli_smoke_encoder(tmp_path: Path) -> None:
    splits = ["task.split.val=4", "task.split.test=6", "task.split.max_train=8"]
    record = cli_smoke(tmp_path, "classification", "minilm_l6", splits)
    assert record["primary_metric"] == "test/accuracy" and record["data"]["test"] == 6
    metrics = record["metrics"]
    assert_finite(metrics, ("test/accuracy", "test/macro_f1", "val/accuracy", "val/macro_f1", "test/loss"))
    assert 0.0 <= metrics["test/accuracy"] <= 100.0 and 0.0 <= metrics["test/macro_f1"] <= 100.0
    assert record["config"]["model"]["num_labels"] == 2
