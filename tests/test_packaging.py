"""Installed as a user installs it: the wheel carries the configs, a non-editable install runs a short job
from an empty directory, and a user's own config directory joins through Hydra's search path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from peftbench.cli_checks import CONF_DIR, check_group_overrides, search_dirs
from peftbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: a seconds-long job (tiny random Llama, one step)
SHORT = [
    "experiment=smoke",
    "logger=none",
    "evaluate_before=false",
    "trainer.max_steps=1",
    "trainer.val_check_interval=1",
    "checkpoint.every_n_steps=null",
]


def _user_configs(directory: Path) -> Path:
    """A user's config directory with one method option of its own: LoRA at r=4."""
    lora = (ROOT / "conf" / "method" / "lora.yaml").read_text()
    assert "\n  r: 16\n" in lora
    (directory / "method").mkdir(parents=True)
    (directory / "method" / "my_lora.yaml").write_text(lora.replace("\n  r: 16\n", "\n  r: 4\n"))
    return directory


def test_the_package_config_directory_is_the_repositorys() -> None:
    assert CONF_DIR == ROOT / "peftbench" / "conf"
    assert CONF_DIR.resolve() == (ROOT / "conf").resolve()  # a link: conf/ stays the one copy in a clone


def test_a_users_config_directory_adds_group_options(tmp_path: Path) -> None:
    mine = _user_configs(tmp_path / "mine")
    searchpath = f"hydra.searchpath=[file://{mine}]"
    assert search_dirs([searchpath]) == [mine]
    assert search_dirs(["hydra.searchpath=[pkg://somewhere.conf]"]) is None  # Hydra checks those itself
    check_group_overrides(["method=my_lora", searchpath])
    with pytest.raises(ConfigError, match=r"method='my_lora' is not valid; accepted: .*lora"):
        check_group_overrides(["method=my_lora"])


def test_a_wheel_runs_a_short_job_from_an_empty_directory_with_a_users_configs(tmp_path: Path) -> None:
    """`pip wheel` (not editable), the wheel unpacked as site-packages would hold it, a job launched from an
    empty directory: the configs come from the wheel, a method option from the user's directory."""
    source, dist = tmp_path / "source", tmp_path / "dist"  # built from a copy: nothing written into the clone
    shutil.copytree(ROOT / "conf", source / "conf")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "peftbench", source / "peftbench", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(source),
            "-w",
            str(dist),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("peftbench-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    shipped = {n.removeprefix("peftbench/conf/") for n in names if n.startswith("peftbench/conf/")}
    assert shipped == {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}

    empty = tmp_path / "empty"
    empty.mkdir()
    mine = _user_configs(tmp_path / "mine")
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "site"),  # ahead of the editable install of this checkout
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PEFTBENCH_RESULTS": str(empty / "results"),
    }
    where = subprocess.run(
        [sys.executable, "-c", "import peftbench.run; print(peftbench.run.__file__)"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "site"), where.stdout + where.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftbench.run",
            *SHORT,
            "method=my_lora",
            f"hydra.searchpath=[file://{mine}]",
            "hydra.run.dir=run",
        ],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((empty / "run" / "record.json").read_text())
    assert record["status"] == "ok" and record["steps"] == 1
    assert record["method"] == "lora" and record["config"]["method"]["r"] == 4
