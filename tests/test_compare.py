"""The comparison report on synthetic records (no training): statistics, table, plots, HTML, CLI, W&B."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peftbench.compare import load_study, mean_ci, paired_test, pareto_front, write_report
from peftbench.compare.__main__ import main
from peftbench.compare.stats import t_ppf, t_sf2

T_975_2 = 4.302652729749464  # scipy.stats.t.ppf(0.975, 2); closed form 0.95 / sqrt(2 * 0.975 * 0.025)

# method -> (scores by seed, trainable params, peak bytes, seconds per step)
SPEC: dict[str, tuple[list[float], int, int, float]] = {
    "lora": ([0.20, 0.22, 0.21], 32_768, 900 * 2**20, 0.50),
    "vera": ([0.18, 0.19, 0.20], 2_048, 880 * 2**20, 0.55),
    "full": ([0.25, 0.27, 0.26], 3_252_544, 1500 * 2**20, 0.40),
}


def make_record(
    method: str, seed: int, score: float, trainable: int, peak: int, step_s: float
) -> dict[str, Any]:
    """A record shaped like `peftbench.train.train`'s (the fields the report reads)."""
    steps = 10
    losses = [[s, 3.0 - 0.1 * s * (1 + score) + 0.02 * seed] for s in range(1, steps + 1)]
    return {
        "record_version": 1,
        "run_id": f"t-{method}-summarization-seed{seed}-abcd{seed}",
        "status": "ok",
        "study": "t",
        "method": method,
        "model": "tiny-llama",
        "task": "summarization",
        "seed": seed,
        "primary_metric": "test/rouge_l",
        "metrics": {
            "test/rouge_l": score,
            "test/rouge1": score + 0.05,
            "test/loss": 3.0 - score,
            "test_before/rouge_l": 0.05,
            "val/loss": 3.1 - score,
        },
        "params": {
            "total": 3_252_544 + (0 if method == "full" else trainable),
            "trainable": trainable,
            "trainable_percent": 100.0 * trainable / 3_252_544,
            "weight_bytes": 13_010_240,
            "base_modified": method == "full",
            "adapter_bytes": None if method == "full" else 4 * trainable + 1024,
        },
        "memory": {"peak_train_bytes": peak, "device": "cpu"},
        "time": {"fit_s": 5.0, "test_s": 1.0, "eval_before_s": 1.0, "train_step_s": step_s, "total_s": 9.0},
        "tokens_per_s": 1000.0 / step_s,
        "steps": steps,
        "train_tokens": 9000 + seed,
        "history": {"train_loss": losses, "val": [{"step": steps, "val/loss": 3.1 - score}]},
        "method_config": {"name": method},
        "config": {
            "method": {"name": method},
            "logger": {"project": "peftbench-t", "group": method},
            "batch_size": 4,
            "optim": {"lr": 1e-3},
            "trainer": {
                "max_steps": steps,
                "max_epochs": -1,
                "accumulate_grad_batches": 1,
                "precision": "32",
            },
            "task": {"split": {"max_train": 24}},
        },
        "data": {"train": 24, "val": 8, "test": 8},
        "env": {
            "host": "vm",
            "device": "cpu",
            "git_commit": "0123456789abcdef",
            "versions": {"python": "3.11.7", "torch": "2.13.0+cpu"},
        },
        "run_dir": f"/tmp/outputs/t/{method}/seed{seed}",
    }


def write_study(directory: Path, with_failure: bool = True) -> Path:
    """Write SPEC's records (3 seeds per method) and, optionally, one failed run; returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for method, (scores, trainable, peak, step_s) in SPEC.items():
        for seed, score in enumerate(scores):
            record = make_record(method, seed, score, trainable, peak, step_s)
            (directory / f"{record['run_id']}.json").write_text(json.dumps(record))
    if with_failure:
        failed = {
            "record_version": 1,
            "run_id": "t-qlora-summarization-seed0-dead",
            "status": "failed",
            "error": "RuntimeError: bitsandbytes needs a GPU | no CUDA",
            "study": "t",
            "method": "qlora",
            "model": "tiny-llama",
            "task": "summarization",
            "seed": 0,
            "config": {},
        }
        (directory / f"{failed['run_id']}.json").write_text(json.dumps(failed))
    return directory


# ---- statistics -------------------------------------------------------------------------------------------


def test_mean_ci_matches_hand_computed_values() -> None:
    est = mean_ci([1.0, 2.0, 3.0])
    assert est is not None and est.mean == 2.0 and est.std == 1.0 and est.n == 3
    assert est.half_width == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-9)
    assert mean_ci([5.0]).half_width is None and mean_ci([]) is None


def test_t_distribution_against_closed_forms() -> None:
    assert t_ppf(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)
    assert t_ppf(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # Cauchy
    assert t_sf2(1.5, 1) == pytest.approx(1 - 2 / math.pi * math.atan(1.5), rel=1e-9)
    assert t_ppf(0.975, 10_000) == pytest.approx(1.960201, abs=1e-5)


def test_paired_test_matches_hand_value() -> None:
    # differences 1, 2, 3: t = 2 / (1 / sqrt 3); df 2: p = 1 - t / sqrt(2 + t^2) (closed form for df = 2)
    result = paired_test({0: 2.0, 1: 3.0, 2: 5.0, 7: 9.0}, {0: 1.0, 1: 1.0, 2: 2.0})
    t = 2 * math.sqrt(3)
    assert result is not None and result.seeds == (0, 1, 2)
    assert result.t == pytest.approx(t) and result.delta.mean == pytest.approx(2.0)
    assert result.p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)


def test_paired_test_matches_scipy_when_installed() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [0.31, 0.29, 0.35, 0.30], [0.28, 0.30, 0.31, 0.27]
    result = paired_test(dict(enumerate(a)), dict(enumerate(b)))
    assert result.p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-9)


def test_pareto_front_membership() -> None:
    costs = [1.0, 2.0, 3.0, 2.0, 4.0, float("nan")]
    scores = [0.1, 0.5, 0.4, 0.3, 0.9, 1.0]
    # 0: cheapest; 1: beats 2 and 3; 4: best score; 5: missing cost
    assert pareto_front(costs, scores) == [True, True, False, False, True, False]
    assert pareto_front([1.0, 2.0], [1.0, 0.5], higher_is_better=False) == [True, True]
    assert pareto_front([1.0, 1.0], [0.5, 0.5]) == [True, True]  # ties dominate neither


# ---- table and report -------------------------------------------------------------------------------------


def test_summary_rows_numbers(tmp_path: Path) -> None:
    _, summary = load_study(write_study(tmp_path / "t"), baseline="lora")
    rows = {r.method: r for r in summary.rows}
    assert [r.method for r in summary.rows] == ["full", "lora", "vera", "qlora"]  # best first, failed last
    assert rows["lora"].score.mean == pytest.approx(0.21)
    assert rows["lora"].score.half_width == pytest.approx(T_975_2 * 0.01 / math.sqrt(3))
    assert rows["full"].delta.delta.mean == pytest.approx(0.05) and rows["lora"].delta is None
    assert rows["qlora"].seeds_failed == [0] and rows["qlora"].score is None
    assert rows["vera"].on_front == {"trainable": True, "peak_memory_bytes": True, "step_s": False}
    assert rows["lora"].on_front["trainable"] and not rows["lora"].on_front["step_s"]
    assert summary.budget["max_steps"] == 10 and summary.budget["equal"]


def test_report_renders_with_a_failed_run(tmp_path: Path) -> None:
    records, summary = load_study(write_study(tmp_path / "t"))
    paths = write_report(records, summary, tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "## Failed runs" in md and "qlora" in md and "bitsandbytes needs a GPU" in md
    assert "| Δ vs lora |" in md and "max_steps=10" in md and "training examples: 24" in md
    assert json.loads(paths["summary"].read_text())["failed"][0]["method"] == "qlora"
    for name in ("learning_curves", "pareto_trainable", "pareto_peak_memory_bytes", "pareto_step_s"):
        png = tmp_path / "out" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert (tmp_path / "out" / "plots" / f"{name}.svg").stat().st_size > 0
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_html_is_self_contained(tmp_path: Path) -> None:
    records, summary = load_study(write_study(tmp_path / "t"))
    page = write_report(records, summary, tmp_path / "out")["html"].read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page)
    assert refs and all(ref.startswith("data:") for ref in refs)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    for method in ("lora", "vera", "full", "qlora"):
        assert f"<td>{method}</td>" in page


def test_loss_metric_prefers_lower(tmp_path: Path) -> None:
    _, summary = load_study(write_study(tmp_path / "t", with_failure=False), metric="test/loss")
    assert not summary.higher_is_better and summary.rows[0].method == "full"


# ---- CLI --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["{missing}"], "missing"),
        (["{study}", "--baseline", "dora"], "dora"),
        (["{study}", "--metric", "test/bleu"], "test/bleu"),
        (["{empty}"], "empty"),
        (["{study}", "--nope"], "--nope"),
    ],
)
def test_cli_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], named: str
) -> None:
    study = write_study(tmp_path / "study")
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "study": study, "empty": tmp_path / "empty"}
    with pytest.raises(SystemExit) as exc:
        sys.exit(main([a.format(**paths) for a in args]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and named in err
    if "--baseline" in args:
        assert "full, lora, vera" in err  # the accepted values


def test_cli_writes_report(tmp_path: Path) -> None:
    study = write_study(tmp_path / "study")
    done = subprocess.run(
        [sys.executable, "-m", "peftbench.compare", str(study), "--baseline", "vera"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "lora" in done.stdout and "1 failed run" in done.stdout
    for name in ("report.md", "report.html", "summary.json", "plots/learning_curves.png"):
        assert (study / "report" / name).is_file()
    assert json.loads((study / "report" / "summary.json").read_text())["baseline"] == "vera"


def test_wandb_summary_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc -> offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    from peftbench.compare.wandb_summary import log_summary

    records, summary = load_study(write_study(tmp_path / "t"))
    paths = write_report(records, summary, tmp_path / "out")
    plots = {k.split(":", 1)[1]: v for k, v in paths.items() if k.startswith("plot:")}
    run_dir = log_summary(summary, plots, tmp_path / "out")
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-")
    assert run_dir.is_relative_to(tmp_path / "wb") and list(run_dir.glob("*.wandb"))


def test_duplicates_counted_once_and_no_default_baseline(tmp_path: Path) -> None:
    study = write_study(tmp_path / "t", with_failure=False)
    for path in study.glob("t-lora-*.json"):
        path.unlink()  # no lora -> no default baseline
    copy = study / "outputs" / "record.json"  # a run dir's copy of a stored record: same run_id
    copy.parent.mkdir()
    copy.write_text(next(study.glob("t-vera-*seed0*.json")).read_text())
    records, summary = load_study(study)
    assert len(records) == 6 and summary.baseline is None
    assert [len(r.seeds_ok) for r in summary.rows] == [3, 3]
    assert all(r.delta is None for r in summary.rows)
