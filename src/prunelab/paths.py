"""Where prunelab keeps caches and finds the shared offline data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Converted checkpoints and synthesized audio live here (`$PRUNELAB_CACHE`)."""
    root = Path(os.environ.get("PRUNELAB_CACHE", Path.home() / ".cache" / "prunelab")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def shared_data_dir() -> Path:
    """The offline evaluation data (`$PRUNELAB_DATA`, default `../shared/data` next to the repo).

    Searched upwards from the current directory and from this file so that both an editable
    install inside the repo and a run from the repo root find it.
    """
    env = os.environ.get("PRUNELAB_DATA")
    if env:
        return Path(env).expanduser()
    starts = [Path.cwd(), Path(__file__).resolve()]
    for start in starts:
        for parent in [start, *start.parents]:
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return Path.cwd().parent / "shared" / "data"
