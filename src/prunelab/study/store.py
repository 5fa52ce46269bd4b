"""The results store: one SQLite row per cell, keyed by the cell's configuration hash.

SQLite in WAL mode so that `prunelab results` can read while a study writes; every write is
one transaction, so a SIGKILL leaves either the old row or the new one, never half of each.
Only the study driver writes (executors send results back to it), so there is one writer.

Row life cycle: `running` (dispatched; started_at set) → `done` | `failed`. A row left at
`running` by a killed study, or a missing row, means "redo"; `done` rows are never touched
again while their hash is planned.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab.errors import ConfigError
from prunelab.study.cells import Cell
from prunelab.study.results import CellResult

STORE_NAME = "results.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    method_label TEXT NOT NULL,
    pattern TEXT NOT NULL,
    sparsity REAL NOT NULL,
    bench TEXT NOT NULL,
    point_hash TEXT NOT NULL,
    config_json TEXT NOT NULL,
    status TEXT NOT NULL,
    metrics_json TEXT,
    error TEXT,
    started_at REAL,
    finished_at REAL,
    wall_s REAL,
    cpu_s REAL,
    peak_rss_bytes INTEGER,
    sizes_json TEXT,
    versions_json TEXT,
    log_path TEXT,
    host TEXT,
    pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS cells_status ON cells(status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

COLUMNS = ("hash", "kind", "model", "method", "method_label", "pattern", "sparsity", "bench", "point_hash",
           "config_json", "status", "metrics_json", "error", "started_at", "finished_at", "wall_s", "cpu_s",
           "peak_rss_bytes", "sizes_json", "versions_json", "log_path", "host", "pid", "attempts")
_IDENTITY = ("hash", "kind", "model", "method", "method_label", "pattern", "sparsity", "bench", "point_hash")
_RESULT_COLUMNS = ("status", "metrics_json", "error", "started_at", "finished_at", "wall_s", "cpu_s", "peak_rss_bytes",
                   "sizes_json", "versions_json", "log_path", "host", "pid")

_IDENTITY_SQL = ", ".join((*_IDENTITY, "config_json"))
_IDENTITY_MARKS = ", ".join("?" * (len(_IDENTITY) + 1))
_KEEP_IF_NULL = ("started_at", "host", "pid")  # set when dispatched; a result without them keeps those
_RESULT_SET = ", ".join(f"{k} = COALESCE(?, {k})" if k in _KEEP_IF_NULL else f"{k} = ?" for k in _RESULT_COLUMNS)


def _identity_values(cell: Cell) -> tuple[Any, ...]:
    """The identity columns of `cell` (in `_IDENTITY` order) plus its canonical config JSON."""
    return (cell.hash, cell.kind, cell.model, cell.method, cell.method_label, cell.pattern, cell.sparsity,
            cell.bench, cell.point_hash, json.dumps(cell.to_dict(), sort_keys=True))


@dataclass(kw_only=True)
class Row(CellResult):
    """One stored cell: the cell's identity columns plus its (typed) result."""

    hash: str
    kind: str
    model: str
    method: str
    method_label: str
    pattern: str
    sparsity: float
    bench: str
    point_hash: str
    config: dict[str, Any]
    attempts: int

    @property
    def cell(self) -> Cell:
        return Cell.from_dict(self.config)

    @classmethod
    def from_row(cls, d: Mapping[str, Any]) -> Row:
        identity = {k: d[k] for k in _IDENTITY}
        return cls(**identity, config=json.loads(d["config_json"]), attempts=d["attempts"],
                   **CellResult.row_fields(d))

    def flat(self) -> dict[str, Any]:
        """A flat dict for tables / CSV: columns plus the headline metrics."""
        d = {k: getattr(self, k) for k in ("hash", "kind", "model", "method", "method_label", "pattern", "sparsity",
                                            "bench", "status", "error", "wall_s", "cpu_s", "peak_rss_bytes",
                                            "started_at", "finished_at", "attempts")}
        m = self.metrics
        d["value"] = m.get("value")
        d["primary"] = m.get("primary")
        for key, val in (m.get("metrics") or {}).items():
            if isinstance(val, (int, float)) or val is None:
                d[f"metric.{key}"] = val
        for key, val in m.items():
            skip = key in ("metrics", "value", "primary") or isinstance(val, bool)
            if not skip and isinstance(val, (int, float)):
                d[f"metric.{key}"] = val
        for key, val in sorted(self.sizes.to_dict().items()):
            if isinstance(val, (int, float)):
                d[f"size.{key}"] = val
        d["versions"] = json.dumps(self.versions, sort_keys=True) if self.versions else ""
        d["config_json"] = json.dumps(self.config, sort_keys=True)
        return d


class Store:
    """`DIR/results.sqlite`. Open with `Store(dir)`; use as a context manager to close."""

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = True) -> None:
        self.dir = Path(directory)
        self.path = self.dir / STORE_NAME
        if not create and not self.path.is_file():
            raise ConfigError(f"no results store at {self.path}: run `prunelab study --out {self.dir}` first")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- meta ----------------------------------------------------------------------------
    def set_meta(self, **values: Any) -> None:
        with self.transaction() as c:
            for key, value in values.items():
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # -- rows ----------------------------------------------------------------------------
    def status_of(self, hashes: list[str] | None = None) -> dict[str, str]:
        rows = self.conn.execute("SELECT hash, status FROM cells").fetchall()
        wanted = set(hashes) if hashes is not None else None
        return {h: s for h, s in rows if wanted is None or h in wanted}

    def mark_running(self, cell: Cell, *, host: str | None = None, pid: int | None = None) -> None:
        """Record that a cell was dispatched (replaces a stale running/failed row of the same hash)."""
        now = time.time()
        with self.transaction() as c:
            prev = c.execute("SELECT attempts FROM cells WHERE hash = ?", (cell.hash,)).fetchone()
            attempts = (prev[0] if prev else 0) + 1
            c.execute(
                f"INSERT OR REPLACE INTO cells({_IDENTITY_SQL}, status, started_at, host, pid, attempts) "
                f"VALUES ({_IDENTITY_MARKS}, 'running', ?, ?, ?, ?)",
                (*_identity_values(cell), now, host, pid, attempts),
            )

    def finish(self, cell: Cell, result: CellResult) -> None:
        """Write a cell's outcome in one transaction (status done/failed plus everything measured).

        started_at, host and pid keep the values `mark_running` recorded unless the result has its own.
        """
        values = result.to_row()
        with self.transaction() as c:
            exists = c.execute("SELECT 1 FROM cells WHERE hash = ?", (cell.hash,)).fetchone()
            if not exists:
                c.execute(f"INSERT INTO cells({_IDENTITY_SQL}, status, attempts) VALUES ({_IDENTITY_MARKS}, "
                          "'running', 1)", _identity_values(cell))
            c.execute(f"UPDATE cells SET {_RESULT_SET} WHERE hash = ?",
                      (*(values[k] for k in _RESULT_COLUMNS), cell.hash))

    def rows(self, hashes: list[str] | None = None, *, status: str | None = None) -> list[Row]:
        """Rows (in `hashes` order when given, else insertion order)."""
        query = f"SELECT {', '.join(COLUMNS)} FROM cells"
        args: tuple[Any, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            args = (status,)
        found = [Row.from_row(dict(zip(COLUMNS, r, strict=True)))
                 for r in self.conn.execute(query + " ORDER BY rowid", args).fetchall()]
        if hashes is None:
            return found
        by_hash = {r.hash: r for r in found}
        return [by_hash[h] for h in hashes if h in by_hash]

    def plan_rows(self) -> list[Row]:
        """Rows of the last planned study (all rows if no plan was recorded)."""
        planned = self.get_meta("plan")
        return self.rows(planned) if planned else self.rows()


def export_csv(rows: list[Row], path: str | os.PathLike[str]) -> Path:
    """Write rows as CSV atomically (union of flat columns, stable order)."""
    import csv

    from prunelab.io import atomic_file

    flats = [r.flat() for r in rows]
    columns: list[str] = []
    for f in flats:
        for k in f:
            if k not in columns:
                columns.append(k)
    with atomic_file(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for f in flats:
            writer.writerow(f)
    return Path(path)
