"""What every API handler shares: the application, metrics and the open WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

from agent import __version__, providers
from agent.api.metrics import ApiMetrics, Labels
from agent.app.commands import CallContext, Surface
from agent.app.core import App

log = logging.getLogger(__name__)

ENDPOINTS = ("events", "asr")


def is_loopback(host: str | None) -> bool:
    """Whether a peer address (or a host name we serve on) is this machine."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def call_context(request: web.Request, surface: Surface = "http") -> CallContext:
    """Who is calling, for the registry's rate limits."""
    peer = request.remote or "?"
    return CallContext(surface=surface, client=f"{surface}:{peer}", loopback=is_loopback(peer))


class ApiContext:
    """State of one API instance, built before the daemon's first event."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.cfg = app.cfg.api
        self.metrics = ApiMetrics()
        # Subscribed now, so metrics count events from the daemon's very start.
        self._sub = app.bus.subscribe(app.cfg.events.queue_size, name="api-metrics")
        self.sockets: dict[str, set[web.WebSocketResponse]] = {e: set() for e in ENDPOINTS}
        self.asr_sessions = 0
        app.latency_observers.append(
            lambda stage, s: self.metrics.latency.observe(s, stage=stage))
        self._register_gauges()

    def _register_gauges(self) -> None:
        a, m = self.app, self.metrics

        def one(value: float, **labels: str) -> dict[Labels, float]:
            return {tuple(sorted(labels.items())): float(value)}

        def audio_state() -> dict[Labels, float]:
            st = a.audio_status().state
            return {(("state", s),): float(s == st)
                    for s in ("starting", "ok", "unavailable", "stalled", "ended")}

        r = a.runner
        m.gauge("voice_agent_build_info", "Version and device of this daemon",
                lambda: one(1, version=__version__, device_id=a.cfg.device_id,
                            provider=a.provider))
        m.gauge("voice_agent_execution_provider", "Execution provider each model runs on "
                "(runtime.provider, after any fallback)",
                lambda: {(("component", c), ("provider", p)): 1.0
                         for c, p in providers.in_use().items()})
        m.gauge("voice_agent_ready", "1 once models are loaded and the front-ends listen",
                lambda: one(a.ready.is_set()))
        m.gauge("voice_agent_healthy", "1 when health is ok (0: starting, degraded, stopping)",
                lambda: one(a.health().status == "ok"))
        m.gauge("voice_agent_audio_state", "The audio input's state (1 for the current one)",
                audio_state)
        m.gauge("voice_agent_uptime_seconds", "Seconds since the daemon started",
                lambda: one(round(time.monotonic() - a.started, 3)))
        m.gauge("voice_agent_gate_open", "1 while the push-to-talk gate is open",
                lambda: one(a.gate.is_open, mode=a.gate.mode))
        m.gauge("voice_agent_ws_connections", "Open WebSocket connections, by endpoint",
                lambda: {(("endpoint", e),): float(len(s)) for e, s in self.sockets.items()})
        m.gauge("voice_agent_ws_asr_sessions_max", "api.max_asr_sessions",
                lambda: one(self.cfg.max_asr_sessions))
        m.gauge("voice_agent_bus_events_published_total", "Events put on the bus",
                lambda: one(a.bus.published), kind="counter")
        m.gauge("voice_agent_bus_dropped_events", "Events dropped for slow bus subscribers "
                "(current subscribers)", lambda: one(a.bus.dropped))
        m.gauge("voice_agent_audio_dropped_chunks_total", "Audio chunks the source dropped "
                "(capture outran the pipeline)",
                lambda: one(a.source.dropped_chunks if a.source else 0), kind="counter")
        m.gauge("voice_agent_decode_workers", "Decode runner worker threads (model calls in "
                "flight at most)", lambda: one(r.workers))
        m.gauge("voice_agent_decode_running", "Model calls running now",
                lambda: one(r.running))
        m.gauge("voice_agent_decode_waiting", "Model calls queued, by priority",
                lambda: {(("priority", k),): float(v) for k, v in r.waiting().items()})
        m.gauge("voice_agent_decode_calls_total", "Model calls completed, by kind and priority",
                lambda: {(("kind", k), ("priority", p)): float(v)
                         for (k, p), v in r.completed.items()}, kind="counter")
        m.gauge("voice_agent_decode_shed_total", "Partial decodes shed under load, by kind",
                lambda: {(("kind", k),): float(v) for k, v in r.shed.items()} or one(0),
                kind="counter")
        m.gauge("voice_agent_decode_rejected_total", "Requests refused with 503 because their "
                "queue was full, by class",
                lambda: {(("class", k),): float(v) for k, v in r.rejected.items()} or one(0),
                kind="counter")
        m.gauge("voice_agent_decode_busy_seconds_total", "Worker-seconds spent in model calls",
                lambda: one(round(r.busy_s, 3)), kind="counter")
        m.gauge("voice_agent_commands_total", "Registry commands run, by name and surface",
                lambda: {(("command", n), ("surface", s)): float(v)
                         for (n, s), v in a.commands.calls.items()}, kind="counter")
        m.gauge("voice_agent_command_errors_total", "Registry commands refused or failed, by "
                "name and code", lambda: {(("code", c), ("command", n)): float(v)
                                          for (n, c), v in a.commands.failures.items()},
                kind="counter")
        m.gauge("voice_agent_rate_limited_total", "Commands refused by the rate limiter",
                lambda: one(a.commands.limiter.limited), kind="counter")

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

    async def close_sockets(self, app: web.Application) -> None:
        """aiohttp on_shutdown: tell every WebSocket client the daemon is going away."""
        t0 = time.monotonic()
        for ws in [ws for s in self.sockets.values() for ws in s]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY,
                                                message=b"daemon stopping"), 1.0)
        log.debug("WebSockets closed in %.0f ms", 1000 * (time.monotonic() - t0))


CTX = web.AppKey("voice_agent_api", ApiContext)
