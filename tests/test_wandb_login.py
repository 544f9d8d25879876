"""W&B login detection (peftbench/loggers.py `wandb_login`, shared by the run loggers and the comparison):
WANDB_MODE, WANDB_API_KEY, a self-hosted WANDB_BASE_URL with its netrc entry; monkeypatched env, tmp HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peftbench.compare import wandb_summary
from peftbench.loggers import prepare_wandb_env, wandb_logged_in, wandb_login

WANDB_VARS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME without ~/.netrc and no W&B variables set."""
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def write_netrc(path: Path, host: str, password: str = "k" * 40) -> None:
    path.write_text(f"machine {host}\n  login user\n  password {password}\n")
    path.chmod(0o600)


def test_nothing_set_is_offline(home: Path) -> None:
    login = wandb_login()
    assert not login.online and login.mode == "offline" and login.host == "api.wandb.ai"
    assert "no netrc entry for api.wandb.ai" in login.reason


def test_api_key(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_login().online and wandb_login().reason == "WANDB_API_KEY is set"


def test_netrc_for_the_public_host(home: Path) -> None:
    write_netrc(home / ".netrc", "api.wandb.ai")
    assert wandb_login().online and wandb_logged_in()


def test_self_hosted_server_needs_its_own_netrc_entry(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org:8443")
    write_netrc(home / ".netrc", "api.wandb.ai")  # a key for another server does not log in here
    assert not wandb_login().online and wandb_login().host == "wandb.example.org"
    write_netrc(home / ".netrc", "wandb.example.org")
    assert wandb_login().online and "wandb.example.org" in wandb_login().reason


def test_netrc_env_var_and_empty_or_broken_entries(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = home / "elsewhere.netrc"
    write_netrc(other, "api.wandb.ai")
    monkeypatch.setenv("NETRC", str(other))
    assert wandb_login().online
    other.write_text("machine api.wandb.ai login user password\n")  # no password value: a parse error
    assert not wandb_login().online


@pytest.mark.parametrize(
    ("mode", "expected"), [("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled")]
)
def test_wandb_mode_wins_over_a_key(
    home: Path, monkeypatch: pytest.MonkeyPatch, mode: str, expected: str
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", mode)
    login = wandb_login()
    assert not login.online and login.mode == expected and mode in login.reason


def test_prepare_keeps_disabled_and_sets_offline(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    prepare_wandb_env()
    assert os.environ["WANDB_MODE"] == "disabled"  # was overwritten with offline before
    monkeypatch.delenv("WANDB_MODE")
    prepare_wandb_env()
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    prepare_wandb_env()
    assert "WANDB_MODE" not in os.environ  # logged in: left to W&B (online)


def test_the_comparison_uses_the_same_check() -> None:
    assert wandb_summary.prepare_wandb_env is prepare_wandb_env
