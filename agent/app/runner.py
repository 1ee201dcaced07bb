"""The daemon-wide decode runner: every model call, in priority order, on a few worker threads.

One runner serves live utterances, `/ws/asr` sessions, uploads and (later) speaker and emotion
models alike, so that the daemon as a whole never runs more model calls at once than it has
workers (cores), finals go first wherever they come from, and best-effort partials are shed
first when there is more work than cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.analysis import Priority
from agent.errors import AgentError

log = logging.getLogger(__name__)

T = TypeVar("T")
_SHED = object()
RECENT = 200  # job durations kept for the Retry-After estimate and stats


class BusyError(AgentError):
    """Too much queued work of one class: come back later (HTTP 503 with Retry-After)."""

    stage = "runner"
    default_status = 503


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable[..., Any] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    kind: str = field(compare=False)
    queued: float = field(compare=False, default_factory=time.monotonic)


class DecodeRunner:
    """Runs synchronous model calls in `workers` threads; lower `Priority` first."""

    def __init__(self, workers: int | None = None, *, upload_limit: int = 32) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.upload_limit = upload_limit
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        self._heap: list[_Job] = []
        self._seq = itertools.count()
        self._running = 0
        self._running_by: Counter[int] = Counter()
        self._admitted: Counter[str] = Counter()
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._closed = False
        # Counters for /metrics and /api/stats.
        self.completed: Counter[tuple[str, str]] = Counter()  # (kind, priority) -> calls
        self.shed: Counter[str] = Counter()  # kind -> partials shed
        self.rejected: Counter[str] = Counter()  # admission class -> refused requests
        self.failed: Counter[str] = Counter()
        self.busy_s = 0.0  # worker-seconds spent in model calls
        self.wait_s: dict[str, deque[float]] = {p.name.lower(): deque(maxlen=RECENT)
                                                 for p in Priority}

    # -- submitting -------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, priority: Priority = Priority.FINAL,
                  kind: str = "asr") -> T:
        """Run `fn(*args)` in a worker when its turn comes; its result or its exception."""
        result = await self._submit(fn, args, priority, kind)
        assert result is not _SHED  # only partials are shed
        return result

    async def partial(self, fn: Callable[..., T], *args: Any, kind: str = "asr") -> T | None:
        """A best-effort call: None when shed because more important work is waiting."""
        if self._important_waiting() or (self._running >= self.workers and self._heap):
            self.shed[kind] += 1
            return None
        result = await self._submit(fn, args, Priority.PARTIAL, kind)
        return None if result is _SHED else result

    async def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], priority: Priority,
                      kind: str) -> Any:
        if self._closed:
            raise BusyError("stopping", "the daemon is stopping", status=503)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        job = _Job(int(priority), next(self._seq), fn, args, fut, kind)
        heapq.heappush(self._heap, job)
        if priority < Priority.PARTIAL and self._running >= self.workers:
            self._shed_waiting_partials()
        self._dispatch()
        # A caller cancelled while its job waits takes the job with it (the future is done,
        # so dispatch skips it); a job already running finishes in its thread, unread.
        return await fut

    @contextlib.asynccontextmanager
    async def admit(self, what: str = "upload") -> AsyncIterator[None]:
        """Bound the requests of one class queued at once; past the limit, BusyError (503)."""
        if self._admitted[what] >= self.upload_limit:
            self.rejected[what] += 1
            retry = self.retry_after_s()
            raise BusyError("busy", f"{self._admitted[what]} {what} requests are already "
                            f"queued (runtime.upload_queue = {self.upload_limit}); retry in "
                            f"{retry:.0f} s", retry_after_s=retry)
        self._admitted[what] += 1
        try:
            yield
        finally:
            self._admitted[what] -= 1

    def retry_after_s(self) -> float:
        """A fair guess at when queued work will have drained: whole seconds, at least 1."""
        per_job = sorted(self._recent)[len(self._recent) // 2] if self._recent else 0.5
        backlog = len(self._heap) + self._running + sum(self._admitted.values())
        return float(max(1, round(per_job * backlog / self.workers + 0.5)))

    # -- scheduling -------------------------------------------------------------------------

    def _important_waiting(self) -> bool:
        return any(j.priority < Priority.PARTIAL and not j.future.done() for j in self._heap)

    def _shed_waiting_partials(self) -> None:
        kept = []
        for job in self._heap:
            if job.priority == Priority.PARTIAL and not job.future.done():
                job.future.set_result(_SHED)
                self.shed[job.kind] += 1
            elif not job.future.done():
                kept.append(job)
        heapq.heapify(kept)
        self._heap = kept

    def _dispatch(self) -> None:
        while self._running < self.workers and self._heap:
            job = heapq.heappop(self._heap)
            if job.future.done():  # cancelled or shed while it waited
                continue
            self._running += 1
            self._running_by[job.priority] += 1
            self.wait_s[Priority(job.priority).name.lower()].append(
                time.monotonic() - job.queued)
            cf = self._pool.submit(_timed, job.fn, job.args)
            cf.add_done_callback(functools.partial(self._from_thread, job))

    def _from_thread(self, job: _Job, cf: Future[tuple[float, Any]]) -> None:
        # Runs in the worker thread: hand the outcome to the loop that owns the job.
        loop = job.future.get_loop()
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._finished, job, cf)

    def _finished(self, job: _Job, cf: Future[tuple[float, Any]]) -> None:
        self._running -= 1
        self._running_by[job.priority] -= 1
        prio = Priority(job.priority).name.lower()
        try:
            took, result = cf.result()
        except BaseException as e:  # the model call raised: hand the error to the caller
            self.failed[job.kind] += 1
            if not job.future.done():
                job.future.set_exception(e)
        else:
            self.busy_s += took
            self._recent.append(took)
            self.completed[(job.kind, prio)] += 1
            if not job.future.done():
                job.future.set_result(result)
        self._dispatch()

    # -- status -----------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Model calls in flight."""
        return self._running

    def waiting(self) -> dict[str, int]:
        """Queued calls per priority."""
        out = {p.name.lower(): 0 for p in Priority}
        for job in self._heap:
            if not job.future.done():
                out[Priority(job.priority).name.lower()] += 1
        return out

    def close(self) -> None:
        """Refuse new work; a call already running finishes in its thread."""
        self._closed = True
        for job in self._heap:
            if not job.future.done():
                job.future.set_exception(BusyError("stopping", "the daemon is stopping"))
        self._heap.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _timed(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result
