"""What every handler shares: the daemon, metrics, open WebSockets and the decode threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import WSCloseCode, web

from agent import __version__
from agent.api.metrics import ApiMetrics, Labels

if TYPE_CHECKING:
    from agent.daemon import Daemon

log = logging.getLogger(__name__)

T = TypeVar("T")
ENDPOINTS = ("events", "asr")


class DecodePool:
    """Recognition threads of the API: finals first, partials only while no final waits.

    Finals and partials have their own threads so a partial never sits in front of a final
    in a queue; partials are also skipped while any final is queued or running, because on a
    small CPU they would otherwise steal the cores the final needs (partials are best-effort,
    a later one replaces them). Waiting partials are served in arrival order, so every
    session gets its turn.
    """

    def __init__(self, final_workers: int, partial_workers: int = 1) -> None:
        self._final = ThreadPoolExecutor(final_workers, thread_name_prefix="api-asr-final")
        self._partial = ThreadPoolExecutor(partial_workers, thread_name_prefix="api-asr-partial")
        self._partial_slots = asyncio.Semaphore(partial_workers)
        self.finals_waiting = 0

    async def final(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a decode that must happen (a final, a streaming feed)."""
        loop = asyncio.get_running_loop()
        self.finals_waiting += 1
        try:
            return await loop.run_in_executor(self._final, fn, *args)
        finally:
            self.finals_waiting -= 1

    async def partial(self, fn: Callable[[], T],
                      started: Callable[[asyncio.Future[T]], None] | None = None) -> T | None:
        """Run a best-effort decode; None when skipped because finals are waiting.

        `started` gets the decode's future once it runs in a thread (not while it waits for
        a turn): a caller cancelled meanwhile can still collect the result from it.
        """
        if self.finals_waiting:
            return None
        await self._partial_slots.acquire()
        if self.finals_waiting:
            self._partial_slots.release()
            return None
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._partial, fn)
        # The slot is free when the thread is, not when the caller stops waiting: decodes
        # never queue inside the executor, so a started one is a running one.
        fut.add_done_callback(lambda _: self._partial_slots.release())
        if started is not None:
            started(fut)
        return await asyncio.shield(fut)

    def close(self) -> None:
        """Stop the threads; a decode already running finishes in its thread, unread."""
        self._partial.shutdown(wait=False, cancel_futures=True)
        self._final.shutdown(wait=False, cancel_futures=True)


class ApiContext:
    """State of one API instance, built with the daemon (before its first event)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.cfg = daemon.cfg.api
        self.metrics = ApiMetrics()
        # Subscribed now, so metrics count events from the daemon's very start.
        self._sub = daemon.bus.subscribe(daemon.cfg.events.queue_size, name="api-metrics")
        self.sockets: dict[str, set[web.WebSocketResponse]] = {e: set() for e in ENDPOINTS}
        self.asr_sessions = 0
        self.pool = DecodePool(daemon.cfg.runtime.executor_workers)
        self._register_gauges()

    def _register_gauges(self) -> None:
        d, m = self.daemon, self.metrics

        def one(value: float, **labels: str) -> dict[Labels, float]:
            return {tuple(sorted(labels.items())): float(value)}

        m.gauge("voice_agent_build_info", "Version and device of this daemon",
                lambda: one(1, version=__version__, device_id=d.cfg.device_id))
        m.gauge("voice_agent_ready", "1 once models are loaded and audio flows",
                lambda: one(d.ready.is_set()))
        m.gauge("voice_agent_uptime_seconds", "Seconds since the daemon started",
                lambda: one(round(d.state.uptime_s, 3)))
        m.gauge("voice_agent_gate_open", "1 while the push-to-talk gate is open",
                lambda: one(d.gate.is_open, mode=d.gate.mode))
        m.gauge("voice_agent_ws_connections", "Open WebSocket connections, by endpoint",
                lambda: {(("endpoint", e),): float(len(s)) for e, s in self.sockets.items()})
        m.gauge("voice_agent_ws_asr_sessions_max", "api.max_asr_sessions",
                lambda: one(self.cfg.max_asr_sessions))
        m.gauge("voice_agent_bus_events_published_total", "Events put on the bus",
                lambda: one(d.bus.published), kind="counter")
        m.gauge("voice_agent_bus_dropped_events", "Events dropped for slow bus subscribers "
                "(current subscribers)", lambda: one(d.bus.dropped))
        m.gauge("voice_agent_audio_dropped_chunks_total", "Audio chunks the source dropped "
                "(capture outran the pipeline)", lambda: one(d.source.dropped_chunks),
                kind="counter")

    def connections(self) -> dict[str, int]:
        """Open WebSockets per endpoint."""
        return {f"ws_{e}": len(s) for e, s in self.sockets.items()}

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: follow the bus for metrics while the app runs."""
        task = asyncio.create_task(self.metrics.follow(self._sub), name="api-metrics")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._sub.close()
        self.pool.close()

    async def close_sockets(self, app: web.Application) -> None:
        """aiohttp on_shutdown: tell every WebSocket client the daemon is going away."""
        t0 = time.monotonic()
        for ws in [ws for s in self.sockets.values() for ws in s]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY,
                                                message=b"daemon stopping"), 1.0)
        log.debug("WebSockets closed in %.0f ms", 1000 * (time.monotonic() - t0))


CTX = web.AppKey("voice_agent_api", ApiContext)
