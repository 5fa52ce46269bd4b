"""GLUE SST-2 and MRPC readers for the offline TSV files.

Both files are read with `csv.QUOTE_NONE`: SST-2 sentences contain no quote characters but
MRPC strings contain unescaped `"`, which the default dialect would swallow across rows.
MRPC files start with a UTF-8 BOM (`utf-8-sig`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunelab.errors import DataError
from prunelab.io import file_sha256
from prunelab.paths import shared_data_dir

TASKS = {
    # task: (directory name, column of sentence 1, column of sentence 2 or None, label column)
    "sst2": ("glue-sst2", "sentence", None, "label"),
    "mrpc": ("glue-mrpc", "#1 String", "#2 String", "Quality"),
}


@dataclass
class GlueSplit:
    """One split of a GLUE task: sentences (pairs for MRPC), integer labels, provenance."""

    task: str
    split: str
    texts_a: list[str]
    texts_b: list[str] | None
    labels: np.ndarray
    path: str
    sha256: str

    def __len__(self) -> int:
        return len(self.texts_a)

    def subset(self, index: np.ndarray | list[int]) -> GlueSplit:
        idx = [int(i) for i in index]
        return GlueSplit(
            task=self.task, split=self.split, texts_a=[self.texts_a[i] for i in idx],
            texts_b=None if self.texts_b is None else [self.texts_b[i] for i in idx],
            labels=self.labels[idx], path=self.path, sha256=self.sha256,
        )


def glue_path(task: str, split: str, data: str | None = None) -> Path:
    """`<data>/<split>.tsv` where `data` is a task directory (default ../shared/data/glue-<task>)."""
    if task not in TASKS:
        raise DataError(f"unknown GLUE task '{task}': choose one of {', '.join(TASKS)}")
    directory = Path(data) if data is not None else shared_data_dir() / TASKS[task][0]
    if directory.is_file():  # a single file was given: use it for both splits' directory siblings
        directory = directory.parent
    return directory / f"{split}.tsv"


_CACHE: dict[tuple[str, str, str, int, int], GlueSplit] = {}


def read_glue(task: str, split: str, data: str | None = None) -> GlueSplit:
    """Read `train` or `dev` of `task` ("sst2" or "mrpc"), failing with one line on a bad file.

    Parsed splits are cached per (file, size, mtime): a study evaluates many models on the
    same 67 k SST-2 training rows. Treat the returned split as read-only (`subset` copies).
    """
    path = glue_path(task, split, data)
    if not path.is_file():
        raise DataError(
            f"{task} {split} file not found: {path}; put ../shared/data beside the repo, set $PRUNELAB_DATA, "
            "or pass --data DIR"
        )
    stat = path.stat()
    key = (task, split, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = _parse(task, split, path)
    return _CACHE[key]


def _parse(task: str, split: str, path: Path) -> GlueSplit:
    _, col_a, col_b, col_label = TASKS[task]
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"dataset {path} is empty: expected a header and at least one row")
        header = [h.strip() for h in header]
        needed = [c for c in (col_a, col_b, col_label) if c is not None]
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(f"{path} lacks column(s) {', '.join(missing)}: is it the GLUE {task} {split}.tsv?")
        ia, il = header.index(col_a), header.index(col_label)
        ib = header.index(col_b) if col_b is not None else None
        texts_a: list[str] = []
        texts_b: list[str] = []
        labels: list[int] = []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise DataError(f"{path}:{lineno} has {len(row)} columns, expected {len(header)}")
            try:
                labels.append(int(row[il]))
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: label '{row[il]}' is not an integer") from exc
            texts_a.append(row[ia].strip())
            if ib is not None:
                texts_b.append(row[ib].strip())
    if not labels:
        raise DataError(f"dataset {path} is empty: expected at least one labelled row")
    return GlueSplit(
        task=task, split=split, texts_a=texts_a, texts_b=texts_b if col_b is not None else None,
        labels=np.asarray(labels, dtype=np.int64), path=str(path), sha256=file_sha256(path),
    )
