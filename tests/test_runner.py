"""The daemon-wide decode runner (`agent/app/runner.py`) with real worker threads.

Jobs are plain functions that block on threading events, so each test decides exactly when
a worker is busy; no model, no sleeps used as synchronisation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable

import pytest

from agent.analysis import Priority
from agent.app.runner import BusyError, DecodeRunner

WAIT_S = 10.0


class Gate:
    """A job that blocks its worker until released; records that it started."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, value: object = None) -> object:
        self.started.set()
        assert self.release.wait(WAIT_S), "never released"
        return value


async def started(gate: Gate) -> None:
    """Wait (off the loop) until the gated job runs in a worker."""
    assert await asyncio.to_thread(gate.started.wait, WAIT_S)


@pytest.fixture
def runner() -> DecodeRunner:
    return DecodeRunner(1, upload_limit=2)


async def test_priority_order_then_fifo(runner: DecodeRunner) -> None:
    order: list[str] = []
    busy = Gate()
    first = asyncio.ensure_future(runner.run(busy, "busy"))
    await started(busy)

    def job(name: str) -> str:
        order.append(name)
        return name

    # Queued in the worst order while the only worker is busy.
    waiting = [asyncio.ensure_future(runner.run(job, name, priority=prio))
               for name, prio in [("upload", Priority.UPLOAD), ("analysis", Priority.ANALYSIS),
                                  ("segment", Priority.SEGMENT), ("final-1", Priority.FINAL),
                                  ("final-2", Priority.FINAL)]]
    await asyncio.sleep(0)
    assert runner.waiting() == {"final": 2, "segment": 1, "analysis": 1, "upload": 1,
                                "partial": 0}
    busy.release.set()
    assert await first == "busy"
    await asyncio.gather(*waiting)
    assert order == ["final-1", "final-2", "segment", "analysis", "upload"]


async def test_finals_go_before_partials_of_other_sessions(runner: DecodeRunner) -> None:
    busy = Gate()
    first = asyncio.ensure_future(runner.run(busy))
    await started(busy)
    # Session A's partial waits for the worker; session B's final arrives after it.
    partial_a = asyncio.ensure_future(runner.partial(lambda: "partial A"))
    await asyncio.sleep(0)
    assert runner.waiting()["partial"] == 1
    final_b = asyncio.ensure_future(runner.run(lambda: "final B", priority=Priority.FINAL))
    # The waiting partial is shed at once (None), not run after the final.
    assert await asyncio.wait_for(partial_a, WAIT_S) is None
    assert runner.shed["asr"] == 1
    busy.release.set()
    assert await final_b == "final B"
    await first
    assert runner.completed[("asr", "final")] == 2 and runner.completed[("asr", "partial")] == 0


async def test_partials_are_refused_while_important_work_waits(runner: DecodeRunner) -> None:
    busy = Gate()
    first = asyncio.ensure_future(runner.run(busy))
    await started(busy)
    segment = asyncio.ensure_future(runner.run(lambda: "seg", priority=Priority.SEGMENT))
    await asyncio.sleep(0)
    assert await runner.partial(lambda: "never", kind="speaker") is None  # without queueing
    assert runner.shed["speaker"] == 1 and runner.waiting()["partial"] == 0
    busy.release.set()
    await asyncio.gather(first, segment)
    # Idle again: a partial runs.
    assert await runner.partial(lambda: "ran") == "ran"


async def test_a_partial_runs_when_a_worker_is_free() -> None:
    r = DecodeRunner(2)
    busy = Gate()
    first = asyncio.ensure_future(r.run(busy))
    await started(busy)
    assert await r.partial(lambda: "ok") == "ok"  # the other worker was free
    busy.release.set()
    await first
    r.close()


async def test_never_more_calls_in_flight_than_workers() -> None:
    workers = 3
    r = DecodeRunner(workers)
    lock = threading.Lock()
    now = 0
    peak = 0
    all_in = threading.Barrier(workers, timeout=WAIT_S)

    def job(i: int) -> int:
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        if i < workers:
            all_in.wait()  # the first `workers` jobs really run at the same time
        with lock:
            now -= 1
        return i

    jobs: list[Awaitable[int | None]] = [r.run(job, i, priority=Priority(i % 4))
                                         for i in range(30)]
    jobs += [r.partial(job, 100 + i) for i in range(10)]
    results = await asyncio.gather(*jobs)
    assert peak == workers
    assert sorted(x for x in results[:30] if x is not None) == list(range(30))
    assert r.running == 0
    r.close()


async def test_admit_past_the_limit_is_busy_with_retry_after(runner: DecodeRunner) -> None:
    async with runner.admit("upload"), runner.admit("upload"):
        with pytest.raises(BusyError) as e:
            async with runner.admit("upload"):
                pytest.fail("admitted past the limit")
        assert e.value.status == 503 and e.value.code == "busy"
        assert e.value.retry_after_s is not None and e.value.retry_after_s >= 1
        assert "runtime.upload_queue = 2" in e.value.message
        async with runner.admit("other-class"):
            pass  # limits are per class
    assert runner.rejected == {"upload": 1}
    async with runner.admit("upload"):  # released: admitted again
        pass


async def test_errors_reach_the_caller_and_are_counted(runner: DecodeRunner) -> None:
    def boom() -> None:
        raise ValueError("model exploded")

    with pytest.raises(ValueError, match="model exploded"):
        await runner.run(boom, kind="emotion")
    assert runner.failed["emotion"] == 1
    assert await runner.run(lambda: 7) == 7  # the worker is free again


async def test_a_cancelled_waiting_job_never_runs(runner: DecodeRunner) -> None:
    busy = Gate()
    first = asyncio.ensure_future(runner.run(busy))
    await started(busy)
    ran: list[str] = []
    waiting = asyncio.ensure_future(runner.run(ran.append, "x", priority=Priority.UPLOAD))
    await asyncio.sleep(0)
    waiting.cancel()
    busy.release.set()
    await first
    assert await runner.run(lambda: "after") == "after"
    assert ran == [] and waiting.cancelled()


async def test_close_refuses_new_work_and_fails_what_waits(runner: DecodeRunner) -> None:
    busy = Gate()
    first = asyncio.ensure_future(runner.run(busy, "done"))
    await started(busy)
    waiting = asyncio.ensure_future(runner.run(lambda: "never", priority=Priority.UPLOAD))
    await asyncio.sleep(0)
    runner.close()
    with pytest.raises(BusyError, match="stopping"):
        await waiting
    with pytest.raises(BusyError, match="stopping"):
        await runner.run(lambda: None)
    busy.release.set()
    assert await first == "done"  # the call already running finishes
