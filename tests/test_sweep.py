"""A tiny multirun (2 methods x 2 seeds) ends with a comparison report; a failing job does not stop it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from peftbench.errors import ConfigError
from peftbench.lr_search import apply_tuned, objective, register_resolvers
from peftbench.lr_search import main as tuned_main
from tests.helpers import ROOT, run_env, run_module


def peftbench_run(args: list[str], results: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return run_module("peftbench.run", args, run_env(results), timeout=timeout)


def test_multirun_with_a_failed_job_still_reports(tmp_path: Path) -> None:
    result = peftbench_run(
        [
            "-m",
            "experiment=smoke",
            "study=sweep",
            "logger=none",
            "method=lora,vera,bitfit",
            "seed=0,1",
            f"hydra.sweep.dir={tmp_path}/multirun",
            "+hydra.callbacks.report._target_=peftbench.compare.hydra_callback.ReportAfterSweep",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*.json")]
    status = sorted((r["method"], r["seed"], r["status"]) for r in records)
    assert status == [
        ("bitfit", 0, "failed"),
        ("bitfit", 1, "failed"),
        ("lora", 0, "ok"),
        ("lora", 1, "ok"),
        ("vera", 0, "ok"),
        ("vera", 1, "ok"),
    ]
    failed = [r for r in records if r["status"] == "failed"]
    assert all("no bias" in r["error"] for r in failed)
    report = (tmp_path / "sweep" / "report" / "report.md").read_text()
    assert "lora" in report and "vera" in report and "Failed runs" in report and "bitfit" in report
    assert (tmp_path / "sweep" / "report" / "report.html").stat().st_size > 10_000
    progress = [line for line in result.stderr.splitlines() if line.startswith("[peftbench] run ")]
    assert len(progress) == 6 and progress[0].startswith("[peftbench] run 1/6 (")
    assert "method=lora" in progress[0] and "5 done in" in progress[5] and "left" in progress[5]


def test_progress_counts_the_jobs_of_a_basic_sweep() -> None:
    from peftbench.sweep_progress import duration, sweep_size

    assert sweep_size(compose_sweep("experiment=compare_default")) == 7
    assert sweep_size(compose_sweep("experiment=canonical_summarization")) == 21
    cfg = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {
                    "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"method": "lora,vera", "seed": "0,1,2"},
                },
                "overrides": {"task": ["seed=range(0,5)", "optim.lr=1e-3"]},
            }
        }
    )
    assert sweep_size(cfg) == 10  # method 2 x seed 5 (the command line's sweep wins)
    assert sweep_size(compose_sweep("+sweep=lr_search", "method=lora")) is None  # Optuna: no known total
    assert (duration(42), duration(312), duration(3720)) == ("42s", "5m12s", "1h02m")


# ----- Optuna learning-rate search (conf/sweep/, peftbench/lr_search.py) ---------------------------------
def compose_sweep(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize(("method", "low", "high"), [("vera", 3e-4, 0.3), ("lora", 3e-5, 0.03)])
def test_lr_search_config(method: str, low: float, high: float, tmp_path: Path, monkeypatch: Any) -> None:
    """The sweep config composes; its lr range is log-uniform around the method's default lr, as the Optuna
    sweeper parses it; storage is SQLite under the results store; failed trials never stop the study."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution

    monkeypatch.setenv("PEFTBENCH_RESULTS", str(tmp_path))
    cfg = compose_sweep("+sweep=lr_rank_search", f"method={method}", "study=tune")
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["sampler"]["_target_"].endswith(
        "TPESampler"
    )
    assert sweeper["direction"] == "maximize" and sweeper["max_failure_rate"] == 1.0
    assert sweeper["study_name"] == method and sweeper["n_trials"] == 30
    assert sweeper["storage"] == f"sqlite:///{tmp_path}/tune/optuna.db" and (tmp_path / "tune").is_dir()
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper["params"].items()])
    assert space["optim.lr"] == LogUniformDistribution(low, high) and not fixed
    assert space["method.r"] == CategoricalDistribution([4, 8, 16, 32])
    assert cfg.resume is None and cfg.evaluate_before is False


def test_objective_is_the_validation_score() -> None:
    record = {"primary_metric": "test/rouge_l", "metrics": {"test/rouge_l": 0.3, "val/rouge_l": 0.2}}
    assert objective(record) == 0.2  # never the test score: tuning must not see the test split
    assert objective({**record, "metrics": {"test/rouge_l": 0.3}}) is None  # no validation: a failed trial
    assert objective({**record, "metrics": {"val/rouge_l": float("nan")}}) is None  # NaN would stop Optuna


def test_sqlite_study_to_tuned_yaml_to_run_config(tmp_path: Path) -> None:
    """Trials told to an Optuna SQLite storage as the sweeper tells them (one failed); the storage opens
    again (with SQLAlchemy 2 this very step fails: optuna 2.10's schema check); tuned.yaml holds each
    method's best trial and `tuned=` sets it in a run's config, choices parsed as Hydra values."""
    import optuna
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution

    register_resolvers()
    url = OmegaConf.create({"s": f"${{peftbench.sqlite:{tmp_path}/tune/optuna.db}}"}).s
    told = {"vera": [(3e-3, 0.1), (2e-2, 0.4), (5e-2, None)], "lora": [(1e-4, 0.2), (1e-3, 0.3)]}
    for method, trials in told.items():
        sampler = optuna.samplers.RandomSampler(seed=0)
        study = optuna.create_study(
            study_name=method, storage=url, sampler=sampler, direction="maximize", load_if_exists=True
        )
        for lr, value in trials:
            trial = study.ask({"method.target_modules": CategoricalDistribution(["[q_proj,v_proj]", "all"])})
            trial._suggest("optim.lr", LogUniformDistribution(lr, lr))  # a fixed value, as a one-point range
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, values=[value])
    out = tmp_path / "tune" / "tuned.yaml"
    assert tuned_main([str(tmp_path / "tune" / "optuna.db")]) == 0
    best = yaml.safe_load(out.read_text())
    assert sorted(best) == ["lora", "vera"]
    assert best["vera"]["objective"] == 0.4 and best["vera"]["trials"] == {"complete": 2, "fail": 1}
    assert best["vera"]["overrides"]["optim.lr"] == 2e-2 and best["lora"]["overrides"]["optim.lr"] == 1e-3
    cfg = compose_sweep("method=vera", f"tuned={out}")
    assert apply_tuned(cfg) == best["vera"]["overrides"] and cfg.optim.lr == 2e-2
    chosen = best["vera"]["overrides"]["method.target_modules"]
    expected = ["q_proj", "v_proj"] if chosen == "[q_proj,v_proj]" else "all"
    assert OmegaConf.to_container(cfg.method)["target_modules"] == expected
    with pytest.raises(
        ConfigError, match=r"has no entry for method='full'; accepted: a method tuned there \(lora, vera\)"
    ):
        apply_tuned(compose_sweep("method=full", f"tuned={out}"))
    with pytest.raises(ConfigError, match=r"tuned='.*missing.yaml' is not valid"):
        apply_tuned(compose_sweep("method=vera", f"tuned={tmp_path}/missing.yaml"))


@pytest.mark.slow  # about a minute on 2 CPU cores: process start-ups dominate
def test_joblib_multirun_at_equal_parameter_budget(tmp_path: Path) -> None:
    """Hydra's joblib launcher (2 worker processes) runs a budget-matched sweep; the report says so."""
    result = peftbench_run(
        [
            "-m",
            "experiment=smoke",
            "study=budget",
            "logger=none",
            "method=lora,vera,full",
            "seed=0",
            "budget.trainable_params=50000",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={tmp_path}/multirun",
            "+hydra.callbacks.report._target_=peftbench.compare.hydra_callback.ReportAfterSweep",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    records = {
        r["method"]: r for r in map(json.loads, map(Path.read_text, (tmp_path / "budget").glob("*.json")))
    }
    assert sorted(records) == ["full", "lora", "vera"] and all(r["status"] == "ok" for r in records.values())
    assert records["lora"]["method_config"]["r"] == 24 and records["lora"]["params"]["trainable"] == 49_152
    assert records["vera"]["method_config"]["r"] == (50_000 - 1024) // 14
    assert records["vera"]["params"]["trainable"] == records["vera"]["config"]["budget"]["fit"]["trainable"]
    assert records["full"]["config"]["budget"]["fit"]["matched"] is False
    report = (tmp_path / "budget" / "report" / "report.md").read_text()
    assert (
        "Trainable-parameter budget: <= 50,000 per method, size knob chosen on the model: "
        "lora r=24 (49,152), vera r=3498 (49,996); not budget-matched (no size knob): full." in report
    )
    assert (tmp_path / "budget" / "report" / "report.html").stat().st_size > 10_000


@pytest.mark.slow  # about 1.5 minutes on 2 CPU cores
def test_optuna_lr_search_then_tuned_run(tmp_path: Path) -> None:
    """The documented search: 3 TPE trials (one with an invalid rank, recorded as failed; the study goes
    on), SQLite storage in the results store, each trial's value = its record's validation score; then
    tuned.yaml and a run at the tuned values."""
    import optuna

    common = ["experiment=smoke", "logger=none", "method=vera"]
    result = peftbench_run(
        [
            "-m",
            "+sweep=lr_search",
            *common,
            "study=tune",
            "hydra.sweeper.n_trials=3",
            "method.r=choice(0,256)",  # TPE with seed 0 (optuna 2.10) draws r = 0, 256, 256
            f"hydra.sweep.dir={tmp_path}/multirun",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    db = tmp_path / "tune" / "optuna.db"
    trials = optuna.load_study(study_name="vera", storage=f"sqlite:///{db}").trials
    records = [json.loads(p.read_text()) for p in (tmp_path / "tune").glob("*.json")]
    by_lr = {float(r["config"]["optim"]["lr"]): r for r in records}
    assert len(trials) == len(records) == 3
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
    for trial in trials:
        assert 3e-4 <= trial.params["optim.lr"] <= 0.3
        record = by_lr[trial.params["optim.lr"]]
        if trial.params["method.r"] == 0:
            assert (
                trial.state.name == "FAIL"
                and record["status"] == "failed"
                and "method.r=0" in record["error"]
            )
        else:
            assert trial.state.name == "COMPLETE" and record["status"] == "ok"
            assert trial.value == record["metrics"]["val/rouge_l"]
    assert tuned_main([str(db)]) == 0
    tuned = yaml.safe_load((tmp_path / "tune" / "tuned.yaml").read_text())["vera"]["overrides"]
    assert tuned["method.r"] == 256
    final = peftbench_run(
        [*common, "study=final", f"tuned={tmp_path}/tune/tuned.yaml", f"hydra.run.dir={tmp_path}/final"],
        tmp_path,
    )
    assert final.returncode == 0, final.stderr[-3000:]
    record = json.loads((tmp_path / "final" / "record.json").read_text())
    assert record["config"]["optim"]["lr"] == tuned["optim.lr"] and record["method_config"]["r"] == 256
