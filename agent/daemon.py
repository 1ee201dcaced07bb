"""`voice-agent run`: wires source, gate, VAD, segmenter, analysers and sinks together."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent import __version__
from agent.analysers import Analyser, AnalyserHub
from agent.asr.base import AsrEngine
from agent.audio.base import AudioSource, make_source
from agent.bus import EventBus, Publisher
from agent.config import Config
from agent.errors import AgentError
from agent.events import ErrorEvent
from agent.gate import GateController
from agent.pipeline import Segmentation, run_pipeline
from agent.sinks import jsonl_sink
from agent.state import StateTracker
from agent.vad.base import make_vad

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0


class Service(abc.ABC):
    """A front-end that lives as long as the daemon (MQTT, HTTP API).

    Built in `Daemon.__init__` so it can subscribe to the bus before the first event; `run()`
    returns once `daemon.stopped` is set (after the bus closed and its subscription drained).
    A service that fails is reported as an `error` event; the daemon goes on without it.
    """

    name = "service"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @abc.abstractmethod
    async def run(self) -> None:
        """Serve until the daemon stops."""


class Daemon:
    """One running voice agent; `run()` returns the process exit code."""

    def __init__(self, cfg: Config, events_target: str | None = None,
                 analysers: list[Analyser] | None = None,
                 source: AudioSource | None = None) -> None:
        """`analysers=None` builds them from the config (ASR ...) when `run()` starts."""
        self.cfg = cfg
        self.bus = EventBus()
        self.pub = Publisher(self.bus, cfg.device_id)
        self.gate = GateController(cfg.gate.mode, self.pub, cfg.gate.max_hold_s)
        self._build_analysers = analysers is None
        self.hub = AnalyserHub(analysers or [], self.pub)
        self.events_target = events_target
        self.source = source or make_source(cfg.audio, on_error=self.report)
        self.vad = make_vad(cfg.vad)
        self.seg = Segmentation(cfg.segmenter, self.vad.frame_samples, self.pub, self.hub,
                                self.gate.session_id)
        self.end_reason: list[str] = []
        self.failed: AgentError | None = None
        self.ready = asyncio.Event()  # models loaded, audio flowing
        self.stopped = asyncio.Event()  # pipeline done, bus closed: services wind down
        self.asr_engine: AsrEngine | None = None
        self.state = StateTracker()
        self._state_sub = self.bus.subscribe(cfg.events.queue_size, name="state")
        self.services: list[Service] = self._build_services()

    def report(self, err: AgentError, fatal: bool = False) -> None:
        """Log an error and publish it as an `error` event."""
        (log.error if fatal else log.warning)("%s", err)
        self.pub.emit(ErrorEvent, stage=err.stage, code=err.code, message=err.message,
                      fatal=fatal)

    def shutdown(self) -> None:
        """Stop capturing; the utterance in progress is finished, then we exit."""
        if not self.end_reason:
            log.info("shutting down")
            self.end_reason.append("shutdown")
        self.source.stop()

    def _build_services(self) -> list[Service]:
        """Front-ends enabled in the config."""
        out: list[Service] = []
        if self.cfg.mqtt.enabled:
            from agent.mqtt.service import MqttService

            out.append(MqttService(self))
        if self.cfg.api.enabled:
            from agent.api.server import ApiService

            out.append(ApiService(self))
        return out

    def snapshot(self) -> dict[str, Any]:
        """Current state: gate, utterance, last final, models (for status topics and APIs)."""
        return {
            "device_id": self.cfg.device_id,
            "version": __version__,
            "gate": self.gate.snapshot(),
            "current_utterance": self.state.current_utterance,
            "last_final": self.state.last_final,
            "models": {"asr": self.asr_engine.model_id if self.asr_engine else None,
                       "vad": self.vad.name},
            "uptime_s": round(self.state.uptime_s, 1),
        }

    async def _serve(self, svc: Service) -> None:
        try:
            await svc.run()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("service %s failed", svc.name)
            err = e if isinstance(e, AgentError) else AgentError(type(e).__name__, str(e))
            self.pub.emit(ErrorEvent, stage=svc.name, code=err.code, message=err.message)

    def _load_analysers(self) -> list[Analyser]:
        """Load configured models; a model that fails is reported and left out."""
        out: list[Analyser] = []
        asr = self.cfg.asr
        if asr.enabled:
            from agent.asr.analyser import AsrAnalyser
            from agent.asr.sherpa import make_engine
            from agent.config import SherpaOfflineAsrConfig

            try:
                engine = make_engine(asr)
            except AgentError as e:
                # Recognition is lost, but capture, gate and VAD events go on.
                self.report(e)
            else:
                self.asr_engine = engine
                if isinstance(asr, SherpaOfflineAsrConfig):
                    out.append(AsrAnalyser(engine, asr.partials, asr.partial_interval_ms,
                                           asr.partial_min_audio_ms))
                else:
                    out.append(AsrAnalyser(engine))
        return out

    async def _pipeline(self) -> None:
        if self._build_analysers:
            self.hub.analysers = await asyncio.to_thread(self._load_analysers)
        self.ready.set()
        with ThreadPoolExecutor(1, thread_name_prefix="vad") as vad_ex:
            try:
                await run_pipeline(self.source.chunks(), self.gate, self.vad, vad_ex, self.seg,
                                   self.end_reason)
            except AgentError as e:
                self.failed = e
                self.report(e, fatal=True)
                self.seg.close("end_of_stream")
        if not await self.hub.drain(SHUTDOWN_GRACE_S if self.end_reason else None):
            log.warning("analysers did not finish within %.0f s", SHUTDOWN_GRACE_S)
        await self.hub.close()
        # Closing the bus lets every sink drain what it holds and finish.
        self.bus.close()
        self.stopped.set()

    async def run(self) -> int:
        """Run until the source ends or a signal arrives."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.shutdown)
        try:
            async with asyncio.TaskGroup() as tg:
                if self.events_target:
                    sub = self.bus.subscribe(self.cfg.events.queue_size, name="jsonl")
                    tg.create_task(jsonl_sink(sub, self.events_target), name="jsonl-sink")
                tg.create_task(self.state.follow(self._state_sub), name="state")
                for svc in self.services:
                    tg.create_task(self._serve(svc), name=svc.name)
                tg.create_task(self._pipeline(), name="pipeline")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        return 1 if self.failed else 0
