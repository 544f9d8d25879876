"""`python -m peftbench.compare DIR [--baseline lora] [--metric test/rouge_l] [--out DIR] [--wandb]`.

Reads the run records of one study under DIR, prints the headline table, and writes report.md,
report.html (self-contained), plots/*.png|svg, summary.json and dashboard.json (the W&B workspace's spec)
into --out (default DIR/report); --wandb logs a summary run and saves the workspace when logged in.
Bad input is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from peftbench.compare.report import main_table, md_table, write_report
from peftbench.compare.table import StudySummary, load_study
from peftbench.errors import ConfigError

if TYPE_CHECKING:
    from peftbench.loggers import WandbLogin

COMPACT = ("trainable (% of base)", "peak memory", "time/step")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, exit 2 (argparse prints the whole usage otherwise)."""
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="python -m peftbench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a study's results directory (records *.json, recursively)")
    parser.add_argument(
        "--baseline", default=None, help="method for the paired test (default: lora if present)"
    )
    parser.add_argument(
        "--metric", default=None, help="score to compare (default: the records' primary metric)"
    )
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: DIR/report)")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the table and plots to a W&B summary run and, when logged in, save the study's W&B "
        "workspace (dashboard.json, written with every report, is its spec)",
    )
    return parser.parse_args(argv)


def print_table(summary: StudySummary, console: Console | None = None) -> None:
    """The headline table in the terminal, rendered from Markdown by rich; on a narrow terminal only the
    score, delta and cost columns (the report files have them all)."""
    from rich.markdown import Markdown

    console = console or Console()
    head, rows = main_table(summary)
    if console.width < 180:
        keep = [i for i, h in enumerate(head) if i in (0, 1, 2, 3) or h.split(" [")[0] in COMPACT]
        head, rows = [head[i] for i in keep], [[r[i] for i in keep] for r in rows]
    console.print(Markdown(f"# {summary.study}: {summary.metric}\n\n" + md_table(head, rows)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or args.dir / "report"
    try:
        records, summary = load_study(args.dir, metric=args.metric, baseline=args.baseline)
        paths = write_report(records, summary, out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_table(summary)
    if summary.failed:
        print(f"{len(summary.failed)} failed run(s), listed in the report.")
    print(f"wrote {paths['markdown']}, {paths['html']}, {paths['summary']} and {out / 'plots'}/")
    if args.wandb:
        from peftbench.compare.wandb_summary import log_summary
        from peftbench.loggers import wandb_login

        login = wandb_login()  # before the summary run sets WANDB_MODE=offline for a logged-out user

        plots = {k.split(":", 1)[1]: v for k, v in paths.items() if k.startswith("plot:")}
        run_dir = log_summary(summary, plots, out)
        print(f"W&B summary run: {run_dir} (offline runs: `wandb sync {run_dir}`)")
        return save_workspace(paths["dashboard"], login)
    return 0


def save_workspace(spec_path: Path, login: WandbLogin | None = None) -> int:
    """Save the study's W&B workspace from its spec when logged in; say why not otherwise."""
    import json

    from peftbench.compare import dashboard
    from peftbench.loggers import wandb_login

    login = login or wandb_login()
    if not login.online:
        print(f"W&B workspace not saved ({login.reason}); its spec: {spec_path}")
        return 0
    try:
        url = dashboard.save_dashboard(json.loads(spec_path.read_text()))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the server's answer (network, permissions): one line, not a traceback
        why = (str(err).splitlines() or [""])[0][:300]
        print(f"error: W&B workspace not saved: {type(err).__name__}: {why}", file=sys.stderr)
        return 1
    print(f"W&B workspace: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
