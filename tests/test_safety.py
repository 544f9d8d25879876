"""Safe loading and secrets: an audit of the package source, and secrets kept out of records, configs, logs.

- every `torch.load` in the package passes `weights_only=True`, and nothing unpickles (`pickle.load(s)`);
- `trust_remote_code` comes only from the model config, and every shipped model config says false;
- the values of WANDB_API_KEY, HF_TOKEN and any environment variable whose name contains KEY, TOKEN,
  SECRET or PASSWORD never appear in a record, the run's `.hydra/*.yaml`, its log or its error output.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from peftbench.record import write_record
from peftbench.redaction import RedactSecrets, redact, secret_values
from tests.helpers import run_env, run_module

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peftbench"


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_every_torch_load_is_weights_only_and_nothing_unpickles() -> None:
    loads, unsafe = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _calls(ast.parse(path.read_text(), filename=str(path))):
            name = _dotted(call.func)
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if name in ("torch.load", "torch.serialization.load"):
                loads.append(where)
                flag = {k.arg: k.value for k in call.keywords}.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                unsafe.append(f"{where}: {name}")
    assert loads, "the audit found no torch.load at all: is it looking at the package?"
    assert not unsafe, unsafe


def test_trust_remote_code_only_from_the_model_config_and_off_by_default() -> None:
    from peftbench.models.spec import ModelSpec

    assert ModelSpec(name_or_path="x").trust_remote_code is False
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _calls(ast.parse(path.read_text())):
            for keyword in call.keywords:
                if keyword.arg == "trust_remote_code":
                    # passed through from the spec, never a literal True
                    assert not (isinstance(keyword.value, ast.Constant) and keyword.value.value is True), (
                        f"{path}:{call.lineno}"
                    )
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        assert OmegaConf.load(path).get("trust_remote_code", False) is False, path


SECRETS = {
    "WANDB_API_KEY": "wandb-0123456789abcdef0123456789abcdef",
    "HF_TOKEN": "hf_SeCrEtToKeNvAlUe123456",
    "MY_DB_PASSWORD": "correct-horse-battery",
}


def test_redact_replaces_secret_values_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a name with TOKEN, not a secret
    monkeypatch.setenv("SOME_KEY_DIR", str(ROOT))  # an existing path: not a secret
    found = secret_values()
    assert set(found.values()) >= set(SECRETS) and "false" not in found and str(ROOT) not in found
    payload = {
        "config": {"logger": {"api_key": SECRETS["WANDB_API_KEY"]}, "dir": str(ROOT), "flag": "false"},
        "error": f"401 for token {SECRETS['HF_TOKEN']} at https://hub",
        "list": [SECRETS["MY_DB_PASSWORD"], 3, None],
        SECRETS["HF_TOKEN"]: 1,
    }
    cleaned = json.dumps(redact(payload))
    assert not any(value in cleaned for value in SECRETS.values())
    assert "<redacted:HF_TOKEN>" in cleaned and str(ROOT) in cleaned and '"false"' in cleaned


def test_write_record_and_logs_are_redacted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    paths = write_record({"run_id": "r1", "config": {"token": SECRETS["HF_TOKEN"]}}, tmp_path, tmp_path / "s")
    assert all(SECRETS["HF_TOKEN"] not in p.read_text() for p in paths) and len(paths) == 2
    logger = logging.getLogger("peftbench.test_secret")
    handler = logging.FileHandler(tmp_path / "run.log")
    handler.addFilter(RedactSecrets())
    logger.addHandler(handler)
    try:
        logger.warning("loading with token %s", SECRETS["HF_TOKEN"])
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = (tmp_path / "run.log").read_text()
    assert SECRETS["HF_TOKEN"] not in text and "<redacted:HF_TOKEN>" in text


def test_a_run_writes_no_secret_into_records_configs_or_logs(tmp_path: Path) -> None:
    """A secret passed on the command line (and set in the environment) ends up nowhere on disk."""
    env = {**run_env(tmp_path / "results"), **SECRETS}  # SECRETS share no name with run_env's own
    secret = SECRETS["WANDB_API_KEY"]
    result = run_module(
        "peftbench.run",
        [
            "experiment=smoke",
            "logger=none",
            f"+note={secret}",
            f"task.source_column={SECRETS['HF_TOKEN']}",  # an error message that quotes a secret
            f"hydra.run.dir={tmp_path}/run",
        ],
        env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "<redacted:HF_TOKEN>" in result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "record.json" for p in written) and any(p.suffix == ".yaml" for p in written)
    for text in [result.stdout, result.stderr, *(p.read_text(errors="replace") for p in written)]:
        assert not any(value in text for value in SECRETS.values())
