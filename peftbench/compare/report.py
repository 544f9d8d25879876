"""The comparison report: report.md, a self-contained report.html (plots as data URIs), summary.json."""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftbench.budget import budget_statement
from peftbench.compare.claims import ClaimResult, thresholds_note
from peftbench.compare.dashboard import write_spec
from peftbench.compare.memory_split import split_note
from peftbench.compare.plots import write_plots
from peftbench.compare.stats import Estimate, PairedTest
from peftbench.compare.table import ROLLOUT_FIELDS, MethodRow, StudySummary
from peftbench.files import atomic_write_json
from peftbench.record import Record

FRONT_NAMES = {"trainable": "params", "peak_memory_bytes": "memory", "step_s": "time"}
_FRONT = "mean ± 95% CI; round markers, bold labels and the dashed line: the Pareto front."
PLOT_CAPTIONS = {
    "learning_curves": "Learning curves: train loss per step, mean over seeds, band = min-max over seeds.",
    "pareto_trainable": f"Score vs trainable parameters (log x), {_FRONT}",
    "pareto_peak_memory_bytes": f"Score vs peak training memory, {_FRONT}",
    "pareto_step_s": f"Score vs time per optimizer step, {_FRONT}",
}


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _decimals(half_width: float | None) -> int | None:
    if half_width is None or not math.isfinite(half_width) or half_width <= 0:
        return None
    return min(6, max(0, 1 - math.floor(math.log10(half_width))))


def fmt_estimate(e: Estimate | None, signed: bool = False) -> str:
    """`mean ± half-width` with two significant digits on the half-width; `mean (n=1)` for one seed."""
    if e is None:
        return "-"
    sign = "+" if signed else ""
    if e.half_width is not None and e.half_width <= 1e-12 * max(1.0, abs(e.mean)):
        return f"{e.mean:{sign}.4g} ± 0"  # identical over seeds (up to rounding)
    d = _decimals(e.half_width)
    if d is None:
        return f"{e.mean:{sign}.4g}" + (" (n=1)" if e.n == 1 else "")
    return f"{e.mean:{sign}.{d}f} ± {e.half_width:.{d}f}"


def fmt_delta(t: PairedTest | None, is_baseline: bool, has_baseline: bool = True) -> str:
    if is_baseline:
        return "baseline"
    if not has_baseline:
        return "-"
    if t is None:
        return "- (no shared seeds)"
    p = "p=n/a" if t.p is None else ("p<0.001" if t.p < 0.001 else f"p={t.p:.3f}")
    return f"{fmt_estimate(t.delta, signed=True)} ({p}, n={len(t.seeds)})"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:,.0f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def fmt_config(config: dict[str, Any]) -> str:
    """`k=v` pairs of a method's hyperparameters (its name left out), each value cut to 40 characters."""
    return ", ".join(f"{k}={str(v)[:40]}" for k, v in config.items() if k != "name") or "-"


LOADED_MARK = "†"
#: the time and memory columns: (header, environment cost name, formatter)
ENV_COLUMNS = (
    ("peak memory", "peak_memory_bytes", fmt_bytes),
    ("time/step", "step_s", fmt_seconds),
    ("tokens/s", "tokens_per_s", lambda v: "-" if v is None else f"{v:,.0f}"),
)


def env_ids(s: StudySummary) -> list[str | None]:
    """The environment columns: one per environment when the runs ran in several, else one (None)."""
    return [e["id"] for e in s.environments] if s.mixed_environments else [None]


def env_cell(row: MethodRow, env: str | None, name: str, fmt: Callable[[Any], str]) -> str:
    """A time or memory figure of one environment (the row's own value when there is only one), marked
    with † when one of its runs started under load (load average > cores)."""
    costs = row.costs_by_env.get(env, {}) if env else {}
    value = costs.get(name) if env else getattr(row, name)
    loaded = costs.get("loaded") if env else sum(c.get("loaded", 0) for c in row.costs_by_env.values())
    if value is None:
        return "-"
    return fmt(value) + (f" {LOADED_MARK}" if loaded else "")


def env_columns(s: StudySummary) -> tuple[list[str], list[list[str]]]:
    """Time and memory headers and cells, split per environment ([E1], [E2], ...) when mixed."""
    head, cells = [], [[] for _ in s.rows]
    for label, name, fmt in ENV_COLUMNS:
        for env in env_ids(s):
            head.append(label if env is None else f"{label} [{env}]")
            for row, out in zip(s.rows, cells, strict=True):
                out.append(env_cell(row, env, name, fmt))
    return head, cells


def main_table(s: StudySummary) -> tuple[list[str], list[list[str]]]:
    """The headline table: one row per method, best score first. Time and memory get one column per
    environment when the runs ran in several (never one column over machines)."""
    before = s.metric.replace("test/", "test_before/", 1)
    env_head, env_cells = env_columns(s)
    head = [
        "method",
        "seeds ok/failed",
        f"{s.metric} (mean ± 95% CI)",
        f"Δ vs {s.baseline or '-'}",
        before,
        "trainable (% of base)",
        "adapter on disk",
        "base modified",
        *env_head,
        "Pareto front",
    ]
    rows = []
    for r, costs in zip(s.rows, env_cells, strict=True):
        pct = f" ({r.trainable_percent:.3g}%)" if r.trainable_percent is not None else ""
        modified = "-" if r.base_modified is None else ("yes" if r.base_modified else "no")
        fronts = ", ".join(FRONT_NAMES[k] for k, on in r.on_front.items() if on) or "-"
        rows.append(
            [
                r.method,
                f"{len(r.seeds_ok)}/{len(r.seeds_failed)}",
                fmt_estimate(r.score),
                fmt_delta(r.delta, r.method == s.baseline, s.baseline is not None),
                fmt_estimate(r.before),
                fmt_count(r.trainable) + pct,
                fmt_bytes(r.adapter_bytes),
                modified,
                *costs,
                fronts,
            ]
        )
    return head, rows


def rollouts_table(s: StudySummary) -> tuple[list[str], list[list[str]]]:
    """RL from feedback (record.Rollouts): sampled reward on the first and last rollout batch, KL to the
    reference on the last one, and the rollout statistics (seed means ± 95% CI); step time beside them."""
    keys = [k for k in ROLLOUT_FIELDS if any(k in r.rollouts for r in s.rows)]
    head = ["method", *keys, "time per step"]
    rows = [
        [r.method, *(fmt_estimate(r.rollouts.get(k)) for k in keys), fmt_seconds(r.step_s)]
        for r in s.rows
        if r.rollouts
    ]
    return head, rows


def metrics_table(s: StudySummary) -> tuple[list[str], list[list[str]]]:
    """Every test metric (mean ± 95% CI) plus the budget each method actually used."""
    keys = sorted({k for r in s.rows for k in r.metrics})
    wall = "wall time/run" + (f" [{s.environments[0]['id']}]" if s.mixed_environments else "")
    head = ["method", *keys, "steps", "train tokens", "lr", wall, "method config"]
    rows = [
        [
            r.method,
            *(fmt_estimate(r.metrics.get(k)) for k in keys),
            fmt_count(r.steps),
            fmt_count(r.train_tokens),
            "-" if r.lr is None else f"{r.lr:g}",
            fmt_seconds(r.total_s),
            fmt_config(r.method_config),
        ]
        for r in s.rows
    ]
    return head, rows


def _value(v: Any) -> str:
    if isinstance(v, list):
        return " / ".join(map(str, v)) + " (differs between runs)"
    return "-" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))


def budget_lines(s: StudySummary) -> list[str]:
    b = s.budget
    tokens = b["train_tokens"]
    if isinstance(tokens, list):
        tokens = f"{min(tokens):,}-{max(tokens):,} (varies with sequence lengths)"
    return [
        f"Models: {', '.join(map(str, b['models']))}; tasks: {', '.join(map(str, b['tasks']))}.",
        f"Optimizer steps: max_steps={_value(b['max_steps'])}, max_epochs={_value(b['max_epochs'])}; "
        f"steps taken: {_value(b['steps_taken'])}.",
        f"Batch size {_value(b['batch_size'])} × gradient accumulation {_value(b['accumulate_grad_batches'])}"
        f"; precision {_value(b['precision'])}; training examples: {_value(b['train_examples'])}.",
        f"Training tokens per run: {_value(tokens)}.",
        budget_statement(b.get("trainable_params")),
        "Every method had the same step and batch budget."
        if b["equal"]
        else "WARNING: the budgets differ between runs; the comparison is not at equal budget.",
    ]


def environment_lines(s: StudySummary) -> list[str]:
    e = s.environment
    versions = ", ".join(f"{k} {v}" for k, v in e["versions"].items() if v and v != "None")
    commits = ", ".join(str(c)[:10] for c in e["git_commits"]) or "-"
    return [
        *environment_key_lines(s),
        f"Devices: {', '.join(map(str, e['devices'])) or '-'}; hosts: {', '.join(e['hosts']) or '-'}.",
        f"Versions: {versions or '-'}.",
        f"Git commits: {commits}.",
    ]


def environment_key_lines(s: StudySummary) -> list[str]:
    """One line per environment (CPU model, native bf16, threads, GPU), the loaded runs, and what the
    report does when there are several."""
    lines = []
    for e in s.environments:
        load = f"{e['loaded_runs']} started under load ({LOADED_MARK})"
        if e["load_unknown_runs"]:
            load += f", {e['load_unknown_runs']} without a recorded load"
        lines.append(f"{e['id']}: {e['description']}; {e['runs']} ok run(s), {load}.")
    if s.mixed_environments:
        lines.append(
            f"The runs ran in {len(s.environments)} environments: every time and memory column is split "
            f"per environment; the time and memory Pareto fronts and plots use {s.environments[0]['id']}'s "
            "figures only (methods without a run there are left off them)."
        )
    lines.append(
        f"{LOADED_MARK}: at least one of the runs behind the figure started with a 1-minute load average "
        "above the cores (other work was running): its time is an upper bound."
    )
    return lines


def _intro(s: StudySummary) -> str:
    way = "higher" if s.higher_is_better else "lower"
    base = f"the paired t-test is against **{s.baseline}**, matched by seed" if s.baseline else "no baseline"
    return (
        f"Primary metric **{s.metric}** ({way} is better), mean over seeds ± the half-width of a 95% "
        f"Student-t confidence interval; Δ is the mean paired difference and {base}. Methods are sorted "
        "best first; 'Pareto front' names the cost axes on which no other method is both cheaper and "
        "better."
    )


def claims_table(s: StudySummary) -> tuple[list[str], list[list[str]]]:
    """Each paper's headline claim: the test and its threshold, the effect with its 95% CI, the verdict."""
    head = ["claim", "paper", "test (threshold)", "effect [95% CI]", "paired seeds", "verdict", "notes"]
    rows = []
    for c in s.claims:
        result = ClaimResult(**c)
        rows.append(
            [
                c["claim"],
                c["paper"],
                c["test"],
                result.estimate(),
                str(c["n"]),
                c["verdict"],
                c["detail"] or "-",
            ]
        )
    return head, rows


def md_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


def failed_rows(s: StudySummary) -> list[list[str]]:
    return [
        [str(f["method"]), str(f["seed"]), str(f.get("error") or "?").splitlines()[0][:300], str(f["run_id"])]
        for f in s.failed
    ]


CLAIMS_INTRO = (
    "Each paper's headline claim, tested on this study's runs against LoRA (paired by seed) at this "
    "study's scale: a verdict at this budget and model, not a verdict on the paper."
)


def render_markdown(s: StudySummary, plots: dict[str, Path], out_dir: Path) -> str:
    parts = [
        f"# Comparison: {s.study}",
        _intro(s),
        md_table(*main_table(s)),
        "## Claims",
        CLAIMS_INTRO,
        md_table(*claims_table(s)),
        thresholds_note(),
        split_note(),
        "## Budget",
        "\n".join(f"- {line}" for line in budget_lines(s)),
        "## Plots",
    ]
    parts += [
        f"![{name}]({p.relative_to(out_dir).as_posix()})\n\n{PLOT_CAPTIONS.get(name, '')}"
        for name, p in plots.items()
    ]
    if any(r.rollouts for r in s.rows):
        parts += ["## RL training (rollouts)", md_table(*rollouts_table(s))]
    parts += ["## All test metrics", md_table(*metrics_table(s)), "## Failed runs"]
    parts.append(md_table(["method", "seed", "error", "run_id"], failed_rows(s)) if s.failed else "None.")
    parts += ["## Environment", "\n".join(f"- {line}" for line in environment_lines(s))]
    return "\n\n".join(parts) + "\n"


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;"
    "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left;font-weight:600}"
    "th{background:#f2f2f2}tr:nth-child(even){background:#fafafa}figure{display:inline-block;vertical-align:top;"
    "margin:0 1em 1em 0;max-width:640px}img{max-width:100%}figcaption{font-size:12px;color:#555}"
    "table.text td,table.text th{text-align:left}"
)


def render_html(s: StudySummary, plots: dict[str, Path]) -> str:
    """A single HTML file with every plot embedded as a base64 PNG: nothing external is loaded."""
    intro = html.escape(_intro(s)).replace("**", "")
    figs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(PLOT_CAPTIONS.get(n, n))}'
        "</figcaption></figure>"
        for n, p in plots.items()
    )
    lists = {
        k: "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"
        for k, lines in (("budget", budget_lines(s)), ("env", environment_lines(s)))
    }
    failed = (
        _html_table(["method", "seed", "error", "run_id"], failed_rows(s)) if s.failed else "<p>None.</p>"
    )
    rl_html = (
        f"<h2>RL training (rollouts)</h2>{_html_table(*rollouts_table(s))}"
        if any(r.rollouts for r in s.rows)
        else ""
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>peftbench: '
        f"{html.escape(s.study)}</title><style>{CSS}</style></head><body>"
        f"<h1>Comparison: {html.escape(s.study)}</h1><p>{intro}</p>{_html_table(*main_table(s))}"
        f"<h2>Claims</h2><p>{html.escape(CLAIMS_INTRO)}</p>{_html_table(*claims_table(s), cls='text')}"
        f"<p>{html.escape(thresholds_note())}</p><p>{html.escape(split_note())}</p>"
        f"<h2>Budget</h2>{lists['budget']}<h2>Plots</h2>{figs}" + rl_html + "<h2>All test metrics</h2>"
        f"{_html_table(*metrics_table(s))}<h2>Failed runs</h2>{failed}<h2>Environment</h2>{lists['env']}"
        "</body></html>\n"
    )


def write_report(records: list[Record], summary: StudySummary, out_dir: Path) -> dict[str, Path]:
    """Write plots/*.png|svg, report.md, report.html, summary.json and the W&B dashboard's spec
    (dashboard.json, compare/dashboard.py) under `out_dir` (each atomically)."""
    out_dir = Path(out_dir)
    plots = write_plots(records, summary, out_dir / "plots")
    paths = {
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
        "summary": out_dir / "summary.json",
    }
    atomic_write_text(paths["markdown"], render_markdown(summary, plots, out_dir))
    atomic_write_text(paths["html"], render_html(summary, plots))
    atomic_write_json(paths["summary"], summary.to_dict())
    paths["dashboard"] = write_spec(records, summary, out_dir)
    return {**paths, **{f"plot:{k}": v for k, v in plots.items()}}
