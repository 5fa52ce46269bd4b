"""Run the CLI exactly as a user's shell would: through `main()`, with exit code and all output."""

from __future__ import annotations

import sys

import pytest


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from prunelab.cli import main

    monkeypatch.setattr(sys, "argv", ["prunelab", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err
