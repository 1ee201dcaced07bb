"""`voice-agent run`: the composition root. Wires the application, the audio pipeline and the
front-ends together; nothing else imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

import numpy as np
from pydantic import BaseModel, SecretStr

from agent import logsetup, notify
from agent.analysis import Analyser
from agent.app.capabilities import create_app
from agent.app.core import App, limiter_for
from agent.app.service import Service
from agent.app.sinks import jsonl_sink
from agent.audio.base import AudioSource
from agent.audio.sources import make_source
from agent.bus import EventBus, Publisher
from agent.config import Config, check_model_ids, load_config
from agent.errors import AgentError
from agent.events import ErrorEvent
from agent.models import load_manifest
from agent.pipeline.chain import Segmentation, run_pipeline
from agent.pipeline.gate import GateController
from agent.pipeline.hub import AnalyserHub
from agent.vad.factory import make_vad

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
STATUS_INTERVAL_S = 10.0  # how often systemd's STATUS= line is refreshed


async def _first(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Return when `event` is set or `task` has ended (a front-end that failed to bind)."""
    wait = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([wait, task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        wait.cancel()


# Sections and keys a running daemon cannot change: they need a restart.
RESTART_ONLY = ("device_id", "state_dir", "audio", "asr", "runtime", "emotion", "events")


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two configs (secrets compared by value)."""
    if isinstance(old, BaseModel) and isinstance(new, BaseModel) and type(old) is type(new):
        out: list[str] = []
        for name in type(old).model_fields:
            out += _changed(getattr(old, name), getattr(new, name), f"{prefix}{name}.")
        return out
    if isinstance(old, SecretStr) and isinstance(new, SecretStr):
        same = old.get_secret_value() == new.get_secret_value()
    else:
        same = old == new
    return [] if same else [prefix.rstrip(".")]


def apply_config(daemon: Daemon, old: Config, new: Config) -> list[str]:
    """Apply a reloaded config live where it can be; returns the paths needing a restart."""
    changed = _changed(old, new)
    if not changed:
        return []
    app = daemon.app
    restart = [c for c in changed if c.split(".")[0] in RESTART_ONLY]
    if any(c.startswith("vad.") for c in changed) and not daemon.vad.update(new.vad):
        restart += [c for c in changed if c.startswith("vad.")]
    logsetup.set_level(new.log_level)
    logsetup.redact_filter().set_secrets(logsetup.secrets_of(new))
    daemon.seg.reconfigure(new.segmenter)
    app.gate.max_hold_s = new.gate.max_hold_s
    if new.gate.mode != old.gate.mode:
        restart.append("gate.mode")
    app.commands.limiter = limiter_for(new)
    daemon.cfg = app.cfg = new
    for hook in app.reload_hooks:
        restart += hook(old, new)
    # Front-ends whose own section changed start again with it (a new port, a new broker).
    for svc in list(daemon._tasks):
        if any(c == svc.name or c.startswith(f"{svc.name}.") for c in changed):
            daemon.restart_service(svc)
    return sorted(set(restart))


def build_services(app: App, terminal: bool = False, keyboard: bool = False) -> list[Service]:
    """Front-ends enabled in the config (and the terminal, when the CLI runs on one)."""
    out: list[Service] = []
    if app.cfg.mqtt.enabled:
        from agent.mqtt.service import MqttService

        out.append(MqttService(app))
    if app.cfg.api.enabled:
        from agent.api.server import ApiService

        out.append(ApiService(app))
    if app.cfg.wyoming.enabled:
        from agent.wyoming.service import WyomingService

        out.append(WyomingService(app))
    # Replies follow the bus for finals and barge-in (and say so when they are off).
    from agent.app.reply import ReplyService

    out.append(ReplyService(app))
    if terminal or keyboard:
        from agent.terminal import TerminalService

        out.append(TerminalService(app, live=terminal, keyboard=keyboard))
    return out


class Daemon:
    """One running voice agent; `run()` returns the process exit code."""

    def __init__(self, cfg: Config, events_target: str | None = None,
                 analysers: list[Analyser] | None = None,
                 source: AudioSource | None = None, *, terminal: bool = False,
                 keyboard: bool = False, banner: TextIO | None = None,
                 config_path: str | None = None,
                 overrides: Callable[[Config], Config] | None = None) -> None:
        """`analysers=None` builds them from the config (the analyser registry) at start.

        `terminal`/`keyboard`: the live line and Enter/Space push-to-talk (a TTY's CLI);
        `banner`: where to print the start-up lines (the kiosk URL), if anywhere;
        `config_path`/`overrides`: what SIGHUP re-reads, and the CLI's options applied again.
        """
        self.cfg = cfg
        self.vad = make_vad(cfg.vad, cfg.runtime)
        self.app = create_app(cfg, vad_name=self.vad.name)
        self.source = source or make_source(cfg.audio, on_error=self.app.report)
        self.app.source = self.source
        self._given = analysers
        self.hub = AnalyserHub(analysers or [], self.app.pub)
        self.seg = Segmentation(cfg.segmenter, self.vad.frame_samples, self.app.pub, self.hub,
                                self.app.gate.session_id)
        self.events_target = events_target
        self.end_reason: list[str] = []
        self.failed: AgentError | None = None
        self.services: list[Service] = build_services(self.app, terminal, keyboard)
        self.banner = banner
        self.on_shutdown: list[Callable[[], None]] = []  # e.g. the CLI's exit deadline
        self.config_path = config_path
        self.overrides = overrides
        self.notifier = notify.default()
        self.heartbeat = notify.Heartbeat(cfg.audio.stall_timeout_s)
        self.watchdog = notify.Watchdog(
            self.notifier, self._audio_alive,
            describe=lambda: f"no audio for {self.heartbeat.age_s():.1f} s")
        self._tasks: dict[Service, asyncio.Task[None]] = {}
        self._reloading: asyncio.Task[list[str]] | None = None
        self.reloads = 0

    # Shortcuts for tests and benches that drive a daemon directly.
    @property
    def bus(self) -> EventBus:
        """The event bus."""
        return self.app.bus

    @property
    def pub(self) -> Publisher:
        """The event publisher."""
        return self.app.pub

    @property
    def gate(self) -> GateController:
        """The push-to-talk gate."""
        return self.app.gate

    @property
    def ready(self) -> asyncio.Event:
        """Set once models are loaded and audio flows."""
        return self.app.ready

    @property
    def stopped(self) -> asyncio.Event:
        """Set once the pipeline is done and the bus closed."""
        return self.app.stopped

    def shutdown(self) -> None:
        """Stop capturing; the utterance in progress is finished, then we exit."""
        if not self.end_reason:
            log.info("shutting down")
            self.end_reason.append("shutdown")
            self.app.stopping = True
            self.notifier.stopping("stopping: finishing the utterance, flushing MQTT")
            for fn in self.on_shutdown:
                fn()
        self.source.stop()

    # -- systemd ----------------------------------------------------------------------------

    def _audio_alive(self) -> bool:
        """The audio loop runs: chunks keep coming, or a lost device is being retried.

        A source waiting out its retry backoff (mic unplugged) is alive: a restart would not
        bring the device back, and the status says what is wrong.
        """
        src = self.source
        if src.state in ("unavailable", "ended"):
            return True
        return self.heartbeat.alive()

    async def _beating(self, chunks: AsyncIterator[np.ndarray]) -> AsyncIterator[np.ndarray]:
        async for chunk in chunks:
            self.heartbeat.beat()
            yield chunk

    def status_text(self) -> str:
        """The one line systemd shows (`systemctl status`)."""
        h = self.app.health()
        counts = self.app.tracker.counts
        mqtt = next((s for s in self.services if s.name == "mqtt"), None)
        connected = getattr(mqtt, "connected", None)
        broker = None if not isinstance(connected, asyncio.Event) else (
            "connected" if connected.is_set() else "disconnected")
        return notify.status_text(h.status, utterances=counts.get("utterance.ended", 0),
                                  finals=counts.get("asr.final", 0), audio=h.audio.state,
                                  broker=broker)

    async def _until_listening(self) -> None:
        """Models loaded and every front-end's sockets bound (or failed, reported)."""
        ready = asyncio.ensure_future(self.app.ready.wait())
        stopped = asyncio.ensure_future(self.app.stopped.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopped.cancel()
        waits = []
        for svc, task in self._tasks.items():
            bound = getattr(svc, "bound", None)
            if bound is not None:
                waits.append(asyncio.ensure_future(_first(bound, task)))
        if waits:
            await asyncio.wait(waits, timeout=10.0)
            for w in waits:
                w.cancel()

    async def _notify(self) -> None:
        """READY=1 once listening, then STATUS= every few seconds until stopped."""
        await self._until_listening()
        if self.app.stopped.is_set():
            return
        self.heartbeat.beat()
        self.notifier.ready(self.status_text())
        while not self.app.stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.app.stopped.wait(), STATUS_INTERVAL_S)
            if not self.app.stopping:
                self.notifier.status(self.status_text())

    # -- SIGHUP: reload ---------------------------------------------------------------------

    def _hangup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            log.info("SIGHUP: a reload is already under way")
            return
        self._reloading = asyncio.get_running_loop().create_task(self.reload(), name="reload")

    async def reload(self) -> list[str]:
        """Re-read and re-validate the config; apply what can change live.

        Returns the config paths that need a restart. A bad config is rejected with its
        errors and the running one stays.
        """
        self.notifier.reloading("reloading the configuration")
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
            if self.overrides is not None:
                new = self.overrides(new)
            check_model_ids(new, await asyncio.to_thread(lambda: load_manifest().ids))
        except AgentError as e:
            log.error("reload rejected, keeping the running configuration:\n  %s",
                      e.message.replace("\n", "\n  "))
            self.app.report(e)
            self.notifier.ready(self.status_text() + "; reload rejected")
            return []
        old = self.cfg
        restart = apply_config(self, old, new)
        self.reloads += 1
        if restart:
            log.warning("reloaded; these settings need a restart to apply: %s",
                        ", ".join(restart))
        else:
            log.info("reloaded: every change applied")
        self.notifier.ready(self.status_text())
        return restart

    def restart_service(self, svc: Service) -> None:
        """Stop a front-end and start a new one from the current config (a reload)."""
        task = self._tasks.pop(svc, None)
        fresh = next((s for s in build_services(self.app) if s.name == svc.name), None)
        self.services = [s for s in self.services if s is not svc]

        async def swap() -> None:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if fresh is not None and not self.app.stopped.is_set():
                self.services.append(fresh)
                self._tasks[fresh] = asyncio.get_running_loop().create_task(
                    self._serve(fresh), name=fresh.name)
                log.info("%s restarted with the reloaded configuration", fresh.name)

        asyncio.get_running_loop().create_task(swap(), name=f"restart:{svc.name}")

    async def _serve(self, svc: Service) -> None:
        try:
            await svc.run()
        except asyncio.CancelledError:
            raise
        except AgentError as e:
            # Expected failures (a busy port, a broker refusing us) are one clear line.
            log.error("%s stopped: %s", svc.name, e)
            self.app.pub.emit(ErrorEvent, stage=svc.name, code=e.code, message=e.message)
        except Exception as e:
            log.exception("service %s failed", svc.name)
            err = e if isinstance(e, AgentError) else AgentError(type(e).__name__, str(e))
            self.app.pub.emit(ErrorEvent, stage=svc.name, code=err.code, message=err.message)

    async def _pipeline(self) -> None:
        app = self.app
        if self._given is None:
            await app.load_analysers()
            self.hub.analysers = list(app.analysers.values())
        else:
            app.analysers = {a.name: a for a in self._given}
        app.ready.set()
        with ThreadPoolExecutor(1, thread_name_prefix="vad") as vad_ex:
            try:
                await run_pipeline(self._beating(self.source.chunks()), app.gate, self.vad,
                                   vad_ex, self.seg, self.end_reason)
            except AgentError as e:
                self.failed = e
                app.report(e, fatal=True)
                self.seg.close("end_of_stream")
        if not await self.hub.drain(SHUTDOWN_GRACE_S if self.end_reason else None):
            log.warning("analysers did not finish within %.0f s", SHUTDOWN_GRACE_S)
        await self.hub.close()
        app.runner.close()
        # Closing the bus lets every sink drain what it holds and finish.
        app.bus.close()
        app.stopped.set()

    async def _announce(self) -> None:
        """Once models are loaded and the front-ends listen, say where to find them."""
        await self._until_listening()
        if self.app.stopped.is_set():
            return
        h = self.app.health()
        audio = h.audio.state if h.audio.state != "unavailable" else \
            f"unavailable ({h.audio.reason})"
        lines = [f"voice-agent {h.version} on {h.device_id}: {h.status}; gate "
                 f"{self.app.gate.mode}; audio {audio}; asr {h.models.asr or 'off'}"]
        lines += [d for s in self.services if (d := s.describe())]
        assert self.banner is not None
        for line in lines:
            print(line, file=self.banner, flush=True)

    async def run(self) -> int:
        """Run until the source ends or a signal arrives."""
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGINT: self.shutdown, signal.SIGTERM: self.shutdown,
                    signal.SIGHUP: self._hangup}
        for sig, fn in handlers.items():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, fn)
        try:
            async with asyncio.TaskGroup() as tg:
                if self.events_target:
                    sub = self.app.bus.subscribe(self.cfg.events.queue_size, name="jsonl")
                    tg.create_task(jsonl_sink(sub, self.events_target), name="jsonl-sink")
                tg.create_task(self.app.follow(), name="status")
                if self.banner is not None:
                    tg.create_task(self._announce(), name="banner")
                for svc in self.services:
                    self._tasks[svc] = tg.create_task(self._serve(svc), name=svc.name)
                tg.create_task(self._pipeline(), name="pipeline")
                tg.create_task(self._notify(), name="notify")
                tg.create_task(self.watchdog.run(until=self.app.stopped), name="watchdog")
        finally:
            for sig in handlers:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        return 1 if self.failed else 0
