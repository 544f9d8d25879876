"""task=dialogue (multilingual dialogue SFT on chatterbot-corpus): the corpus reader, language selection,
deterministic disjoint per-language splits, per-language losses checked by hand, the refusals, and a tiny
two-phase run (headlines -> dialogue) recording forgetting and per-language losses before/after phase 2."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from peftbench.errors import ConfigError
from peftbench.tasks import DialogueTask, build_task
from peftbench.tasks.chatterbot import available_languages, read_corpus
from peftbench.tasks.objectives import target_token_loss
from peftbench.tasks.splits import split_records

# the languages besides English with >= 100 dialogues in chatterbot-corpus 1.3.3 (docs and configs say so)
DEFAULT_LANGUAGES = [
    "bengali",
    "chinese",
    "dutch",
    "german",
    "indonesian",
    "italian",
    "japanese",
    "korean",
    "persian",
    "portuguese",
    "spanish",
    "traditionalchinese",
    "ukrainian",
]
NO_PROBE: dict[str, Any] = {"probe": None}


def _write(root: Path, language: str, name: str, text: str) -> None:
    (root / language).mkdir(parents=True, exist_ok=True)
    (root / language / name).write_text(text, encoding="utf-8")


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A small corpus laid out like the package's: two languages, one with faulty entries."""
    root = tmp_path / "data"
    dialogues = "\n".join(f"- - hallo {i}\n  - hi {i}\n  - wie geht's {i}?" for i in range(12))
    _write(root, "german", "conversations.yml", f"categories:\n- c\nconversations:\n{dialogues}\n")
    _write(
        root,
        "german",
        "trivia.yml",
        "conversations:\n- - Wie viel ist zwei mal elf?\n  - 22\n- eine Zeile - ein Dialog\n- - allein\n",
    )
    more = "\n".join(f"- - ciao {i}\n  - salve {i}" for i in range(10))
    _write(root, "italian", "greetings.yml", f"conversations:\n{more}\n- - ciao 0\n  - salve 0\n")
    (root / "empty").mkdir()
    return root


# ---- the corpus -----------------------------------------------------------------------------------------
def test_reader_keeps_lists_of_turns_and_counts_the_rest(corpus_dir: Path) -> None:
    corpus = read_corpus(corpus_dir)
    assert available_languages(corpus_dir) == ["german", "italian"]  # `empty` holds no .yml
    german = corpus.dialogues["german"]
    assert german[0] == ["hallo 0", "hi 0", "wie geht's 0?"] and len(german) == 13
    assert german[-1] == ["Wie viel ist zwei mal elf?", "22"]  # YAML's integer 22 is a turn, as text
    assert corpus.stats == {"files": 3, "malformed": 1, "single_turn": 1}
    assert corpus.counts() == {"german": 13, "italian": 11}
    assert corpus.default_languages(minimum=12) == ["german"]


def test_bad_yaml_is_one_line_naming_the_file(corpus_dir: Path) -> None:
    _write(corpus_dir, "german", "broken.yml", "conversations:\n- - a\n  - [b\n")
    with pytest.raises(ConfigError, match=r"broken\.yml' is not valid YAML") as err:
        read_corpus(corpus_dir)
    assert "\n" not in str(err.value)


def test_the_shipped_corpus_has_the_documented_default_languages() -> None:
    corpus = read_corpus()
    assert len(corpus.counts()) == 28 and "english" in corpus.counts()
    assert corpus.default_languages() == DEFAULT_LANGUAGES
    assert all(corpus.counts()[lang] >= 100 for lang in DEFAULT_LANGUAGES)
    task = build_task(OmegaConf.load(Path(__file__).parents[1] / "conf" / "task" / "dialogue.yaml"))
    assert isinstance(task, DialogueTask) and task.resolve_languages() == DEFAULT_LANGUAGES


# ---- selection and splits -------------------------------------------------------------------------------
def _pairs(task: DialogueTask, part: str) -> list[tuple[str, str, str]]:
    decode = task._tokenizer.decode
    return [(ex.language, decode(ex.prompt_ids), ex.reference) for ex in task.examples(part)]


def test_languages_are_selectable_and_splits_deterministic_and_disjoint(
    tiny_model_and_tokenizer: Any,
) -> None:
    tokenizer = tiny_model_and_tokenizer[1]
    split = {"val": 3, "test": 5}
    task = DialogueTask(languages=["german", "italian"], split=split, **NO_PROBE)
    task.setup(tokenizer, seed=0)
    again = DialogueTask(languages=["italian", "german"], split=split, **NO_PROBE)
    again.setup(tokenizer, seed=7)
    for part in ("train", "val", "test"):
        ours, theirs = _pairs(task, part), _pairs(again, part)
        assert {p[0] for p in ours} == {"german", "italian"}
        assert sorted(ours) == sorted(theirs)  # the seed and the order of `languages` change nothing
    for language in ("german", "italian"):
        pairs = task.language_pairs(language)
        corpus = task.corpus().dialogues[language]
        sets = {part: set(rows) for part, rows in pairs.items()}
        assert all(len(set(rows)) == len(rows) for rows in pairs.values())  # no pair twice in a split
        assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
        # split by dialogue: a dialogue's pairs are in its own split, or taken before (test, val, train)
        order = ["test", "val", "train"]
        own_split = split_records(
            [{"turns": d} for d in corpus], key=lambda d: "\n".join(d["turns"]), **split
        ).parts()
        for home, dialogues in own_split.items():
            for dialogue in dialogues:
                for pair in pairwise(dialogue["turns"]):
                    where = [part for part in order if pair in sets[part]]
                    assert len(where) == 1 and order.index(where[0]) <= order.index(home)
        sizes = task.stats
        assert sizes[f"test_{language}"] == len(pairs["test"]) > 0
        assert sizes[f"dialogues_{language}"] == len(corpus)
    assert task.split_sizes()["test"] == sum(task.stats[f"test_{lang}"] for lang in ("german", "italian"))


def test_default_selection_and_repeated_pairs_on_a_small_corpus(
    corpus_dir: Path, tiny_model_and_tokenizer: Any
) -> None:
    task = DialogueTask(corpus_dir=str(corpus_dir), min_dialogues=12, split={"val": 1, "test": 2}, **NO_PROBE)
    task.setup(tiny_model_and_tokenizer[1], seed=0)
    assert task.languages_used == ["german"]
    italian = DialogueTask(
        corpus_dir=str(corpus_dir), languages=["italian"], split={"val": 1, "test": 1}, **NO_PROBE
    )
    italian.setup(tiny_model_and_tokenizer[1], seed=0)
    # the duplicated dialogue is dropped before the split: 10 unique, 8 left to train on
    assert italian.stats["duplicate_dialogues_italian"] == 1 and italian.split_sizes()["train"] == 8


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (
            {"languages": ["german", "klingon"]},
            r"task\.languages=\['german', 'klingon'\] is not valid \(unknown: klingon\); "
            r"accepted: .*bengali.*",
        ),
        ({"languages": []}, r"task\.languages=\[\] is not valid \(empty or repeated\)"),
        ({"languages": ["dutch", "dutch"]}, r"is not valid \(empty or repeated\)"),
        ({"dataset": "bbc_news"}, r"task\.dataset='bbc_news' is not valid for task 'dialogue'"),
        ({"data_files": "chat.jsonl"}, r"task\.data_files='chat\.jsonl' is not valid"),
        ({"min_dialogues": 0}, r"task\.min_dialogues=0 is not valid"),
        ({"prompt": "no field"}, r"task\.prompt='no field' is not valid"),
        ({"split": {"val": 1, "tests": 2}}, r"task\.split has unknown key\(s\) tests"),
    ],
)
def test_bad_config_is_one_line_at_construction(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        build_task({"name": "dialogue", **kwargs})
    assert "\n" not in str(err.value)


def test_setup_refusals_name_the_language(corpus_dir: Path, tiny_model_and_tokenizer: Any) -> None:
    tokenizer = tiny_model_and_tokenizer[1]
    small = DialogueTask(corpus_dir=str(corpus_dir), languages=["italian"], split={"val": 4, "test": 6})
    with pytest.raises(ConfigError, match=r"'italian' has 11 dialogues, too few for this split") as err:
        small.setup(tokenizer, seed=0)
    assert "\n" not in str(err.value)
    none = DialogueTask(corpus_dir=str(corpus_dir), min_dialogues=500, **NO_PROBE)
    with pytest.raises(ConfigError, match=r"task\.min_dialogues=500 selects no language .*german 13"):
        none.setup(tokenizer, seed=0)


# ---- metrics --------------------------------------------------------------------------------------------
def test_per_language_losses_match_a_computation_by_hand(tiny_model_and_tokenizer: Any) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    task = DialogueTask(
        languages=["german", "dutch"], split={"val": 2, "test": 3}, eval_batch_size=4, probe={"texts": 2}
    )
    task.setup(tokenizer, seed=0)
    outputs: dict[str, list[Any]] = {}
    weighted = tokens = 0.0
    with torch.no_grad():
        for batch in task.test_dataloader(4):
            loss, n = task.loss(model, batch)
            weighted, tokens = weighted + float(loss) * n, tokens + n
            for key, values in task.evaluate(model, batch).items():
                outputs.setdefault(key, []).extend(values)
    metrics = task.aggregate(outputs)
    assert set(metrics) == {
        "loss_german",
        "loss_dutch",
        "token_accuracy_german",
        "token_accuracy_dutch",
        "token_accuracy",
        "loss_mean",
        "probe_loss",
    }
    collate = task.collator(train=False)
    for language in ("german", "dutch"):
        own = [ex for ex in task.examples("test") if ex.language == language]
        batch = collate(own)
        expected, _ = target_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert metrics[f"loss_{language}"] == pytest.approx(float(expected), rel=1e-5)
        assert 0.0 <= metrics[f"token_accuracy_{language}"] <= 100.0
    assert metrics["loss_mean"] == pytest.approx((metrics["loss_german"] + metrics["loss_dutch"]) / 2)
    assert weighted / tokens == pytest.approx(  # the module's overall loss: token-weighted over languages
        sum(outputs["_nll"]) / sum(outputs["_tokens"]), rel=1e-5
    )
    assert math.isfinite(metrics["probe_loss"])


# ---- the two-phase run ----------------------------------------------------------------------------------
LANGUAGES = ["german", "italian"]


@pytest.fixture(scope="module")
def two_phase(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny `experiment=multilingual_two_phase` run: 2 headline steps, then 3 dialogue steps."""
    from peftbench.stages import run_stages
    from peftbench.validation import load_config

    tmp_path = tmp_path_factory.mktemp("multilingual")
    cfg = load_config(
        [
            "experiment=multilingual_two_phase",
            "model=tiny_llama",
            "logger=none",
            "batch_size=2",
            f"results_dir={tmp_path / 'results'}",
            "checkpoint.every_n_steps=null",
            "stages.0.max_steps=2",
            "stages.0.task_overrides.split.val=2",
            "stages.0.task_overrides.split.test=2",
            "stages.0.task_overrides.split.max_train=8",
            "stages.0.task_overrides.max_source_tokens=24",
            "stages.1.max_steps=3",
            "+stages.1.lr=0.01",
            f"stages.1.task_overrides.languages=[{','.join(LANGUAGES)}]",
            "stages.1.task_overrides.split.val=1",
            "stages.1.task_overrides.split.test=2",
            "stages.1.task_overrides.split.max_train=6",
        ]
    )
    OmegaConf.set_struct(cfg, False)
    for stage in cfg.stages:
        stage.task_overrides.probe = None
        stage.task_overrides.eval_batch_size = 4
    cfg.stages[0].task_overrides.max_new_tokens = 2
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.chdir(tmp_path)
        return run_stages(cfg, "test-multilingual")[0]
    finally:
        monkeypatch.undo()


def test_two_phase_headlines_then_dialogue_records_forgetting_and_language_losses(two_phase: Any) -> None:
    record = two_phase.to_dict()
    assert record["status"] == "ok" and record["task"] == "summarization->dialogue"
    first, second = record["stages"]
    gone = record["forgetting"]["headlines"]
    assert gone["after_own_stage"] == first["metrics"]["test/rouge_l"]
    assert gone["after_last_stage"] == first["metrics_after_last"]["test/rouge_l"]
    assert first["metrics_after_last"]["test/loss"] != pytest.approx(first["metrics"]["test/loss"], abs=1e-6)
    metrics = second["metrics"]
    assert second["primary_metric"] == "test/token_accuracy"
    for language in LANGUAGES:
        before, after = metrics[f"test_before/loss_{language}"], metrics[f"test/loss_{language}"]
        assert math.isfinite(before) and math.isfinite(after) and after < before  # phase 2 trained on it
        assert f"val/loss_{language}" in metrics
    assert not any(key.startswith(("test/_", "test_before/_")) for key in metrics)  # raw keys consumed


def test_stages_report_tables_hold_the_recorded_numbers(two_phase: Any) -> None:
    from peftbench.stages_report import last_stage_rows, report

    text = report([two_phase])
    gone = two_phase.forgetting["headlines"]
    row = (
        f"| lora | headlines | test/rouge_l | 1 | {gone.after_own_stage:.3f} | {gone.after_last_stage:.3f} |"
    )
    assert row in text
    rows = last_stage_rows([two_phase], "loss_")
    assert [r["metric"] for r in rows] == [f"loss_{lang}" for lang in LANGUAGES] + ["loss_mean"]
    metrics = two_phase.stages[-1].metrics
    for r in rows:
        assert (
            r["before"] == metrics[f"test_before/{r['metric']}"]
            and r["after"] == metrics[f"test/{r['metric']}"]
        )
        assert f"| lora | dialogue | {r['metric']} | 1 | {r['before']:.3f} | {r['after']:.3f} |" in text
    with pytest.raises(ConfigError, match="holds no stages run"):
        report([])


def test_stages_report_cli_writes_the_tables_and_refuses_a_study_without_stages(
    two_phase: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from peftbench.record import write_record
    from peftbench.stages_report import main, report

    study = tmp_path / "study"
    study.mkdir()
    write_record(two_phase, study, None)
    out = tmp_path / "stages.md"
    assert main([str(study), "--out", str(out)]) == 0
    assert out.read_text() == report([two_phase]) and "loss_german" in out.read_text()
    plain = tmp_path / "plain"
    plain.mkdir()
    write_record(replace(two_phase, stages=None, forgetting=None), plain, None)
    assert main([str(plain)]) == 2
    assert "error: the directory holds no stages run" in capsys.readouterr().err
