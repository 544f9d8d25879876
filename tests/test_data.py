"""The data layer without a tokenizer: sources, column mapping, dedupe + deterministic splits, registry."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from peftbench.errors import ConfigError
from peftbench.tasks import TASKS, SummarizationTask, Task, build_task
from peftbench.tasks.sources import RawData, bbc_news, hub_dataset, load_source, local_file, map_columns
from peftbench.tasks.splits import content_hash, dedupe, split_records

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"


def _records(n: int) -> list[dict[str, str]]:
    return [{"source": f"Article number {i} about topic {i % 7}.", "target": f"Title {i}"} for i in range(n)]


def _source(record: dict[str, str]) -> str:
    return record["source"]


# ---- splits ----------------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_sized() -> None:
    records = _records(300)
    a = split_records(records, _source, val=20, test=30)
    b = split_records(records, _source, val=20, test=30)
    assert a.sizes() == {"train": 250, "val": 20, "test": 30}
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    ids = [{r["target"] for r in part} for part in (a.train, a.val, a.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == {r["target"] for r in records}


def test_split_ignores_input_order_and_global_rng() -> None:
    records = _records(200)
    random.seed(0)
    torch.manual_seed(0)
    first = split_records(records, _source, val=0.1, test=0.2)
    shuffled = records[:]
    random.Random(123).shuffle(shuffled)
    random.seed(99)
    torch.manual_seed(99)
    second = split_records(shuffled, _source, val=0.1, test=0.2)
    assert first.sizes() == second.sizes() == {"train": 140, "val": 20, "test": 40}
    for part in ("train", "val", "test"):
        assert sorted(map(str, getattr(first, part))) == sorted(map(str, getattr(second, part)))


def test_growing_val_never_moves_test_examples() -> None:
    records = _records(100)
    assert (
        split_records(records, _source, val=5, test=10).test == split_records(records, _source, 30, 10).test
    )


def test_duplicates_are_dropped_before_splitting_whatever_the_order() -> None:
    records = _records(50)
    dups = [
        {"source": "  ARTICLE number 3 about   topic 3. ", "target": "Another title"},
        {"source": "article number 4 about topic 4.\n", "target": "Title 4"},
    ]
    splits = split_records(records + dups, _source, val=5, test=5)
    assert splits.n_duplicates == 2
    assert sum(splits.sizes().values()) == 50
    keys = [content_hash(r["source"]) for part in (splits.train, splits.val, splits.test) for r in part]
    assert len(keys) == len(set(keys))
    forward, _ = dedupe(records + dups, _source)
    backward, _ = dedupe(list(reversed(records + dups)), _source)
    assert forward == backward


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val": 60, "test": 50}, "leaves no training data"),
        ({"val": -1, "test": 5}, "split.val=-1"),
        ({"val": 1.5, "test": 5}, "split.val=1.5"),
        ({"val": "ten", "test": 5}, "split.val='ten'"),
        ({"val": 5, "test": 5, "max_train": 0}, "max_train=0"),
    ],
)
def test_bad_split_sizes_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        split_records(_records(100), _source, **kwargs)


def test_max_train_caps_train_only() -> None:
    splits = split_records(_records(100), _source, val=10, test=10, max_train=25)
    assert splits.sizes() == {"train": 25, "val": 10, "test": 10}


# ---- the embedded BBC corpus -----------------------------------------------------------------------------
def test_bbc_news_reads_every_file_including_the_non_utf8_one() -> None:
    raw = bbc_news()
    assert len(raw.records) == raw.stats["files"] == 2225
    assert raw.stats["non_utf8"] == 1
    assert {r["category"] for r in raw.records} == {"business", "entertainment", "politics", "sports", "tech"}
    assert all(r["title"] and r["text"] and "\n" not in r["title"] for r in raw.records)
    assert len({r["id"] for r in raw.records}) == 2225
    odd = next(r for r in raw.records if r["id"] == "sports/199")
    assert "£" in odd["text"] and "\ufffd" not in odd["text"]


def test_bbc_news_default_split_sizes() -> None:
    records, dropped = map_columns(bbc_news(), {"source": "text", "target": "title"})
    assert dropped == 0
    splits = split_records(records, _source, val=64, test=128)
    assert splits.n_duplicates == 137
    assert splits.sizes() == {"train": 1896, "val": 64, "test": 128}


# ---- local files and column mapping ----------------------------------------------------------------------
ROWS = [
    {"document": "The first document text.", "summary": "First", "extra": 1},
    {"document": "The second document text.", "summary": "Second", "extra": 2},
    {"document": "", "summary": "Empty source", "extra": 3},
    {"document": "The fourth document text.", "summary": "Fourth", "extra": 4},
]


def _write(path: Path, fmt: str) -> Path:
    frame = pd.DataFrame(ROWS)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files_with_custom_columns(tmp_path: Path, fmt: str) -> None:
    raw = local_file(_write(tmp_path / f"data.{fmt}", fmt))
    assert set(raw.columns) == {"document", "summary", "extra"}
    records, dropped = map_columns(raw, {"source": "document", "target": "summary"})
    assert dropped == 1  # the empty document (CSV reads it as missing: also dropped)
    assert [r["target"] for r in records] == ["First", "Second", "Fourth"]
    assert records[0] == {"source": "The first document text.", "target": "First"}


def test_missing_column_is_named_with_the_columns_present(tmp_path: Path) -> None:
    raw = local_file(_write(tmp_path / "data.jsonl", "jsonl"))
    with pytest.raises(ConfigError, match=r"target_column='title'.*accepted: document, summary, extra"):
        map_columns(raw, {"source": "document", "target": "title"})


def test_malformed_jsonl_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"document": "ok", "summary": "ok"}\n{"document": "bad", "summary": \n')
    with pytest.raises(ConfigError, match=r"broken\.jsonl.*line 2") as info:
        local_file(path)
    assert "\n" not in str(info.value)


def test_malformed_csv_and_parquet_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text('a,b\n"unterminated,1\n')
    (tmp_path / "bad.parquet").write_text("not parquet")
    for name in ("bad.csv", "bad.parquet"):
        with pytest.raises(ConfigError, match=re.escape(name)):
            local_file(tmp_path / name)


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown suffix '\.txt'.*\.jsonl"):
        local_file(tmp_path / "data.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        local_file(tmp_path / "absent.jsonl")


def test_data_files_win_over_dataset(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.parquet", "parquet")
    raw = load_source("bbc_news", data_files=str(path))
    assert isinstance(raw, RawData) and len(raw.records) == 4


def test_hub_dataset_from_a_local_dataset_directory(tmp_path: Path) -> None:
    (tmp_path / "ds" / "data").mkdir(parents=True)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    raw = hub_dataset(str(tmp_path / "ds"), split="train")
    assert len(raw.records) == 4 and "summary" in raw.columns
    assert len(load_source(str(tmp_path / "ds")).records) == 4
    with pytest.raises(ConfigError, match="hf_split='validation'"):
        hub_dataset(str(tmp_path / "ds"), split="validation")


def test_unreachable_hub_id_is_a_config_error() -> None:
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (otherwise this would try the network)")
    with pytest.raises(ConfigError, match="no-such-user/no-such-dataset"):
        hub_dataset("no-such-user/no-such-dataset")


# ---- registry and config ---------------------------------------------------------------------------------
def test_build_task_from_the_shipped_config() -> None:
    task = build_task(OmegaConf.load(CONF / "summarization.yaml"))
    assert isinstance(task, SummarizationTask) and isinstance(task, Task) and "summarization" in TASKS
    assert task.name == "summarization" and task.primary_metric == "rouge_l"
    assert task.split == {"val": 64, "test": 128, "max_train": None}


def test_build_task_rejects_unknown_names_and_keys() -> None:
    with pytest.raises(ConfigError, match=r"task.name='translation'.*accepted: summarization"):
        build_task(OmegaConf.create({"name": "translation"}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) max_len"):
        build_task({"name": "summarization", "max_len": 3})
    with pytest.raises(ConfigError, match=r"task.split has unknown key\(s\) train"):
        build_task({"name": "summarization", "split": {"train": 10}})
    with pytest.raises(ConfigError, match=r"task.prompt="):
        build_task({"name": "summarization", "prompt": "no placeholder"})
    with pytest.raises(ConfigError, match=r"task.max_new_tokens=0"):
        build_task({"name": "summarization", "max_new_tokens": 0})
