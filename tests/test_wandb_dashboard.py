"""W&B dashboards as code (peftbench/compare/dashboard.py), offline: the spec's panels, that every panel
names a metric the runs log (checked against compare/wandb_metrics.py, and in a slow test against the
transaction log of a real offline run), the wandb-workspaces build, and `--wandb` with and without login."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from peftbench.compare import dashboard as dash
from peftbench.compare import load_study, summarize, write_report
from peftbench.compare.__main__ import main, save_workspace
from peftbench.compare.wandb_metrics import RUN_SUMMARY, TRAIN_HISTORY, logged_metrics
from peftbench.errors import ConfigError
from peftbench.record import load_record
from tests.test_compare import write_study


@pytest.fixture
def study(tmp_path: Path) -> tuple[list[Any], Any]:
    return load_study(write_study(tmp_path / "t"))


def panels(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["title"]: p for s in spec["sections"] for p in s["panels"]}


def test_spec_panels(study: tuple[list[Any], Any]) -> None:
    records, summary = study
    spec = dash.dashboard_spec(records, summary)
    assert spec["project"] == "peftbench-t" and spec["group_by"] == {"source": "config", "key": "method.name"}
    assert [s["name"] for s in spec["sections"]] == [
        "Score vs cost",
        "Learning curves",
        "Memory and time",
        "Sweeps",
    ]
    by_title = panels(spec)
    scatter = by_title["test/rouge_l vs trainable parameters"]
    assert scatter["x"]["key"] == "params/trainable" and scatter["log_x"]
    curve = by_title["train/loss"]
    assert curve["type"] == "line" and curve["band"] == "minmax" and curve["groupby"]["key"] == "method.name"
    assert "val/loss" in by_title and "val/rouge_l" not in by_title  # the hand-made runs validate loss only
    split = next(p for t, p in by_title.items() if t.startswith("Memory split"))
    assert [m["key"] for m in split["metrics"]] == list(dash.SPLIT_KEYS)
    parallel = by_title["Hyperparameters -> scores"]
    assert [c["key"] for c in parallel["columns"]] == ["method.name", "optim.lr", "test/rouge_l"]


def test_every_panel_names_a_logged_metric(study: tuple[list[Any], Any]) -> None:
    records, summary = study
    spec = dash.dashboard_spec(records, summary)
    assert dash.unknown_metrics(spec, logged_metrics(records)) == []
    dash.check_spec(spec, records)


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("summary", "test/bleu"),
        ("history", "train/grad_norm"),
        ("config", "method.rank"),
        ("history", "params/trainable"),
    ],
)
def test_a_panel_naming_an_unknown_metric_fails(study: tuple[list[Any], Any], source: str, key: str) -> None:
    records, summary = study
    spec = copy.deepcopy(dash.dashboard_spec(records, summary))
    spec["sections"][0]["panels"].append(
        {"type": "bar", "title": "x", "metrics": [{"source": source, "key": key}]}
    )
    with pytest.raises(ConfigError, match=f"{source}:{key}"):
        dash.check_spec(spec, records)


def test_sweep_columns_follow_what_varies(tmp_path: Path) -> None:
    records, _ = load_study(write_study(tmp_path / "t"))
    plain = [r.to_dict() for r in records]
    for i, r in enumerate(plain):
        if r["status"] == "ok":
            r["config"]["optim"]["lr"] = [1e-4, 3e-4, 1e-3][i % 3]
            r["config"]["method"]["r"] = [4, 8][i % 2]
    recs = [load_record({**r, "record_version": 2}) for r in plain]
    spec = dash.dashboard_spec(recs, summarize(recs))
    columns = [c["key"] for c in panels(spec)["Hyperparameters -> scores"]["columns"]]
    assert columns == ["method.name", "optim.lr", "method.r", "test/rouge_l"]


def test_report_writes_the_spec(study: tuple[list[Any], Any], tmp_path: Path) -> None:
    records, summary = study
    path = write_report(records, summary, tmp_path / "out")["dashboard"]
    assert path == tmp_path / "out" / "dashboard.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(dash.dashboard_spec(records, summary)))


def test_workspace_builds_offline(study: tuple[list[Any], Any]) -> None:
    pytest.importorskip("wandb_workspaces")
    records, summary = study
    spec = dash.dashboard_spec(records, summary)
    workspace = dash.build_workspace(spec, entity="someone")
    assert workspace.project == "peftbench-t" and workspace.sections[0].name == "Score vs cost"
    kinds = [type(p).__name__ for s in workspace.sections for p in s.panels]
    assert kinds == [
        "ScatterPlot",
        "BarPlot",
        "LinePlot",
        "LinePlot",
        "BarPlot",
        "BarPlot",
        "ParallelCoordinatesPlot",
    ]
    line = workspace.sections[1].panels[0]
    assert line.groupby_rangefunc == "minmax" and line.y == ["train/loss"]
    view = workspace._to_model()  # the object `save()` sends: built without the network
    wire = json.dumps(view.model_dump(by_alias=True, mode="json"))
    assert "config:method.value.name" in wire and "summary_metrics.memory/weights_bytes" in wire


def _logged_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))


def test_cli_wandb_offline_writes_spec_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("wandb")
    _logged_out(monkeypatch, tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    study_dir = write_study(tmp_path / "t")
    assert main([str(study_dir), "--wandb"]) == 0
    out = capsys.readouterr().out
    assert "W&B workspace not saved (no WANDB_API_KEY and no netrc entry for api.wandb.ai)" in out
    assert (study_dir / "report" / "dashboard.json").is_file()


def test_saves_when_logged_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _logged_out(monkeypatch, tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    saved: list[dict[str, Any]] = []
    monkeypatch.setattr(dash, "save_dashboard", lambda spec: saved.append(spec) or "https://w/ws")
    spec_path = tmp_path / "dashboard.json"
    spec_path.write_text(json.dumps({"project": "p"}))
    assert save_workspace(spec_path) == 0 and saved == [{"project": "p"}]
    assert "W&B workspace: https://w/ws" in capsys.readouterr().out
    monkeypatch.setattr(
        dash, "save_dashboard", lambda spec: (_ for _ in ()).throw(RuntimeError("403 forbidden"))
    )
    assert save_workspace(spec_path) == 1
    assert "RuntimeError: 403 forbidden" in capsys.readouterr().err


@pytest.mark.slow
def test_panels_name_what_a_real_offline_run_logs(tmp_path: Path) -> None:
    """A 2-step tiny run with logger=wandb (offline): every key the dashboard of its record names is in its
    W&B transaction log, and so is every key compare/wandb_metrics.py promises."""
    from tests.test_run import run_cli
    from tests.wandb_offline import logged_keys

    done = run_cli(
        [
            "task=summarization",
            "model=tiny_llama",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1",
            "batch_size=2",
            "logger=wandb",
            "save_adapter=false",
            "study=dash",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = load_record(json.loads((tmp_path / "run" / "record.json").read_text()))
    (run_file,) = (tmp_path / "run").rglob("run-*.wandb")
    logged = logged_keys(run_file)
    spec = dash.dashboard_spec([record], summarize([record]))
    missing = [
        f"{r['source']}:{r['key']}" for r in dash.metric_refs(spec) if r["key"] not in logged[r["source"]]
    ]
    assert missing == []
    assert set(TRAIN_HISTORY) <= logged["history"] and set(RUN_SUMMARY) <= logged["summary"]


def test_cli_refuses_a_dashboard_naming_an_unknown_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    study_dir = write_study(tmp_path / "t")
    real = dash.dashboard_spec

    def with_unknown(records: list[Any], summary: Any) -> dict[str, Any]:
        spec = real(records, summary)
        spec["sections"][0]["panels"][0]["y"] = {"source": "summary", "key": "test/bleu"}
        return spec

    monkeypatch.setattr(dash, "dashboard_spec", with_unknown)
    assert main([str(study_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summary:test/bleu" in err
