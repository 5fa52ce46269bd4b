"""Running a study: plan the grid, skip finished cells, execute the rest, record every row.

The driver (this module, in the `prunelab study` process) is the only writer of the SQLite
store. Executors (anything that satisfies `Executor`) only run cells and hand back `CellResult`s:

- `local` with `jobs=1`: cells run in this process, in plan order, so a point's benchmarks
  reuse the model loaded for the previous cell;
- `local` with `jobs=N`: a spawn-started process pool of N workers;
- `ray`: each cell is a Ray task with `num_cpus`/`num_gpus` from the config's `resources`
  (`ray.init(address=...)`, or a local instance when no address is given; a Ray session that
  is already initialised — e.g. by a test — is used as is and left running).

Dependencies are one level deep: the benchmark/size/speed cells of a pruned point wait for
that point's `prune` cell when it has to run in this invocation; if it failed they are
recorded as failed without running. Resume: a cell runs unless its row is `done` under the
same hash; `running` rows (a killed study) and `failed` rows are redone from scratch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prunelab.errors import ConfigError
from prunelab.study.cells import Cell
from prunelab.study.config import StudyConfig, load_config, plan
from prunelab.study.results import CellResult, error_line
from prunelab.study.store import Store
from prunelab.study.worker import checkpoint_dir, execute_cell, set_progress_hook

EXECUTORS = ("local", "ray")


@dataclass
class StudySummary:
    """What one `run_study` call did."""

    out_dir: Path
    planned: int
    skipped: int  # already done before this call
    done: int
    failed: int
    wall_s: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (cell label, error)
    executor: str = "local"


# ---------------------------------------------------------------------------------------------
# Executors: submit(cell) -> handle; wait(handles) -> [(handle, result)] for finished ones
# ---------------------------------------------------------------------------------------------


class Executor(Protocol):
    """Runs cells somewhere and hands their results back to the driver, which alone writes the store."""

    name: str  # what the store records as the study's executor: local or ray
    slots: int  # cells it runs at once: the driver keeps this many in flight
    in_process: bool  # cells run in the driver's process (the progress bar can show a cell's own steps)

    def submit(self, cell: Cell) -> Hashable:
        """Start `cell` (or queue it); the handle identifies it in `wait`."""
        ...

    def wait(self, handles: list[Any]) -> list[tuple[Any, CellResult]]:
        """Block until at least one of `handles` finished; (handle, result) of every finished one."""
        ...

    def close(self) -> None:
        """Release workers (and a Ray instance this executor started)."""
        ...


class InlineExecutor:
    """Runs each cell in this process when waited on (sequential, shares the model cache)."""

    name = "local"
    slots = 1
    in_process = True

    def __init__(self, study_dir: Path, threads: int | None) -> None:
        self.study_dir = str(study_dir)
        self.threads = threads
        self._jobs: dict[int, Cell] = {}
        self._next = 0

    def submit(self, cell: Cell) -> int:
        self._next += 1
        self._jobs[self._next] = cell
        return self._next

    def wait(self, handles: list[Any]) -> list[tuple[Any, CellResult]]:
        handle = handles[0]
        cell = self._jobs.pop(handle)
        return [(handle, execute_cell(cell.payload(), self.study_dir, self.threads))]

    def close(self) -> None:
        pass


def _pool_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


class PoolExecutor:
    """N worker processes (spawned, so no forked torch state), N cells at a time."""

    name = "local"
    in_process = False

    def __init__(self, study_dir: Path, jobs: int, threads: int | None) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.slots = jobs
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        self.study_dir = str(study_dir)
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                        initializer=_pool_init, initargs=(self.threads,))

    def submit(self, cell: Cell) -> Any:
        return self.pool.submit(execute_cell, cell.payload(), self.study_dir, self.threads)

    def wait(self, handles: list[Any]) -> list[tuple[Any, CellResult]]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as fwait

        done, _ = fwait(handles, return_when=FIRST_COMPLETED)
        return [(fut, _result_or_crash(fut.result)) for fut in done]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _ray_entry(payload: dict[str, Any], study_dir: str, threads: int | None) -> CellResult:
    return execute_cell(payload, study_dir, threads)


class RayExecutor:
    """Cells as Ray tasks; results come back to the driver, which writes the store.

    `DIR` must be on a filesystem every Ray node sees (checkpoints and logs are written there).
    """

    name = "ray"
    in_process = False

    def __init__(self, study_dir: Path, address: str | None, resources: dict[str, float],
                 threads: int | None) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover
            raise ConfigError("--executor ray needs the 'ray' package: pip install 'ray[default]'") from exc
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = address or "a new local instance"
                raise ConfigError(f"cannot start/connect Ray at {where}: {error_line(exc)}") from exc
            self.started = True
        self.num_cpus = float(resources.get("num_cpus", 1))
        self.num_gpus = float(resources.get("num_gpus", 0))
        total_cpus = float(ray.cluster_resources().get("CPU", 1))
        self.slots = max(1, int(total_cpus // max(self.num_cpus, 1e-3)))
        if self.num_gpus > 0:
            total_gpus = float(ray.cluster_resources().get("GPU", 0))
            if total_gpus < self.num_gpus:
                raise ConfigError(f"resources.num_gpus={self.num_gpus} but the Ray cluster has {total_gpus} GPUs")
            self.slots = min(self.slots, max(1, int(total_gpus // self.num_gpus)))
        self.threads = threads or max(1, int(self.num_cpus))
        self.study_dir = str(study_dir)
        self.remote = ray.remote(_ray_entry).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)

    def submit(self, cell: Cell) -> Any:
        return self.remote.remote(cell.payload(), self.study_dir, self.threads)

    def wait(self, handles: list[Any]) -> list[tuple[Any, CellResult]]:
        ready, _ = self.ray.wait(handles, num_returns=1)
        return [(ref, _result_or_crash(lambda ref=ref: self.ray.get(ref))) for ref in ready]

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _result_or_crash(get: Callable[[], CellResult]) -> CellResult:
    """The cell's result, or a failed one when its worker process died (OOM kill, segfault)."""
    try:
        return get()
    except Exception as exc:
        return CellResult.failure(error_line(exc, "worker crashed: "))


def make_executor(kind: str, study_dir: Path, *, jobs: int = 1, address: str | None = None,
                  resources: dict[str, float] | None = None, threads: int | None = None) -> Executor:
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor '{kind}': choose local or ray")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: need at least 1")
    if kind == "ray":
        return RayExecutor(study_dir, address, resources or {}, threads)
    if address:
        raise ConfigError("--address is only for --executor ray")
    if jobs == 1:
        return InlineExecutor(study_dir, threads)
    return PoolExecutor(study_dir, jobs, threads)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _study_lock(out_dir: Path) -> Iterator[None]:
    """One study per directory at a time (the lock dies with the process, even on SIGKILL)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / ".study.lock", "w")  # noqa: SIM115
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(f"another study is running in {out_dir}: wait for it or use another --out") from exc
        yield
    finally:
        fh.close()


def _clean_stale(out_dir: Path) -> None:
    """Remove temporaries a killed study left behind (atomic writes that never got renamed)."""
    for sub in ("checkpoints", "sparse", "analysis"):
        d = out_dir / sub
        if d.is_dir():
            for p in d.glob(".*.tmp-*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            for p in d.glob(".*.old-*"):
                shutil.rmtree(p, ignore_errors=True)


class _Progress:
    """Rich progress: one bar for the grid, one line for the running cell(s)."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(file=sys.stderr)
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, redirect_stdout=False, redirect_stderr=False,
        )
        self.grid = self.progress.add_task("study", total=total, completed=completed)
        self.current = self.progress.add_task("", total=None)
        self.running: dict[str, str] = {}
        self.progress.start()

    def started(self, cell: Cell) -> None:
        if self.enabled:
            self.running[cell.hash] = cell.label
            self._update_current()

    def finished(self, cell: Cell, result: CellResult) -> None:
        if not self.enabled:
            return
        self.running.pop(cell.hash, None)
        self.progress.advance(self.grid)
        wall = result.wall_s
        tag = "[green]done[/]" if result.status == "done" else f"[red]failed[/] {result.error or ''}"
        self.progress.console.print(f"  {cell.label}: {tag}" + (f" ({wall:.1f} s)" if wall else ""),
                                    highlight=False)
        self._update_current()

    def _update_current(self) -> None:
        self.progress.update(self.current, description=f"[cyan]running:[/] {self._names()}", total=None,
                             completed=0)

    def cell_progress(self, message: str, done: int, total: int) -> None:
        """Progress reported from inside the running cell (in-process executor only)."""
        if self.enabled:
            self.progress.update(self.current, description=f"[cyan]running:[/] {self._names()} [dim]{message}[/]",
                                 total=max(total, 1), completed=done)

    def _names(self) -> str:
        return ", ".join(self.running.values()) or "-"

    def stop(self) -> None:
        if self.enabled:
            self.progress.update(self.current, visible=False)
            self.progress.stop()


def run_study(
    config: StudyConfig | str | os.PathLike[str] | dict[str, Any] | None,
    out_dir: str | os.PathLike[str],
    *,
    preset: str | None = None,
    executor: str = "local",
    jobs: int = 1,
    address: str | None = None,
    progress: bool = True,
) -> StudySummary:
    """Run (or resume) a study into `out_dir`; returns what happened. See module docstring."""
    t0 = time.perf_counter()
    if not isinstance(config, StudyConfig):
        config = load_config(config, preset=preset)
    elif preset and preset != config.preset:
        raise ConfigError("pass the preset to load_config, not together with a loaded StudyConfig")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor '{executor}': choose local or ray")
    out = Path(out_dir)
    with _study_lock(out):
        _clean_stale(out)
        cells = plan(config)
        with Store(out) as store:
            store.set_meta(config=config.to_dict(), plan=[c.hash for c in cells], executor=executor,
                           started_at=time.time())
            status = store.status_of([c.hash for c in cells])
            todo = [c for c in cells if status.get(c.hash) != "done"]
            skipped = len(cells) - len(todo)
            summary = StudySummary(out, len(cells), skipped, 0, 0, 0.0, executor=executor)
            if todo:
                ex = make_executor(executor, out, jobs=jobs, address=address, resources=config.resources,
                                   threads=config.threads)
                try:
                    _drive(config, cells, todo, store, ex, out, summary, progress)
                finally:
                    ex.close()
            store.set_meta(finished_at=time.time())
    summary.wall_s = time.perf_counter() - t0
    return summary


def _drive(config: StudyConfig, cells: list[Cell], todo: list[Cell], store: Store, ex: Executor, out: Path,
           summary: StudySummary, show: bool) -> None:
    pending_prunes = {c.point_hash for c in todo if c.kind == "prune"}
    waiting: dict[str, list[Cell]] = {}
    ready: deque[Cell] = deque()
    for cell in todo:
        if cell.kind in ("bench", "size", "speed") and not cell.is_dense and cell.point_hash in pending_prunes:
            waiting.setdefault(cell.point_hash, []).append(cell)
        else:
            ready.append(cell)
    # Cells of each pruned point still to finish in this call: the checkpoint can go afterwards.
    open_cells: dict[str, int] = {}
    for cell in todo:
        if not cell.is_dense and cell.kind != "analyze":
            open_cells[cell.point_hash] = open_cells.get(cell.point_hash, 0) + 1
    point_cells: dict[str, Cell] = {c.point_hash: c for c in cells if c.kind == "prune"}

    bar = _Progress(show, len(cells), summary.skipped)
    if ex.in_process:
        set_progress_hook(bar.cell_progress if show else None)
    inflight: dict[Any, Cell] = {}

    def record(cell: Cell, result: CellResult) -> None:
        store.finish(cell, result)
        if result.status == "done":
            summary.done += 1
        else:
            summary.failed += 1
            summary.failures.append((cell.label, str(result.error)))
        bar.finished(cell, result)
        if not cell.is_dense and cell.kind != "analyze":
            open_cells[cell.point_hash] -= 1
            if open_cells[cell.point_hash] == 0 and not config.keep_checkpoints:
                shutil.rmtree(checkpoint_dir(point_cells.get(cell.point_hash, cell), out), ignore_errors=True)

    try:
        while ready or inflight:
            while ready and len(inflight) < ex.slots:
                cell = ready.popleft()
                store.mark_running(cell, pid=os.getpid() if ex.in_process else None)
                bar.started(cell)
                inflight[ex.submit(cell)] = cell
            for handle, result in ex.wait(list(inflight)):
                cell = inflight.pop(handle)
                record(cell, result)
                if cell.kind == "prune":
                    dependents = waiting.pop(cell.point_hash, [])
                    if result.status == "done":
                        ready.extendleft(reversed(dependents))  # run them next: the checkpoint is warm
                    else:
                        for dep in dependents:
                            store.mark_running(dep)
                            record(dep, CellResult.failure(f"prune failed: {result.error}", started_at=time.time(),
                                                           wall_s=0.0))
    finally:
        set_progress_hook(None)
        bar.stop()
