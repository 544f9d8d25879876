"""Learning-rate search with Optuna, then the comparison at each method's tuned values.

1. One Optuna study per method (`conf/sweep/lr_search.yaml`: log-uniform lr around the method's own default,
   TPE, SQLite storage `<results_dir>/<study>/optuna.db`, study name = the method), maximising the
   validation score that `objective` returns from each trial's record:

       python -m peftbench.run -m +sweep=lr_search method=vera study=tune_bbc

2. The best trial of every study in the storage -> `tuned.yaml` (one entry per method):

       python -m peftbench.lr_search results/tune_bbc/optuna.db        # writes results/tune_bbc/tuned.yaml

3. The comparison, each method at its tuned values (`apply_tuned`, before the method is built):

       python -m peftbench.run -m method=lora,vera seed=0,1,2 study=bbc tuned=results/tune_bbc/tuned.yaml

Tuning selects on the validation split; the test split stays untouched until the comparison.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftbench.errors import ConfigError, bad_value
from peftbench.record import Record

log = logging.getLogger(__name__)
TUNED_FILE = "tuned.yaml"


# ----- what a trial returns to the sweeper ---------------------------------------------------------------
def objective(record: Record | dict[str, Any]) -> float | None:
    """The value a sweeper optimises: the run's last validation score on the task's primary metric
    (`val/<metric>`, higher is better for every task). None when there is none or it is not finite: the
    Optuna sweeper then records the trial as failed and the study goes on (a NaN would stop it)."""
    if isinstance(record, Record):
        primary, metrics = record.primary_metric, record.metrics
    else:  # the fields a trial's result holds, as plain JSON
        primary, metrics = record.get("primary_metric"), record.get("metrics")
    key = str(primary or "").replace("test/", "val/", 1)
    value = (metrics or {}).get(key)
    if not isinstance(value, int | float) or not math.isfinite(value):
        log.warning(
            "no finite %s in the record (validation ran? trainer.val_check_interval): no objective", key
        )
        return None
    return float(value)


# ----- resolvers used by conf/sweep/*.yaml ---------------------------------------------------------------
def _scale(value: Any, factor: Any) -> float:
    """`${peftbench.scale:${optim.lr},30}`: value x factor, 3 significant digits (a search-range bound)."""
    return float(f"{float(value) * float(factor):.3g}")


def _sqlite(path: Any) -> str:
    """`${peftbench.sqlite:<path>}`: an Optuna SQLite storage URL for `path` (its directory is created)."""
    file = Path(str(path)).expanduser().absolute()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def register_resolvers() -> None:
    """Make `peftbench.scale` and `peftbench.sqlite` available to config interpolations (idempotent)."""
    for name, fn in (("peftbench.scale", _scale), ("peftbench.sqlite", _sqlite)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# ----- best trials -> tuned.yaml -------------------------------------------------------------------------
def storage_url(storage: str | Path) -> str:
    """A storage URL as given, or `sqlite:///<abs path>` for an existing .db file."""
    text = str(storage)
    if "://" in text:
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise bad_value("storage", text, "an Optuna SQLite file (e.g. results/<study>/optuna.db) or a URL")
    return f"sqlite:///{path.absolute()}"


def best_per_method(storage: str | Path) -> dict[str, dict[str, Any]]:
    """For every study in `storage` (one per method, named after it): the best complete trial's parameters
    (`overrides`, e.g. {'optim.lr': 0.0012}), its value and the trial counts. Studies without a complete
    trial are left out (with a warning)."""
    import optuna

    url = storage_url(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    found: dict[str, dict[str, Any]] = {}
    for summary in optuna.study.get_all_study_summaries(url):
        study = optuna.load_study(study_name=summary.study_name, storage=url)
        states = [t.state.name.lower() for t in study.trials]
        counts = {s: states.count(s) for s in sorted(set(states))}
        try:
            best = study.best_trial
        except ValueError:
            log.warning("study %r has no complete trial (%s): left out", summary.study_name, counts)
            continue
        found[summary.study_name] = {
            "overrides": dict(best.params),
            "objective": float(best.value),
            "direction": study.direction.name.lower(),
            "trial": best.number,
            "trials": counts,
        }
    if not found:
        raise bad_value("storage", str(storage), "a storage holding at least one study with a complete trial")
    return found


def write_tuned(storage: str | Path, out: Path) -> dict[str, dict[str, Any]]:
    """Write `best_per_method(storage)` to `out` (YAML, one entry per method)."""
    import yaml

    best = best_per_method(storage)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Best Optuna trial per method (by validation score) from {storage}.\n"
        f"# Use: python -m peftbench.run -m method={','.join(best)} seed=0,1,2 tuned={out}\n"
    )
    out.write_text(header + yaml.safe_dump(best, sort_keys=True))
    return best


# ----- the run-time hook ---------------------------------------------------------------------------------
def apply_tuned(cfg: DictConfig) -> dict[str, Any] | None:
    """With `tuned=<tuned.yaml>`, set this method's tuned values (e.g. optim.lr) in `cfg`, before the method
    is built. ConfigError when the file has no entry for the method or names a key the config lacks."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    source = cfg.get("tuned")
    if source is None:
        return None
    path = Path(_absolute(str(source)))
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        data = None
    if not isinstance(data, dict):
        raise bad_value("tuned", source, "a tuned.yaml written by `python -m peftbench.lr_search <storage>`")
    name = cfg.method.get("name")
    if name not in data:
        raise ConfigError(
            f"tuned={str(source)!r} has no entry for method={name!r}; accepted: a method tuned there "
            f"({', '.join(sorted(map(str, data)))}), or tuned=null"
        )
    entry = data[name] if isinstance(data[name], dict) else {}
    overrides = dict(entry.get("overrides") or {})
    parser = OverridesParser.create()
    for key, value in overrides.items():
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            raise bad_value(f"tuned key in {source}", key, "a key of this config (see --cfg job)")
        if isinstance(value, str):  # a categorical choice as the sweeper wrote it, e.g. "[q_proj,v_proj]"
            value = parser.parse_override(f"{key}={value}").value()
        OmegaConf.update(cfg, key, value, merge=False)
    log.info("tuned: %s at %s (from %s)", name, overrides, source)
    return overrides


def _absolute(path: str) -> str:
    try:
        from hydra.utils import to_absolute_path

        return to_absolute_path(path)
    except Exception:  # outside a Hydra job
        return str(Path(path).absolute())


# ----- CLI -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python -m peftbench.lr_search STORAGE [--out FILE]`: print and write each method's best trial."""
    parser = argparse.ArgumentParser(prog="python -m peftbench.lr_search", description=main.__doc__)
    parser.add_argument("storage", help="the Optuna storage: results/<study>/optuna.db or a URL")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {TUNED_FILE} beside the .db file")
    args = parser.parse_args(argv)
    out = args.out or (
        Path(args.storage).parent / TUNED_FILE if "://" not in args.storage else Path(TUNED_FILE)
    )
    try:
        best = write_tuned(args.storage, out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for method, entry in best.items():
        values = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["overrides"].items()
        )
        print(f"{method}: {values} (validation {entry['objective']:.4g}, trials {entry['trials']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
