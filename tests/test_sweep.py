"""A tiny multirun (2 methods x 2 seeds) ends with a comparison report; a failing job does not stop it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_multirun_with_a_failed_job_still_reports(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PEFTBENCH_RESULTS": str(tmp_path)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftbench.run",
            "-m",
            "experiment=smoke",
            "study=sweep",
            "logger=none",
            "method=lora,vera,bitfit",
            "seed=0,1",
            f"hydra.sweep.dir={tmp_path}/multirun",
            "+hydra.callbacks.report._target_=peftbench.compare.hydra_callback.ReportAfterSweep",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
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
