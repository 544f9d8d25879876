"""A finished run on disk, rebuilt: the base model it trained (from its own config) with its adapter loaded.

Shared by the "taking a result home" commands (`peftbench.export`, `peftbench.merge`, `peftbench.generate`).

A *run directory* is a run's output directory: ``record.json`` (its resolved config), ``.hydra/config.yaml``
and ``adapter/adapter.safetensors`` (`peftbench.methods.io`); a stage of a stages run
(``stages/<k>-<name>/``) is one too. An *adapter directory* holds ``adapter.safetensors``; its run
directory is its parent. The adapter file names the method and its hyper-parameters; the run's ``model``
config says which base to rebuild (a random test model is rebuilt from its seed). ``KEY=VALUE`` overrides
change that config, e.g. ``name_or_path=<local copy>`` for a base that has moved, or name the base outright
for an adapter directory that has no run beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftbench.errors import ConfigError
from peftbench.record import RECORD_FILE as RECORD

HYDRA_CONFIG = Path(".hydra") / "config.yaml"
ADAPTER_DIR = "adapter"
#: `model` config keys that change how a base trains, not what it is (dropped when rebuilding)
TRAINING_ONLY = ("gradient_checkpointing",)


@dataclass(frozen=True)
class SavedRun:
    """Where a run's adapter is and the `model` config its base is rebuilt from."""

    adapter: Path
    model_config: dict[str, Any]


def locate(path: str | Path, overrides: Sequence[str] = (), flag: str = "--model") -> SavedRun:
    """The adapter and model config of a run directory or an adapter directory; ConfigError if neither.
    `flag`: the command's option for `overrides` (named in errors)."""
    from peftbench.methods.io import ADAPTER_FILE

    path = Path(path).expanduser()
    accepted = (
        f"a run directory (holding {ADAPTER_DIR}/{ADAPTER_FILE}) "
        f"or an adapter directory (holding {ADAPTER_FILE})"
    )
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; accepted: {accepted}")
    if (path / ADAPTER_FILE).is_file():
        adapter, run_dir = path, path.parent
    elif (path / ADAPTER_DIR / ADAPTER_FILE).is_file():
        adapter, run_dir = path / ADAPTER_DIR, path
    else:
        raise ConfigError(f"{str(path)!r} holds no saved adapter; accepted: {accepted}")
    found = run_model_config(run_dir)
    if found is None and not any(o.partition("=")[0].strip() == "name_or_path" for o in overrides):
        raise ConfigError(
            f"no run config beside {str(adapter)!r} ({run_dir / RECORD} or {run_dir / HYDRA_CONFIG}) says "
            f"which base model it adapts; accepted: {flag} name_or_path=<the base model> (a local directory "
            "or hub id)"
        )
    return SavedRun(adapter=adapter, model_config=apply_overrides(found or {}, overrides, flag))


def run_model_config(run_dir: Path) -> dict[str, Any] | None:
    """The `model` config a run loaded its base with: from `record.json`, else `.hydra/config.yaml`."""
    from omegaconf import OmegaConf

    from peftbench.lr_search import register_resolvers

    for source in (run_dir / RECORD, run_dir / HYDRA_CONFIG):
        if not source.is_file():
            continue
        try:
            raw = json.loads(source.read_text()).get("config") if source.suffix == ".json" else None
            cfg = OmegaConf.create(raw) if raw is not None else OmegaConf.load(source)
            if cfg.get("model") is None:
                continue
            register_resolvers()  # a config written by a sweep may use peftbench's resolvers
            model = OmegaConf.to_container(cfg.model, resolve=True)
        except Exception as err:  # unreadable JSON / YAML, an interpolation that does not resolve
            raise ConfigError(f"{str(source)!r} is not a readable run config ({err})") from None
        if isinstance(model, dict):
            return {k: v for k, v in model.items() if k not in TRAINING_ONLY}
    return None


def apply_overrides(
    config: dict[str, Any], overrides: Sequence[str], flag: str = "--model"
) -> dict[str, Any]:
    """`config` with ``KEY=VALUE`` overrides applied (YAML values: ``seed=1``, ``dtype=bfloat16``)."""
    from omegaconf import OmegaConf

    bad = [o for o in overrides if "=" not in o or not o.partition("=")[0].strip()]
    if bad:
        raise ConfigError(f"{flag} {bad[0]!r} is not valid; accepted: KEY=VALUE (a key of the model config)")
    try:
        merged = OmegaConf.merge(OmegaConf.create(config), OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
    except Exception as err:
        raise ConfigError(f"{flag} overrides {list(overrides)} are not valid ({err})") from None


def load_adapted(saved: SavedRun) -> tuple[Any, Any, Any]:
    """`(model, tokenizer, method)`: the base rebuilt from the run's config, the adapter applied and loaded,
    in eval mode on CPU."""
    from peftbench.methods.io import load_adapter
    from peftbench.models import load_model

    model, tokenizer = load_model(saved.model_config)
    method = load_adapter(model, saved.adapter)
    return model.eval(), tokenizer, method


def adapter_keys(saved: SavedRun) -> list[str]:
    """The tensor names of the saved adapter file."""
    from safetensors import safe_open

    from peftbench.methods.io import ADAPTER_FILE

    with safe_open(str(saved.adapter / ADAPTER_FILE), framework="pt") as handle:
        return list(handle.keys())
