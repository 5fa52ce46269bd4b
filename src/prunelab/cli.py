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
