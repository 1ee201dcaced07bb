"""`voice-agent run`: the composition root. Wires the application, the audio pipeline and the
front-ends together; nothing else imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from agent.analysis import Analyser
from agent.app.capabilities import create_app
from agent.app.core import App
from agent.app.service import Service
from agent.app.sinks import jsonl_sink
from agent.audio.base import AudioSource
from agent.audio.sources import make_source
from agent.bus import EventBus, Publisher
from agent.config import Config
from agent.errors import AgentError
from agent.events import ErrorEvent
from agent.pipeline.chain import Segmentation, run_pipeline
from agent.pipeline.gate import GateController
from agent.pipeline.hub import AnalyserHub
from agent.vad.factory import make_vad

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0


def build_services(app: App) -> list[Service]:
    """Front-ends enabled in the config."""
    out: list[Service] = []
    if app.cfg.mqtt.enabled:
        from agent.mqtt.service import MqttService

        out.append(MqttService(app))
    if app.cfg.api.enabled:
        from agent.api.server import ApiService

        out.append(ApiService(app))
    return out


class Daemon:
    """One running voice agent; `run()` returns the process exit code."""

    def __init__(self, cfg: Config, events_target: str | None = None,
                 analysers: list[Analyser] | None = None,
                 source: AudioSource | None = None) -> None:
        """`analysers=None` builds them from the config (the analyser registry) at start."""
        self.cfg = cfg
        self.vad = make_vad(cfg.vad)
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
        self.services: list[Service] = build_services(self.app)

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
        self.source.stop()

    def _hangup(self) -> None:
        # Until reload exists, SIGHUP must not kill the daemon and lose the utterance.
        log.warning("SIGHUP ignored: configuration reload is not supported yet; restart to "
                    "apply changes")

    async def _serve(self, svc: Service) -> None:
        try:
            await svc.run()
        except asyncio.CancelledError:
            raise
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
                await run_pipeline(self.source.chunks(), app.gate, self.vad, vad_ex, self.seg,
                                   self.end_reason)
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
                for svc in self.services:
                    tg.create_task(self._serve(svc), name=svc.name)
                tg.create_task(self._pipeline(), name="pipeline")
        finally:
            for sig in handlers:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        return 1 if self.failed else 0
