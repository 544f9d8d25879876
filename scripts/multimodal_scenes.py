"""The multimodal experiment in one command: stage 1 (projector alignment on captions) once per seed, then
stage 2 (the method on the language model) for every method from it, the comparison report, a summary table
and one picture of example scenes beside each method's answers.

    flock /tmp/peftbench-cpu.lock env OMP_NUM_THREADS=2 .venv/bin/python scripts/multimodal_scenes.py \
        --seeds 0 1 2 --budget-min 24

Runs go to `--out` (default experiments/multimodal): `runs/align/seed<k>/` (stage 1), `runs/<method>/seed<k>/`
(stage 2), the records to `results/` (`PEFTBENCH_RESULTS`). A run whose record says ok is not run again.
Seeds run one after the other, every method within a seed, and a seed is only started when the time the
previous one took still fits in `--budget-min`: the seeds that ran are the ones reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "vera", "lora_fa", "qlora", "full")
STAGE1 = (
    "method=lora",
    "task.train_types=[caption]",
    "model.vision.freeze_language_model=true",
    "model.vision.freeze_multi_modal_projector=false",
    "study=multimodal_scenes_align",
)
TYPES = ("colour", "count", "position")


def ok(run_dir: Path) -> bool:
    record = run_dir / "record.json"
    return record.is_file() and json.loads(record.read_text()).get("status") == "ok"


def run(run_dir: Path, overrides: list[str], env: dict[str, str], extra: list[str]) -> float:
    """One `python -m peftbench.run` (its output in `<run dir>.log`); seconds taken (0 when done before)."""
    if ok(run_dir):
        return 0.0
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    command = [sys.executable, "-m", "peftbench.run", "experiment=multimodal_scenes", *overrides, *extra]
    command.append(f"hydra.run.dir={run_dir}")
    print(" ".join(command[1:]), flush=True)
    with open(f"{run_dir}.log", "w") as log:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    took = time.perf_counter() - started
    print(f"  -> rc={result.returncode} in {took:.0f} s", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"run failed: see {run_dir}.log")
    return took


def summarise(out: Path, seeds: list[int], methods: list[str]) -> dict[str, Any]:
    """Mean (and sd over seeds) of every test metric, before and after, per method; stage 1 too."""
    rows: dict[str, Any] = {}
    for name in ["align", *methods]:
        records = [json.loads((out / "runs" / name / f"seed{s}" / "record.json").read_text()) for s in seeds]
        keys = sorted({k for r in records for k in r["metrics"] if k.startswith(("test/", "test_before/"))})
        entry: dict[str, Any] = {"seeds": seeds}
        for key in keys:
            values = [r["metrics"][key] for r in records if key in r["metrics"]]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[key] = {"mean": statistics.fmean(values), "sd": sd, "values": values}
        first = records[0]
        entry["trainable"] = first["params"]["trainable"]
        entry["projector_trainable"] = first["params"].get("projector_trainable")
        entry["adapter_bytes"] = first["params"].get("adapter_bytes")
        entry["train_step_s"] = statistics.fmean(r["time"]["train_step_s"] for r in records)
        entry["total_s"] = statistics.fmean(r["time"]["total_s"] for r in records)
        entry["steps"] = first["steps"]
        rows[name] = entry
    return rows


def markdown(rows: dict[str, Any]) -> str:
    def cell(entry: dict[str, Any], key: str) -> str:
        value = entry.get(key)
        if value is None:
            return "-"
        return (
            f"{value['mean']:.1f} ± {value['sd']:.1f}" if len(value["values"]) > 1 else f"{value['mean']:.1f}"
        )

    head = (
        "| run | score before | score after | colour | count | position | caption ROUGE-L | "
        "trainable (projector) | s/step |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, e in rows.items():
        label = "stage 1 (align, projector only)" if name == "align" else name
        types = " | ".join(cell(e, f"test/exact_match/{t}") for t in TYPES)
        lines.append(
            f"| {label} | {cell(e, 'test_before/score')} | {cell(e, 'test/score')} | {types} | "
            f"{cell(e, 'test/rouge_l/caption')} | {e['trainable']:,} ({e['projector_trainable'] or 0:,}) | "
            f"{e['train_step_s']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def picture(out: Path, methods: list[str], seed: int, n_scenes: int = 4) -> Path:
    """example_answers.png: test scenes (one question each, one of each type) beside each run's answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from peftbench.generate import Decoding, generate
    from peftbench.saved_run import load_adapted, locate
    from peftbench.tasks.scenes import cached_scenes
    from peftbench.tasks.scenes_data import SceneConfig, exact_match, read_image_jsonl

    record = json.loads((out / "runs" / methods[0] / f"seed{seed}" / "record.json").read_text())
    task = record["config"]["task"]
    directory = cached_scenes(task["scenes_seed"], task["scenes"], SceneConfig(canvas=task["canvas"]))
    rows = read_image_jsonl(directory / "test.jsonl")
    wanted = ["caption", *TYPES]
    picked = []
    for kind in wanted[:n_scenes]:
        picked.append(next(r for r in rows if r.type == kind and all(p.image != r.image for p in picked)))
    answers: dict[str, list[str]] = {}
    for name in ["align", *methods]:
        model, tokenizer, _ = load_adapted(locate(out / "runs" / name / f"seed{seed}"))
        decoding = Decoding(max_new_tokens=32)
        answers[name] = [
            generate(model, tokenizer, [r.prompt], decoding, stream=False, image=r.image)[0]
            .strip()
            .split("\n")[0]
            for r in picked
        ]
        del model
    fig, axes = plt.subplots(1, len(picked), figsize=(4.2 * len(picked), 6.2))
    for ax, (i, r) in zip(axes, enumerate(picked), strict=True):
        ax.imshow(Image.open(r.image).convert("RGB"))
        ax.set_xticks([])
        ax.set_yticks([])
        lines = [f"Q: {r.prompt}", f"reference: {r.answer}", ""]
        for name in ["align", *methods]:
            mark = "" if r.type == "caption" else (" ✓" if exact_match(answers[name][i], r.answer) else " ✗")
            label = "stage 1" if name == "align" else name
            lines.append(f"{label}: {answers[name][i][:60]}{mark}")
        ax.set_title(f"test scene ({r.type})", fontsize=10)
        ax.text(0, -0.05, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=8, wrap=True)
    fig.suptitle(f"Example test scenes and each run's greedy answer (seed {seed})", fontsize=11)
    fig.subplots_adjust(bottom=0.42, top=0.9, wspace=0.15)
    path = out / "example_answers.png"
    fig.savefig(path, dpi=110)
    (out / "example_answers.json").write_text(
        json.dumps(
            [
                {"image": str(r.image.name), "type": r.type, "prompt": r.prompt, "reference": r.answer}
                for r in picked
            ]
            + [{"answers": answers}],
            indent=2,
        )
        + "\n"
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "multimodal")
    parser.add_argument("--stage1-steps", type=int, default=60)
    parser.add_argument("--budget-min", type=float, default=24.0, help="start no seed that would not fit")
    parser.add_argument("--report-only", action="store_true", help="no training: summary, report, picture")
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for every run (smoke tests)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    env = {**os.environ, "PEFTBENCH_RESULTS": str(out / "results"), "WANDB_MODE": "offline"}
    started = time.perf_counter()
    done: list[int] = []
    for seed in args.seeds:
        if args.report_only:
            break
        seed_started = time.perf_counter()
        if done:
            per_seed = (seed_started - started) / len(done)
            if seed_started - started + per_seed > 60 * args.budget_min:
                print(f"seed {seed} would not fit in {args.budget_min} min; stopping after {done}")
                break
        align = out / "runs" / "align" / f"seed{seed}"
        run(align, [*STAGE1, f"seed={seed}", f"trainer.max_steps={args.stage1_steps}"], env, args.set)
        for method in args.methods:
            overrides = [f"method={method}", f"seed={seed}", f"model.vision.projector_from={align}"]
            run(out / "runs" / method / f"seed{seed}", overrides, env, args.set)
        done.append(seed)
    seeds = done or [s for s in args.seeds if all(ok(out / "runs" / m / f"seed{s}") for m in args.methods)]
    rows = summarise(out, seeds, args.methods)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(rows))
    print(markdown(rows))
    subprocess.run(
        [sys.executable, "-m", "peftbench.compare", str(out / "results" / "multimodal_scenes")],
        cwd=ROOT,
        env=env,
    )
    print(picture(out, args.methods, seeds[0]))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
