"""The method registry: `conf/method/<name>.yaml` names a class registered here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peftbench.errors import ConfigError, bad_value

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a method available under its `name`."""
    if cls.name in METHODS:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def build_method(cfg: Mapping[str, Any]) -> Any:
    """Instantiate the method named by ``cfg["name"]`` with the remaining keys as hyper-parameters."""
    import dataclasses

    import peftbench.methods  # noqa: F401  (imports every method module so each registers itself)

    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in METHODS:
        raise bad_value("method", name, sorted(METHODS))
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ConfigError(f"method.{unknown[0]} is not a {name} hyper-parameter; accepted: {sorted(fields)}")
    if "target_modules" in cfg and not isinstance(cfg["target_modules"], str):
        cfg["target_modules"] = list(cfg["target_modules"])
    method = cls(**cfg)
    method.validate()
    return method


def method_config_file(path: Any) -> dict[str, Any]:
    """The `method` section of a `conf/method/<name>.yaml` file, as build_method takes it."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return dict(cfg["method"]) if "method" in cfg else dict(cfg)
