"""What one cell hands back, typed, so the worker, the store and the report agree on field names.

The worker builds a `CellResult`; executors carry it back to the driver (it pickles); the
store writes it with `to_row()` and reads it back with `from_row()`; the report reads its
typed fields and the per-kind views (`bench_outcome()`, `speed_outcome()`, ...) instead of
probing dictionaries. `metrics` stays the kind's full payload (an `EvalResult` dict, the prune
report, `bench_model`'s output...) because the CSV export and `prunelab results` show all of
it; the views below are the one place that knows where the headline numbers sit in it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

CellStatus = Literal["running", "done", "failed"]
DECODE_METRIC = "decode_ms_per_token"
PREFILL_METRIC = "prefill_tokens_per_s"


def finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number (bools and NaN are not measurements)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def error_line(exc: BaseException, prefix: str = "") -> str:
    """`Type: first line of the message`, at most 500 characters: what a failed row records."""
    first = (str(exc).splitlines() or [""])[0]
    return f"{prefix}{type(exc).__name__}: {first}"[:500]


@dataclass(frozen=True)
class Sizes:
    """Bytes on disk a cell measured.

    prune cells: `checkpoint_bytes` (the pruned HF checkpoint). size cells: the pruned HF
    checkpoint (`dense_bytes`, dense tensors holding zeros) against the sparse format
    (`sparse_bytes`) and the information bounds, plus how long writing the format took.
    """

    checkpoint_bytes: int | None = None
    dense_bytes: int | None = None
    sparse_bytes: int | None = None
    sparse_dir_bytes: int | None = None
    entropy_bound_bytes: float | None = None
    bitmask_bound_bytes: float | None = None
    tensor_dense_bytes: int | None = None
    tensor_stored_bytes: int | None = None
    save_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The measured values only (what `sizes_json` holds)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Sizes:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


@dataclass(frozen=True)
class BenchOutcome:
    """The headline of a bench cell: what tables and plots show of its `EvalResult`."""

    value: float | None  # None when not applicable or not a finite number
    primary: str | None
    higher_is_better: bool | None
    applicable: bool
    note: str
    interval_data: dict[str, Any] | None = None  # the units an interval is drawn from (report.intervals)
    majority: float | None = None  # accuracy of always answering the dev set's majority class
    chance: float | None = None  # accuracy of guessing uniformly (1 / number of classes)


@dataclass(frozen=True)
class SpeedOutcome:
    """Dense and sparse speed of a speed cell, both timed in the same cell.

    Decoders: decode latency in ms/token (lower is better). Encoders do not decode: prefill
    throughput in tokens/s (higher is better) instead.
    """

    metric: str  # DECODE_METRIC or PREFILL_METRIC
    dense: float | None
    sparse: float | None
    dense_runs: tuple[float, ...] = ()  # the same metric per timed repeat (its spread)
    sparse_runs: tuple[float, ...] = ()
    memory_bytes: float | None = None  # sparse model: RSS growth when measured, else bytes of its weights
    dense_memory_bytes: float | None = None  # the same measure for the dense model
    memory_what: str = ""

    @property
    def is_decode(self) -> bool:
        return self.metric == DECODE_METRIC


@dataclass
class CellResult:
    """One cell's outcome: status, what it measured, and where/how long it ran."""

    status: CellStatus
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    sizes: Sizes = field(default_factory=Sizes)
    started_at: float | None = None
    finished_at: float | None = None
    wall_s: float | None = None
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    log_path: str | None = None
    host: str | None = None
    pid: int | None = None

    @classmethod
    def failure(cls, error: str, **kwargs: Any) -> CellResult:
        """A failed cell that never ran (crashed worker, failed dependency)."""
        return cls("failed", error=error, finished_at=time.time(), **kwargs)

    # -- the store's columns ----------------------------------------------------------------
    def to_row(self) -> dict[str, Any]:
        """Column name -> SQLite value, with the JSON columns encoded."""
        return {
            "status": self.status, "metrics_json": json.dumps(self.metrics, sort_keys=True, default=str),
            "error": self.error, "started_at": self.started_at,
            "finished_at": self.finished_at if self.finished_at is not None else time.time(),
            "wall_s": self.wall_s, "cpu_s": self.cpu_s, "peak_rss_bytes": self.peak_rss_bytes,
            "sizes_json": json.dumps(self.sizes.to_dict(), sort_keys=True, default=str),
            "versions_json": json.dumps(self.versions, sort_keys=True), "log_path": self.log_path,
            "host": self.host, "pid": self.pid,
        }

    @staticmethod
    def row_fields(d: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments from a stored row (column name -> value), JSON columns decoded."""
        return {
            "status": d["status"], "error": d["error"],
            "metrics": json.loads(d["metrics_json"]) if d["metrics_json"] else {},
            "sizes": Sizes.from_dict(json.loads(d["sizes_json"]) if d["sizes_json"] else {}),
            "started_at": d["started_at"], "finished_at": d["finished_at"], "wall_s": d["wall_s"],
            "cpu_s": d["cpu_s"], "peak_rss_bytes": d["peak_rss_bytes"],
            "versions": json.loads(d["versions_json"]) if d["versions_json"] else {},
            "log_path": d["log_path"], "host": d["host"], "pid": d["pid"],
        }

    @classmethod
    def from_row(cls, d: Mapping[str, Any]) -> CellResult:
        return cls(**cls.row_fields(d))

    # -- typed views of the kind's payload -----------------------------------------------------
    @property
    def achieved_sparsity(self) -> float | None:
        """prune cells: the fraction of prunable weights that are zero after pruning."""
        return finite(self.metrics.get("achieved_sparsity_prunable"))

    @property
    def analysis_files(self) -> dict[str, str]:
        """analyze cells: output file name -> path relative to the study directory."""
        return dict(self.metrics.get("files") or {})

    @property
    def model_family(self) -> str | None:
        """analyze and bench cells: encoder, decoder or encoder-decoder."""
        return self.metrics.get("family")

    def bench_outcome(self) -> BenchOutcome:
        """bench cells: the `EvalResult` headline (value, primary metric, direction, applicability)."""
        m = self.metrics
        applicable = m.get("status") != "not_applicable"
        hib = m.get("higher_is_better")
        details = m.get("details") or {}
        chance = 1.0 / details["num_classes"] if details.get("num_classes") else finite(
            (m.get("metrics") or {}).get("mean_chance"))
        return BenchOutcome(value=finite(m.get("value")) if applicable else None, primary=m.get("primary"),
                            higher_is_better=None if hib is None else bool(hib), applicable=applicable,
                            note=str(m.get("note") or ""), interval_data=_interval_data(m),
                            majority=finite(details.get("majority_baseline")), chance=chance)

    def speed_outcome(self) -> SpeedOutcome:
        """speed cells: from `runtime.bench_model`'s `speed` section (decode, or prefill for encoders)."""
        speed = self.metrics.get("speed") or {}
        dense, sparse = speed.get("dense") or {}, speed.get("sparse") or {}
        metric = DECODE_METRIC if finite(dense.get(DECODE_METRIC)) is not None else PREFILL_METRIC
        n_prefill = finite((self.metrics.get("settings") or {}).get("prefill_tokens"))
        memory = self.metrics.get("memory") or {}
        weights = memory.get("weights_bytes") or {}
        rss = finite(memory.get("sparse_rss_delta_bytes"))
        dense_mem = finite(memory.get("dense_rss_delta_bytes")) if rss is not None else finite(weights.get("dense"))
        return SpeedOutcome(metric=metric, dense=finite(dense.get(metric)), sparse=finite(sparse.get(metric)),
                            dense_runs=_runs(dense, metric, n_prefill), sparse_runs=_runs(sparse, metric, n_prefill),
                            memory_bytes=rss if rss is not None else finite(weights.get("sparse")),
                            dense_memory_bytes=dense_mem,
                            memory_what="RSS growth after load" if rss is not None else
                            ("weights in memory" if finite(weights.get("sparse")) is not None else ""))


def _runs(variant: Mapping[str, Any], metric: str, n_prefill: float | None) -> tuple[float, ...]:
    """Per-repeat values of `metric` from `bench_model`'s raw timings (ms/token, or tokens/s)."""
    if metric == DECODE_METRIC:
        return tuple(1e3 * x for x in variant.get("decode_s_per_token_runs") or [] if finite(x) is not None)
    return tuple(n_prefill / x for x in variant.get("prefill_s_runs") or [] if finite(x) and n_prefill)


def _interval_data(m: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the bench recorded for an interval; for lm-eval's zero-shot mean, its per-task standard errors."""
    details = m.get("details") or {}
    if details.get("interval_data"):
        return dict(details["interval_data"])
    tasks = details.get("tasks")
    if m.get("primary") == "mean_acc" and isinstance(tasks, dict) and tasks:
        errs = [finite(t.get("acc_stderr")) for t in tasks.values() if isinstance(t, dict)]
        if errs and None not in errs and finite(m.get("value")) is not None:
            return {"kind": "normal_mean", "value": m.get("value"), "stderr": errs}
    return None
