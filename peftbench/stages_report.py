"""The tables of a two-phase (stages) study, from its records: what phase 2 did to phase 1's test score
(forgetting), and the last stage's own test metrics before and after it trained (e.g. the per-language
held-out losses of the multilingual dialogue phase), per run and per method (mean and sample sd over seeds).

    python -m peftbench.stages_report experiments/multilingual_two_phase/multilingual_two_phase
    python -m peftbench.stages_report DIR --prefix token_accuracy_ --out DIR/stages.md

`forgetting` is read from each record's `forgetting` (peftbench/stages.py); "before" is the last stage's
`test_before/<key>` (the model as phase 1 left it: needs `evaluate_before=true`), "after" its `test/<key>`.
change = after - before: for a loss negative is learning, for a score such as ROUGE-L negative is
forgetting.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from peftbench.errors import ConfigError
from peftbench.record import Record


def forgetting_rows(records: Sequence[Record]) -> list[dict[str, object]]:
    """One row per run and earlier stage: method, seed, stage, metric, after own stage, after last, change."""
    rows: list[dict[str, object]] = []
    for record in records:
        for name, gone in (record.forgetting or {}).items():
            rows.append(
                {
                    "method": record.method,
                    "seed": record.seed,
                    "stage": name,
                    "metric": gone.metric,
                    "before": gone.after_own_stage,
                    "after": gone.after_last_stage,
                    "change": gone.change,
                }
            )
    return rows


def last_stage_rows(records: Sequence[Record], prefix: str) -> list[dict[str, object]]:
    """One row per run and last-stage test metric starting with `prefix`: its value before the last stage
    trained (`test_before/`) and after it (`test/`)."""
    rows: list[dict[str, object]] = []
    for record in records:
        if not record.stages:
            continue
        last = record.stages[-1]
        for key in sorted(k for k in last.metrics if k.startswith(f"test/{prefix}")):
            name = key.removeprefix("test/")
            before = last.metrics.get(f"test_before/{name}")
            after = last.metrics[key]
            rows.append(
                {
                    "method": record.method,
                    "seed": record.seed,
                    "stage": last.name,
                    "metric": name,
                    "before": before,
                    "after": after,
                    "change": None if before is None else after - before,
                }
            )
    return rows


def _cell(values: Sequence[object]) -> str:
    numbers = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(float(v))]
    if not numbers:
        return "-"
    if len(numbers) == 1:
        return f"{numbers[0]:.3f}"
    return f"{statistics.fmean(numbers):.3f} ± {statistics.stdev(numbers):.3f}"


def by_method(rows: Sequence[dict[str, object]]) -> str:
    """A markdown table: per method and metric, before / after / change as mean ± sd over the seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((str(row["method"]), str(row["stage"]), str(row["metric"])), []).append(row)
    lines = ["| method | stage | metric | seeds | before | after | change |", "|---|---|---|---|---|---|---|"]
    for (method, stage, metric), group in sorted(groups.items()):
        cells = [_cell([r[k] for r in group]) for k in ("before", "after", "change")]
        lines.append(f"| {method} | {stage} | {metric} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(records: Sequence[Record], prefix: str = "loss_") -> str:
    """Both tables as markdown."""
    staged = [r for r in records if r.stages]
    if not staged:
        raise ConfigError(
            "the directory holds no stages run (a record with `stages`); accepted: a stages study"
        )
    methods = sorted({str(r.method) for r in staged})
    head = f"{len(staged)} stages runs ({', '.join(methods)}); per method: mean ± sd over seeds.\n"
    return (
        head
        + "\n## Forgetting: each earlier stage's test metric after its own stage (before) and after the last"
        + "\n\n"
        + by_method(forgetting_rows(staged))
        + f"\n\n## The last stage's test metrics `{prefix}*` before and after it trained\n\n"
        + by_method(last_stage_rows(staged, prefix))
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the tables (and write them to `--out`); a one-line error and exit code 2 on bad input."""
    from peftbench.compare.table import load_records

    parser = argparse.ArgumentParser(
        prog="python -m peftbench.stages_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dir", help="a stages study's records directory")
    parser.add_argument("--prefix", default="loss_", help="last-stage metrics to tabulate (default: loss_)")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    try:
        text = report(load_records(args.dir), args.prefix)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
