"""Continuous batching: one thread runs the model step after step over every running request.

Why per step and not per request: a decode step of one sequence streams all the weights for one token;
the batched step (`BatchDecoder`) streams them once for every sequence in the batch, so throughput grows
with the number of clients. A request joins the batch at the next step (its prompt fed in chunks, within
a token budget per step, decode tokens first) and leaves when it finishes, is cancelled (its client went
away) or runs out of time; its slot is free for the next waiting request at once.

Requests wait in a bounded queue (`submit` raises `QueueFull` beyond `max_queue`: HTTP 429). Results go
back to the asyncio side through `loop.call_soon_threadsafe`, as ("token", id) ... ("done", reason) events.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from prunelab.errors import PrunelabError
from prunelab.serve.model import Sampler, ServedModel

log = logging.getLogger("prunelab.serve")


class QueueFull(PrunelabError):
    """The waiting queue is at its limit (HTTP 429)."""


@dataclass
class Job:
    """One request inside the scheduler."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    deadline: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    id: int = 0
    slot: int = -1
    fed: int = 0  # prompt tokens fed so far
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    ignore_eos: bool = False  # vLLM's / llama.cpp's extension: run to max_tokens (benchmarks)
    submitted: float = field(default_factory=time.monotonic)

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    @property
    def position(self) -> int:
        return self.fed + len(self.generated) - 1


@dataclass
class Stats:
    """Counters for /metrics (read by the event loop, written by the scheduler thread; ints are atomic)."""

    steps: int = 0
    step_entries: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished: collections.Counter = field(default_factory=collections.Counter)


class Scheduler:
    """The batching thread. `submit` (from the event loop) enqueues; `cancel` marks a job to drop."""

    def __init__(self, served: ServedModel, *, max_batch: int = 16, max_queue: int = 64,
                 token_budget: int = 64, step_delay_s: float = 0.0, threads: int | None = None) -> None:
        self.served, self.max_batch, self.max_queue = served, max_batch, max_queue
        self.token_budget = max(token_budget, max_batch)
        self.batcher = served.batcher(max_batch, self.token_budget)
        self.step_delay_s = step_delay_s  # tests: slow steps down to observe a full queue
        self.threads = threads
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}  # slot -> job
        self.cond = threading.Condition()
        self.stats = Stats()
        self.ids = itertools.count(1)
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="prunelab-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=10)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.running)

    def submit(self, job: Job) -> Job:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"server busy: {len(self.waiting)} requests already waiting (limit {self.max_queue}); "
                                "retry later")
            job.id = next(self.ids)
            self.waiting.append(job)
            self.cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop `job` at the next step (its client disconnected or timed out)."""
        with self.cond:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
            self.cond.notify_all()

    # ------------------------------------------------------------------ the thread
    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        self.running.pop(job.slot, None)
        self.stats.finished[reason] += 1
        job.emit("error", error) if error else job.emit("done", reason)

    def _admit(self) -> None:
        free = [s for s in range(self.max_batch) if s not in self.running]
        while free and self.waiting:
            job = self.waiting.popleft()
            job.slot = free.pop(0)
            self.running[job.slot] = job

    def _plan(self) -> tuple[list[int], list[int], list[int], list[bool], list[Job]]:
        """This step's entries: every decoding job's last token, then prompt chunks within the budget."""
        toks: list[int] = []
        slots: list[int] = []
        poss: list[int] = []
        want: list[bool] = []
        wanted: list[Job] = []
        for job in self.running.values():
            if job.fed == len(job.prompt):
                toks.append(job.generated[-1])
                slots.append(job.slot)
                poss.append(job.position)
                want.append(True)
                wanted.append(job)
        budget = self.token_budget - len(toks)
        for job in self.running.values():
            if job.fed < len(job.prompt) and budget > 0:
                n = min(budget, len(job.prompt) - job.fed)
                toks += job.prompt[job.fed:job.fed + n]
                slots += [job.slot] * n
                poss += list(range(job.fed, job.fed + n))
                done = job.fed + n == len(job.prompt)
                want += [False] * (n - 1) + [done]
                if done:
                    wanted.append(job)
                job.fed += n
                budget -= n
        # logits come back in entry order: order `wanted` by each job's wanted entry
        order = [slots[e] for e in range(len(toks)) if want[e]]
        by_slot = {j.slot: j for j in wanted}
        return toks, slots, poss, want, [by_slot[s] for s in order]

    def _run(self) -> None:
        if self.threads:  # numba's thread count is per calling thread
            import numba

            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        while True:
            with self.cond:
                while not self._stop and not self.running and not self.waiting:
                    self.cond.wait(timeout=1.0)
                if self._stop:
                    for job in list(self.running.values()) + list(self.waiting):
                        job.emit("error", "server shutting down")
                    return
                now = time.monotonic()
                for job in [j for j in self.waiting if j.deadline < now]:
                    self.waiting.remove(job)
                    self.stats.finished["timeout"] += 1
                    job.emit("error", "timeout")
                self._admit()
                for job in list(self.running.values()):
                    if job.cancelled:
                        self._finish(job, "cancelled")
                    elif job.deadline < now:
                        self._finish(job, "timeout", "timeout")
                if not self.running:
                    continue
                toks, slots, poss, want, jobs = self._plan()
            try:
                logits = self.batcher.step(toks, slots, poss, want)
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the server
                log.error("step failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                with self.cond:
                    for job in list(self.running.values()):
                        self._finish(job, "error", f"internal error: {exc}")
                continue
            self.stats.steps += 1
            self.stats.step_entries += len(toks)
            self.stats.prompt_tokens += len(toks) - sum(1 for j in jobs if j.generated)
            with self.cond:
                for row, job in zip(logits, jobs, strict=True):
                    if job.cancelled:
                        continue
                    tok = job.sampler(row)
                    job.generated.append(tok)
                    self.stats.generated_tokens += 1
                    job.emit("token", tok)
                    if tok in self.served.eos_ids and not job.ignore_eos:
                        self._finish(job, "stop")
                    elif len(job.generated) >= job.max_tokens:
                        self._finish(job, "length")
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
