"""The merging study (conf/experiment/merging.yaml, docs/merging.md): which PEFT methods survive merging three
single-task adapters into one model.

Pieces, each skipped when its result is already on disk (so the same command continues an interrupted or
extended study; adding methods or seeds later reuses everything done):

1. training (subprocesses of ``python -m peftbench.run experiment=merging ...``): one adapter per (method,
   task, seed), and one per (method, seed) on ``task=mixture`` (the union of the tasks' training sets) at
   `mixture_steps` times the steps. A run directory with a finished record is reused; an interrupted one
   resumes from its checkpoints (``resume=auto``).
2. selection, on seed 0: for every (method, combination) each (density, scale) of the grid merges the three
   task vectors (task arithmetic, arXiv 2212.04089; TIES, arXiv 2306.01708; DARE, arXiv 2311.03099) and
   scores the merged model on `select_val` validation examples per task; each task's score is divided by its
   single-task adapter's score on the same examples, and the setting with the best mean is kept.
3. test: the kept setting of every (method, combination) merged for every seed and scored on the test splits,
   each task normalised by its own single-task run of that seed (its recorded test metric); the base model
   (the runs' untuned ``test_before`` score) below, the mixture adapter above, both normalised alike.
4. diagnostics per (method, seed): the sign-conflict rate of the three task vectors (all entries, and after
   TIES' trim at the smallest density of the grid) and their pairwise cosine similarities.

Rows go to JSON-lines files under `out` (``selection.jsonl``, ``test.jsonl``, ``diagnostics.jsonl``), the
runs' records are copied to ``out/records/``; `peftbench.merging.study_report` writes the report.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftbench.errors import ConfigError, bad_value
from peftbench.merging.study_rows import append_row, find_row, read_rows

STATE = "study.json"
#: the study's own keys (under ``merging:``); every other override goes to each peftbench.run
SPEC_KEYS = (
    "out",
    "work",
    "methods",
    "seeds",
    "tasks",
    "mixture_steps",
    "combinations",
    "weights",
    "scales",
    "densities",
    "select_val",
    "dare_seed",
)


@dataclass
class Study:
    spec: dict[str, Any]
    run_overrides: list[str]
    root: Path = field(default_factory=Path.cwd)

    @property
    def out(self) -> Path:
        return self.root / self.spec["out"]

    @property
    def work(self) -> Path:
        return self.root / self.spec["work"]

    @property
    def tasks(self) -> list[str]:
        return list(self.spec["tasks"])


# ----- the study's config -------------------------------------------------------------------------------
def flow(value: Any) -> str:
    """`value` as a Hydra override value (YAML flow style)."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "\\'") + "'"


def load_study(argv: Sequence[str], root: Path | None = None) -> Study:
    """The spec of conf/experiment/merging.yaml with the ``merging.*`` overrides of `argv`; the rest of
    `argv` are run overrides. One-line ConfigError for a bad spec, or for an `out` that holds a study run
    with other run overrides or tasks (adding methods or seeds is fine)."""
    from omegaconf import OmegaConf

    from peftbench.cli_checks import CONF_DIR
    from peftbench.merging.combine import COMBINATIONS, check_density

    mine = [a.removeprefix("merging.") for a in argv if a.startswith("merging.")]
    unknown = [a for a in mine if a.partition("=")[0].split(".")[0] not in SPEC_KEYS]
    if unknown:
        raise bad_value("override", f"merging.{unknown[0]}", ", ".join(f"merging.{k}" for k in SPEC_KEYS))
    base = OmegaConf.load(CONF_DIR / "experiment" / "merging.yaml").merging
    spec = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(mine)), resolve=True)
    assert isinstance(spec, dict)
    if len(spec["tasks"]) < 2:
        raise bad_value("merging.tasks", spec["tasks"], "two or more tasks of conf/task")
    bad = [c for c in spec["combinations"] if c not in COMBINATIONS]
    if bad:
        raise bad_value("merging.combinations", bad, COMBINATIONS)
    for density in spec["densities"]:
        check_density(density)
    if spec["weights"] is not None and len(spec["weights"]) != len(spec["tasks"]):
        raise bad_value("merging.weights", spec["weights"], f"null or {len(spec['tasks'])} numbers")
    study = Study(spec, [a for a in argv if not a.startswith("merging.")], root or Path.cwd())
    state = study.out / STATE
    fixed = {
        "run_overrides": study.run_overrides,
        "tasks": spec["tasks"],
        "mixture_steps": spec["mixture_steps"],
    }
    if state.is_file():
        old = json.loads(state.read_text())
        if {k: old.get(k) for k in fixed} != fixed:
            raise ConfigError(
                f"{state} holds a study with run overrides {old.get('run_overrides')} and tasks "
                f"{list(old.get('tasks') or [])}; accepted: the same ones (add methods or seeds freely), or "
                "another merging.out and merging.work"
            )
    return study


def save_state(study: Study, argv: Sequence[str]) -> None:
    from peftbench.files import atomic_write_json

    atomic_write_json(
        study.out / STATE,
        {
            "command": "python scripts/merging_study.py " + " ".join(_quoted(a) for a in argv),
            "run_overrides": study.run_overrides,
            "tasks": study.spec["tasks"],
            "mixture_steps": study.spec["mixture_steps"],
            "spec": study.spec,
        },
    )


def _quoted(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " {}[],") else arg


# ----- 1. training --------------------------------------------------------------------------------------
def run_dir(study: Study, method: str, task: str, seed: int) -> Path:
    return study.work / "runs" / method / task / f"seed{seed}"


def finished(directory: Path) -> dict[str, Any] | None:
    """The record of a finished run with its adapter saved, else None."""
    record = directory / "record.json"
    if not (record.is_file() and (directory / "adapter" / "adapter.safetensors").is_file()):
        return None
    found = json.loads(record.read_text())
    return found if found.get("status") == "ok" else None


def task_overrides(study: Study, task: str) -> list[str]:
    if task == "mixture":
        tasks = {name: study.spec["tasks"][name] or None for name in study.tasks}
        return ["task=mixture", "~task.tasks", f"+task.tasks={flow(tasks)}"]
    return [f"task={task}", *(f"task.{k}={flow(v)}" for k, v in (study.spec["tasks"][task] or {}).items())]


def single_steps(study: Study) -> int:
    from peftbench.validation import load_config

    return int(load_config(["experiment=merging", *study.run_overrides]).trainer.max_steps)


def train(study: Study, method: str, task: str, seed: int) -> dict[str, Any]:
    """The finished record of (method, task, seed), training it first when there is none."""
    directory = run_dir(study, method, task, seed)
    record = finished(directory)
    if record is None:
        steps = (
            [f"trainer.max_steps={single_steps(study) * study.spec['mixture_steps']}"]
            if task == "mixture"
            else []
        )
        argv = [
            "experiment=merging",
            f"method={method}",
            f"seed={seed}",
            *task_overrides(study, task),
            *study.run_overrides,
            *steps,
            f"hydra.run.dir={directory}",
        ]
        print(f"[merging study] train {method} {task} seed {seed}", flush=True)
        env = {**os.environ, "WANDB_MODE": "offline", "PEFTBENCH_RESULTS": str(study.work / "results")}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "peftbench.run", *argv], env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"training {method} {task} seed {seed} failed (exit {done.returncode}): {argv}"
            )
        print(f"[merging study] trained in {time.perf_counter() - started:.0f} s", flush=True)
        record = finished(directory)
        if record is None:
            raise RuntimeError(f"{directory} holds no finished run after training")
    copy_to = study.out / "records" / method / task / f"seed{seed}.json"
    copy_to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(directory / "record.json", copy_to)
    return record


# ----- 2-4. merging and scoring, in this process ----------------------------------------------------------
class Scorer:
    """The base model (loaded once), the tasks set up once per split kind, and the runs' task vectors."""

    def __init__(self, study: Study, model_config: dict[str, Any]) -> None:
        from peftbench.merging.runs import load_base

        self.study = study
        self.base = load_base(model_config)
        self._tasks: dict[tuple[str, str], Any] = {}

    def task(self, name: str, kind: str) -> Any:
        """`name` set up as its runs set it up; kind ``select``: its val split cut to `select_val`."""
        from peftbench.tasks import build_task
        from peftbench.tasks.mixture import sub_task_config
        from peftbench.validation import task_config

        if (name, kind) not in self._tasks:
            config = sub_task_config(name, self.study.spec["tasks"][name])
            if kind == "select":
                config["split"] = {**(config.get("split") or {}), "val": self.study.spec["select_val"]}
            task = build_task(task_config(config))
            task.setup(self.base.tokenizer, 0)
            task.head(self.base.model)
            self._tasks[name, kind] = task
        return self._tasks[name, kind]

    def primary(self, model: Any, name: str, kind: str) -> float:
        from peftbench.evaluate import score

        task = self.task(name, kind)
        split = "val" if kind == "select" else "test"
        return score(model, task, split)[f"{split}/{task.primary_metric}"]

    def scores(self, model: Any, kind: str) -> dict[str, float]:
        return {name: self.primary(model, name, kind) for name in self.study.tasks}

    def vectors(self, method: str, seed: int) -> list[dict[str, Any]]:
        from peftbench.merging.task_vectors import task_vector_from_adapter

        found = []
        for name in self.study.tasks:
            adapter = run_dir(self.study, method, name, seed) / "adapter"
            found.append(task_vector_from_adapter(self.base.model, adapter, self.base.fingerprint).deltas)
        return found

    def merged(self, vectors: list[dict[str, Any]], how: str, density: float, scale: float) -> Any:
        from peftbench.merging.combine import combine
        from peftbench.merging.task_vectors import add_to_base

        change = combine(
            how,
            vectors,
            self.study.spec["weights"],
            density=density,
            scale=scale,
            seed=int(self.study.spec["dare_seed"]),
        )
        return add_to_base(copy.deepcopy(self.base.model), change).eval()

    def adapted(self, method: str, name: str, seed: int) -> Any:
        from peftbench.methods.io import load_adapter

        model = copy.deepcopy(self.base.model)
        load_adapter(model, run_dir(self.study, method, name, seed) / "adapter")
        return model.eval()


def normalised(raw: Mapping[str, float], single: Mapping[str, float]) -> dict[str, float]:
    """Each task's score over its single-task run's (nan where that is 0)."""
    return {k: (raw[k] / single[k] if single[k] else float("nan")) for k in raw}


def mean(values: Sequence[float]) -> float:
    """The mean of the defined values (a task whose single-task score is 0 has no normalised score); nan
    when none is."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")


def settings(study: Study, how: str) -> list[tuple[float, float]]:
    densities = study.spec["densities"] if how != "task_arithmetic" else [1.0]
    return [(float(d), float(s)) for d in densities for s in study.spec["scales"]]


def select(study: Study, scorer: Scorer, method: str, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Step 2 for `method`: the best (density, scale) per combination on `seed`'s validation subsets (the
    study's first seed: 0)."""
    path = study.out / "selection.jsonl"
    rows = read_rows(path)
    single_row = find_row(rows, method=method, how="single")
    if single_row is None:
        single = {
            name: scorer.primary(scorer.adapted(method, name, seed), name, "select") for name in study.tasks
        }
        single_row = {"method": method, "how": "single", "seed": seed, "raw": single}
        append_row(path, single_row)
        rows.append(single_row)
    single = single_row["raw"]
    vectors: list[dict[str, Any]] | None = None
    chosen = {}
    for how in study.spec["combinations"]:
        tried = []
        for density, scale in settings(study, how):
            row = find_row(rows, method=method, how=how, density=density, scale=scale)
            if row is None:
                vectors = vectors if vectors is not None else scorer.vectors(method, seed)
                raw = scorer.scores(scorer.merged(vectors, how, density, scale), "select")
                norm = normalised(raw, single)
                row = {"method": method, "how": how, "density": density, "scale": scale, "raw": raw}
                row |= {"normalised": norm, "mean": mean(list(norm.values()))}
                append_row(path, row)
                rows.append(row)
                print(
                    f"[merging study] select {method} {how} d={density} s={scale}: {row['mean']:.3f}",
                    flush=True,
                )
            tried.append(row)
        chosen[how] = max(tried, key=lambda r: -1e9 if r["mean"] != r["mean"] else r["mean"])
    return chosen


def primary_of(record: Mapping[str, Any], task: str, prefix: str = "test") -> float:
    key = record["primary_metric"].removeprefix("test/")
    return float(record["metrics"][f"{prefix}/{key}"])


def test_rows(
    study: Study, scorer: Scorer, method: str, seed: int, chosen: Mapping[str, Mapping[str, Any]]
) -> None:
    """Step 3 for (`method`, `seed`): the chosen merges, the base and the mixture on the test splits."""
    path = study.out / "test.jsonl"
    rows = read_rows(path)
    records = {name: train(study, method, name, seed) for name in study.tasks}
    single = {name: primary_of(records[name], name) for name in study.tasks}
    for name, record in records.items():
        expected = scorer.task(name, "test").split_sizes()["test"]
        if record["data"]["test"] != expected:
            raise RuntimeError(
                f"{name}: the run scored {record['data']['test']} test examples, the study {expected}"
            )
    keyed = {"method": method, "seed": seed}
    if find_row(rows, how="base", **keyed) is None:
        raw = {name: primary_of(records[name], name, "test_before") for name in study.tasks}
        append_row(path, {**keyed, "how": "base", "raw": raw, "single": single, **_summary(raw, single)})
    if find_row(rows, how="mixture", **keyed) is None:
        mixture = train(study, method, "mixture", seed)
        raw = {}
        for name in study.tasks:
            key = scorer.task(name, "test").primary_metric
            raw[name] = float(mixture["metrics"][f"test/{name}/{key}"])
        append_row(path, {**keyed, "how": "mixture", "raw": raw, "single": single, **_summary(raw, single)})
    vectors = None
    for how, setting in chosen.items():
        if find_row(rows, how=how, **keyed) is not None:
            continue
        vectors = vectors if vectors is not None else scorer.vectors(method, seed)
        model = scorer.merged(vectors, how, setting["density"], setting["scale"])
        raw = scorer.scores(model, "test")
        row = {**keyed, "how": how, "density": setting["density"], "scale": setting["scale"], "raw": raw}
        append_row(path, {**row, "single": single, **_summary(raw, single)})
        print(
            f"[merging study] test {method} seed {seed} {how}: {_summary(raw, single)['mean']:.3f}",
            flush=True,
        )
    diagnostics(study, scorer, method, seed, vectors)


def _summary(raw: Mapping[str, float], single: Mapping[str, float]) -> dict[str, Any]:
    norm = normalised(raw, single)
    return {"normalised": norm, "mean": mean(list(norm.values()))}


def diagnostics(study: Study, scorer: Scorer, method: str, seed: int, vectors: list | None) -> None:
    """Step 4: sign conflicts and cosines of (`method`, `seed`)'s task vectors."""
    from peftbench.merging.combine import cosine_matrix, sign_conflict_rate

    path = study.out / "diagnostics.jsonl"
    if find_row(read_rows(path), method=method, seed=seed) is not None:
        return
    vectors = vectors if vectors is not None else scorer.vectors(method, seed)
    trim = min(float(d) for d in study.spec["densities"])
    cosines = cosine_matrix(vectors)
    names = study.tasks
    pairs = {
        f"{names[i]}|{names[j]}": float(cosines[i, j])
        for i in range(len(names))
        for j in range(i + 1, len(names))
    }
    append_row(
        path,
        {
            "method": method,
            "seed": seed,
            "sign_conflict": sign_conflict_rate(vectors),
            "sign_conflict_trimmed": sign_conflict_rate(vectors, trim),
            "trim_density": trim,
            "cosine": pairs,
            "numel": sum(t.numel() for t in vectors[0].values()),
        },
    )


def run_study(argv: Sequence[str], root: Path | None = None) -> Path:
    """Every piece of the study `argv` describes, then the report; returns the report's path."""
    from peftbench.merging.study_report import write_report

    study = load_study(argv, root)
    save_state(study, argv)
    methods, seeds = list(study.spec["methods"]), [int(s) for s in study.spec["seeds"]]
    for method in methods:  # all training first: the slow, resumable part
        for seed in seeds:
            for name in [*study.tasks, "mixture"]:
                train(study, method, name, seed)
    from peftbench.saved_run import run_model_config

    model_config = run_model_config(run_dir(study, methods[0], study.tasks[0], seeds[0]))
    assert model_config is not None
    scorer = Scorer(study, model_config)
    for method in methods:
        chosen = select(study, scorer, method, seeds[0])
        for seed in seeds:
            test_rows(study, scorer, method, seed, chosen)
    return write_report(study)
