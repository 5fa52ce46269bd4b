"""The `prunelab` command line: parse, call one library function per command, print with rich.

Nothing here computes anything; each command is a thin shell over a library function so
that everything the CLI does is also a Python call away. User errors (`PrunelabError`)
print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional  # noqa: F401  (typer needs Optional in some annotations)

import typer
from rich.console import Console

from prunelab.errors import PrunelabError

app = typer.Typer(
    name="prunelab",
    help="Make a transformer sparse, and measure what it cost and what it bought.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()
_STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _STATE["debug"] = debug
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def fail(message: str) -> None:
    """Print a one-line error and exit 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


# ---------------------------------------------------------------------------------------------
# Commands. Each one: parse options, call one library function, print a short summary.
# ---------------------------------------------------------------------------------------------


@app.command()
def models() -> None:
    """List the offline zoo models."""
    from rich.table import Table

    from prunelab.models.zoo import ZOO

    table = Table("spec", "package", "description")
    for alias, entry in ZOO.items():
        table.add_row(f"zoo:{alias}", entry.package, entry.description)
    out.print(table)


def _print_study_summary(summary: object) -> None:
    s = summary  # prunelab.study.StudySummary
    out.print(
        f"study {s.out_dir}: {s.planned} cells planned, {s.skipped} already done, {s.done} done now, "  # type: ignore[attr-defined]
        f"{s.failed} failed; wall time {s.wall_s:.1f} s ({s.executor} executor)",  # type: ignore[attr-defined]
        highlight=False,
    )
    for label, error in s.failures[:20]:  # type: ignore[attr-defined]
        console.print(f"  [red]failed[/] {label}: {error}", highlight=False)
    if len(s.failures) > 20:  # type: ignore[attr-defined]
        console.print(f"  ... and {len(s.failures) - 20} more (see `prunelab results`)")  # type: ignore[attr-defined]


@app.command()
def study(
    config: Path | None = typer.Argument(None, help="Study YAML (models, methods, sparsities, ...); none = default."),
    out_dir: Path = typer.Option(..., "--out", help="Study directory (results.sqlite, logs, checkpoints)."),
    preset: str | None = typer.Option(None, "--preset", help="Data sizes: quick or default."),
    executor: str = typer.Option("local", "--executor", help="local or ray."),
    jobs: int = typer.Option(1, "--jobs", help="Cells at once with the local executor."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs still written)."),
) -> None:
    """Run (or resume) a grid of models x methods x patterns x sparsities x benchmarks."""
    from prunelab.study import run_study

    summary = run_study(str(config) if config else None, out_dir, preset=preset, executor=executor, jobs=jobs,
                        address=address, progress=not no_progress)
    _print_study_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def results(
    out_dir: Path = typer.Argument(..., help="Study directory."),
    csv: Path | None = typer.Option(None, "--csv", help="Also write every row as CSV here."),
    all_rows: bool = typer.Option(False, "--all", help="Every stored row, not only the last study's plan."),
) -> None:
    """Show the results store of a study; optionally export it as CSV."""
    from rich.table import Table

    from prunelab.study import Store, export_csv

    with Store(out_dir, create=False) as store:
        rows = store.rows() if all_rows else store.plan_rows()
    table = Table("kind", "model", "method", "sparsity", "bench", "status", "value", "wall s")
    for r in rows:
        value = r.metrics.get("value") if r.kind == "bench" else r.metrics.get("achieved_sparsity_prunable")
        table.add_row(r.kind, r.model.split("/")[-1], r.method_label, f"{r.sparsity:g}", r.bench, r.status,
                      "" if value is None else f"{value:.4g}", "" if r.wall_s is None else f"{r.wall_s:.1f}")
    out.print(table)
    if csv is not None:
        path = export_csv(rows, csv)
        out.print(f"wrote {len(rows)} rows to {path}", highlight=False)


@app.command()
def report(out_dir: Path = typer.Argument(..., help="Study directory.")) -> None:
    """Write DIR/report.md and a self-contained DIR/report.html from a study's results."""
    from prunelab.report import build_report

    paths = build_report(out_dir)
    out.print(f"report: {paths['html']} ({paths['figures']} figures) and {paths['markdown']}", highlight=False)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("prunelab-demo"), "--out", help="Where the study and report go."),
    preset: str = typer.Option("default", "--preset", help="Data sizes: quick or default."),
    jobs: int = typer.Option(1, "--jobs", help="Cells at once."),
) -> None:
    """The main job: the offline default study (3 zoo models), then its report."""
    import time as _time

    from prunelab.report import build_report
    from prunelab.study import run_study

    t0 = _time.perf_counter()
    summary = run_study(None, out_dir, preset=preset, jobs=jobs)
    _print_study_summary(summary)
    paths = build_report(out_dir)
    wall = _time.perf_counter() - t0
    out.print(f"demo finished in {wall / 60:.1f} min ({wall:.0f} s wall time)", highlight=False)
    out.print(f"report: {paths['html'].resolve()} ({paths['figures']} figures)", highlight=False)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def size(
    directory: Path = typer.Argument(..., help="A sparse checkpoint directory (from --format sparse / save_sparse)."),
    by_type: bool = typer.Option(False, "--by-type", help="One row per module type instead of per tensor."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the full report as JSON here."),
) -> None:
    """Per-tensor stored size vs dense and vs the bitmask / entropy bounds, with totals."""
    from prunelab.io import write_json
    from prunelab.storage import size_report, size_tables

    rep = size_report(directory)
    for table in size_tables(rep, by_type=by_type):
        out.print(table)
    if json_out is not None:
        write_json(json_out, rep)
        out.print(f"report: {json_out}", highlight=False)


def main() -> None:
    """Entry point: run the app, turning `PrunelabError` into a one-line message and exit 2."""
    try:
        app()
    except PrunelabError as exc:
        if _STATE["debug"]:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished results are kept; rerun the same command to resume")
        sys.exit(130)


_ = Path  # re-exported for command modules that build paths
