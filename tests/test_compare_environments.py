"""Time and memory never share a column across environments (peftbench/compare/environments.py): the
report splits them per environment (CPU model, native bf16, threads, GPU) and flags runs started under
load. Hand-made records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftbench.compare import load_study, summarize, write_report
from peftbench.compare.environments import EnvKey, env_key, loaded
from peftbench.compare.report import main_table
from peftbench.record import load_record
from tests.test_compare import make_record

EPYC = {"cpu_model": "AMD EPYC", "cpu_flags": {"avx2": True, "avx512_bf16": False}, "cpu_threads": 2}
XEON = {"cpu_model": "Intel Xeon", "cpu_flags": {"avx2": True, "avx512_bf16": True}, "cpu_threads": 2}


def run(
    method: str, seed: int, step_s: float, env: dict[str, Any], peak: int = 900 * 2**20
) -> dict[str, Any]:
    rec = make_record(method, seed, 0.2 + 0.01 * seed, 32_768 if method != "vera" else 2_048, peak, step_s)
    rec["record_version"] = 2
    rec["env"] = {**rec["env"], "load_avg_1m": 0.5, **env}
    return rec


def columns(records: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """method -> header -> cell of the headline table."""
    head, rows = main_table(summarize(records))
    return {r[0]: dict(zip(head, r, strict=True)) for r in rows}


def test_env_key_parts() -> None:
    assert env_key(load_record(run("lora", 0, 1.0, EPYC))) == EnvKey("AMD EPYC", False, 2, None)
    assert env_key(load_record(run("lora", 0, 1.0, XEON))).native_bf16 is True
    gpu = load_record(run("lora", 0, 1.0, {**EPYC, "gpu": "NVIDIA H200"}))
    assert env_key(gpu).gpu == "NVIDIA H200" and "GPU NVIDIA H200" in env_key(gpu).describe()
    old = make_record("lora", 0, 0.2, 1, 1, 1.0)  # a version 1 record: no CPU model, flags or load
    key = env_key(load_record(old))
    assert key == EnvKey(None, None, None, None) and "not recorded" in key.describe()
    assert loaded(load_record(old)) is None


def test_one_environment_keeps_plain_columns() -> None:
    cols = columns([run(m, s, 1.0 + s, EPYC) for m in ("lora", "vera") for s in range(2)])
    assert "time/step" in cols["lora"] and not any("[E" in h for h in cols["lora"])
    assert cols["lora"]["time/step"] == "1.50 s"


@pytest.mark.parametrize(
    "other",
    [XEON, {**EPYC, "cpu_threads": 1}, {**EPYC, "gpu": "NVIDIA H200"}, {"cpu_model": None, "cpu_flags": {}}],
    ids=["cpu-and-bf16", "threads", "gpu", "not-recorded"],
)
def test_mixed_environments_split_time_and_memory(other: dict[str, Any]) -> None:
    # lora: 2 seeds on EPYC (E1, the most runs) and 1 elsewhere; vera only elsewhere
    records = [run("lora", 0, 1.0, EPYC), run("lora", 1, 2.0, EPYC), run("full", 0, 3.0, EPYC)]
    records += [run("lora", 2, 10.0, other, peak=2000 * 2**20), run("vera", 0, 20.0, other)]
    summary = summarize(records)
    assert [e["runs"] for e in summary.environments] == [3, 2] and summary.mixed_environments
    cols = columns(records)
    assert "time/step" not in cols["lora"]  # never one column over machines
    assert cols["lora"]["time/step [E1]"] == "1.50 s" and cols["lora"]["time/step [E2]"] == "10.00 s"
    assert cols["lora"]["peak memory [E2]"] == "2.0 GiB"
    assert cols["vera"]["time/step [E1]"] == "-" and cols["vera"]["time/step [E2]"] == "20.00 s"
    rows = {r.method: r for r in summary.rows}
    assert rows["lora"].step_s == pytest.approx(1.5)  # E1's figure, not the mean over machines (4.33)
    assert rows["vera"].step_s is None and not rows["vera"].on_front["step_s"]
    assert rows["vera"].on_front["trainable"]  # the parameter axis is not environment-bound


def test_runs_started_under_load_are_flagged(tmp_path: Path) -> None:
    busy = {**EPYC, "load_avg_1m": 3.7}  # 2 cores (threads), load 3.7
    records = [run("lora", 0, 1.0, EPYC), run("lora", 1, 1.2, busy), run("vera", 0, 1.0, EPYC)]
    assert loaded(load_record(records[1])) and not loaded(load_record(records[0]))
    cols = columns(records)
    assert cols["lora"]["time/step"].endswith("†") and not cols["vera"]["time/step"].endswith("†")
    study = tmp_path / "t"
    study.mkdir()
    for rec in records:
        (study / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    recs, summary = load_study(study)
    md = write_report(recs, summary, tmp_path / "out")["markdown"].read_text()
    assert "E1: AMD EPYC, bf16 emulated, 2 threads, no GPU; 3 ok run(s), 1 started under load (†)" in md
    # the cpu_count a record carries wins over its threads
    assert not loaded(load_record({**records[1], "env": {**records[1]["env"], "cpu_count": 8}}))


def test_report_states_the_split(tmp_path: Path) -> None:
    records = [run("lora", 0, 1.0, EPYC), run("lora", 1, 2.0, XEON)]
    study = tmp_path / "t"
    study.mkdir()
    for rec in records:
        (study / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    recs, summary = load_study(study)
    paths = write_report(recs, summary, tmp_path / "out")
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "| time/step [E1] | time/step [E2] |" in md and "split per environment" in md
    assert "<th>time/step [E2]</th>" in page
    saved = json.loads(paths["summary"].read_text())
    assert [e["cpu_model"] for e in saved["environments"]] == ["AMD EPYC", "Intel Xeon"]  # tie: by name
    assert saved["rows"][0]["costs_by_env"]["E2"]["step_s"] == 2.0


def test_wandb_table_names_the_cost_environment() -> None:
    from peftbench.compare.wandb_summary import table_data

    records = [run("lora", 0, 1.0, EPYC), run("lora", 1, 2.0, EPYC), run("vera", 0, 9.0, XEON)]
    columns, data = table_data(summarize(records))
    rows = {row[0]: dict(zip(columns, row, strict=True)) for row in data}
    assert rows["lora"]["cost_environment"] == "E1: AMD EPYC, bf16 emulated, 2 threads, no GPU"
    assert rows["lora"]["step_s"] == pytest.approx(1.5) and rows["vera"]["step_s"] is None
