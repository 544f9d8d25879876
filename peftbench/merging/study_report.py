"""The merging study's report (peftbench/merging/study.py writes the rows): methods ranked by mergeability.

Mergeability of a method = the mean, over the tasks, of each task's merged test score divided by its own
single-task run's (1.0: merging lost nothing), for the combination chosen on seed 0's validation subsets
(the combination whose best grid setting scored highest there), averaged over the seeds, with a 95%
t-interval over the seeds (none with one seed). Beside it: the base model (below) and the mixture-trained
adapter (above) normalised alike, every combination's score, the sign-conflict rate and the mean cosine
between task vectors, the adapter's size. A plot of the mean normalised score against adapter size.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: two-sided 95% Student t quantiles by degrees of freedom (n - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for fewer than two values)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, None
    centre = sum(values) / len(values)
    if len(values) < 2:
        return centre, None
    sd = math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))
    return centre, T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))


def fmt(centre: float, half: float | None) -> str:
    if math.isnan(centre):
        return "n/a"
    return f"{centre:.3f}" + (f" ± {half:.3f}" if half is not None else "")


def adapter_mb(out: Path, method: str, tasks: Sequence[str]) -> float:
    sizes = []
    for task in tasks:
        for record in sorted((out / "records" / method / task).glob("seed*.json")):
            size = (json.loads(record.read_text()).get("params") or {}).get("adapter_bytes")
            if size:
                sizes.append(size / 1e6)
    return sum(sizes) / len(sizes) if sizes else math.nan


def chosen_combination(selection: Sequence[dict[str, Any]], method: str) -> str | None:
    rows = [
        r for r in selection if r["method"] == method and r["how"] != "single" and not math.isnan(r["mean"])
    ]
    return max(rows, key=lambda r: r["mean"])["how"] if rows else None


def summarise(study: Any) -> dict[str, Any]:
    from peftbench.merging.study_rows import read_rows

    out = study.out
    selection, test = read_rows(out / "selection.jsonl"), read_rows(out / "test.jsonl")
    diagnostics = read_rows(out / "diagnostics.jsonl")
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in test:
        by[row["method"], row["how"]].append(row["mean"])
    methods = []
    for method in dict.fromkeys(r["method"] for r in test):
        best = chosen_combination(selection, method)
        diag = [d for d in diagnostics if d["method"] == method]
        cosines = [c for d in diag for c in d["cosine"].values()]
        chosen_rows = [r for r in test if r["method"] == method and r["how"] == best]
        per_task = {t: interval([r["normalised"][t] for r in chosen_rows]) for t in study.tasks}
        methods.append(
            {
                "method": method,
                "chosen": best,
                "setting": {k: chosen_rows[0].get(k) for k in ("density", "scale")} if chosen_rows else None,
                "score": interval(by[method, best]) if best else (math.nan, None),
                "per_task": per_task,
                "base": interval(by[method, "base"]),
                "mixture": interval(by[method, "mixture"]),
                "combinations": {how: interval(by[method, how]) for how in study.spec["combinations"]},
                "seeds": len(by[method, best]) if best else 0,
                "sign_conflict": interval([d["sign_conflict"] for d in diag])[0],
                "sign_conflict_trimmed": interval([d["sign_conflict_trimmed"] for d in diag])[0],
                "cosine": interval(cosines)[0],
                "adapter_mb": adapter_mb(out, method, study.tasks),
            }
        )
    methods.sort(key=lambda m: -m["score"][0] if not math.isnan(m["score"][0]) else math.inf)
    return {"methods": methods, "tasks": study.tasks, "combinations": study.spec["combinations"]}


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in summary["methods"]:
        centre, half = m["score"]
        if math.isnan(centre) or math.isnan(m["adapter_mb"]):
            continue
        ax.errorbar(m["adapter_mb"], centre, yerr=half or 0, fmt="o", capsize=3)
        ax.annotate(f"{m['method']} ({m['chosen']})", (m["adapter_mb"], centre), fontsize=8)
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("adapter size (MB, log scale)")
    ax.set_ylabel("mean normalised score of the merge")
    ax.set_title("Mergeability against adapter size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(study: Any) -> Path:
    """Write ``report.md``, ``summary.json`` and ``mergeability.png`` under the study's `out`."""
    from peftbench.files import atomic_write_json

    out = study.out
    summary = summarise(study)
    atomic_write_json(out / "summary.json", summary)
    plot(summary, out / "mergeability.png")
    tasks, hows = summary["tasks"], summary["combinations"]
    lines = [
        "# Merging study: methods ranked by mergeability",
        "",
        f"Tasks merged: {', '.join(tasks)}. Score: each task's merged test score over its single-task run's, "
        "averaged over the tasks (1.0 = nothing lost); ± = 95% t-interval over seeds (none with one seed). "
        "Combination and its (density, scale) chosen on the first seed's validation subsets.",
        "",
        "| rank | method | chosen | density, scale | mergeability | "
        + " | ".join(tasks)
        + " | base | mixture | seeds | sign conflicts | cosine | adapter MB |",
        "|" + "---|" * (10 + len(tasks)),
    ]
    for rank, m in enumerate(summary["methods"], 1):
        setting = m["setting"] or {}
        lines.append(
            f"| {rank} | {m['method']} | {m['chosen']} | {setting.get('density')}, {setting.get('scale')} | "
            f"{fmt(*m['score'])} | "
            + " | ".join(fmt(*m["per_task"][t]) for t in tasks)
            + f" | {fmt(*m['base'])} | {fmt(*m['mixture'])} | {m['seeds']} | {m['sign_conflict']:.3f} "
            f"({m['sign_conflict_trimmed']:.3f}) | {m['cosine']:.3f} | {m['adapter_mb']:.3f} |"
        )
    lines += [
        "",
        "Sign conflicts: the fraction of entries non-zero in two or more task vectors whose signs disagree "
        "(in brackets: after TIES' trim at the grid's smallest density). Cosine: mean pairwise cosine "
        "similarity between the task vectors.",
        "",
        "## Every combination (mean normalised test score)",
        "",
        "| method | " + " | ".join(hows) + " |",
        "|" + "---|" * (1 + len(hows)),
    ]
    for m in summary["methods"]:
        lines.append(f"| {m['method']} | " + " | ".join(fmt(*m["combinations"][h]) for h in hows) + " |")
    lines += ["", "![mergeability against adapter size](mergeability.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
