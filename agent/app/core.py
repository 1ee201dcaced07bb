"""The application: the one object every surface talks to.

It owns the bus, the gate, the decode runner, the command registry, the loaded analysers and
the status model. Front-ends (HTTP, MQTT, Wyoming, the terminal) take an `App` and nothing
else; the daemon composes an App with the audio pipeline and the front-ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from agent import __version__, providers
from agent.analysis import Analyser
from agent.app.analysers import build_analysers
from agent.app.commands import CommandRegistry
from agent.app.ratelimit import Rate, RateLimiter
from agent.app.runner import DecodeRunner
from agent.app.status import AudioStatus, GateStatus, Health, ModelsStatus, Status, StatusTracker
from agent.asr.base import AsrEngine
from agent.audio.base import AudioSource
from agent.bus import EventBus, Publisher
from agent.config import Config
from agent.errors import AgentError
from agent.events import ErrorEvent
from agent.pipeline.gate import GateController

log = logging.getLogger(__name__)


def limiter_for(cfg: Config) -> RateLimiter:
    """The registry's rate limiter for a config."""
    lim = cfg.limits
    return RateLimiter(Rate(lim.default.rate_per_s, lim.default.burst),
                       {k: Rate(v.rate_per_s, v.burst) for k, v in lim.per_command.items()},
                       lim.loopback_factor)


class App:
    """One running voice agent's application layer."""

    def __init__(self, cfg: Config, source: AudioSource | None = None,
                 vad_name: str | None = None) -> None:
        self.cfg = cfg
        self.bus = EventBus()
        self.pub = Publisher(self.bus, cfg.device_id)
        self.gate = GateController(cfg.gate.mode, self.pub, cfg.gate.max_hold_s)
        self.runner = DecodeRunner(cfg.runtime.decode_workers,
                                   upload_limit=cfg.runtime.upload_queue)
        self.commands = CommandRegistry(limiter_for(cfg))
        self.tracker = StatusTracker()
        self._status_sub = self.bus.subscribe(cfg.events.queue_size, name="status")
        self.analysers: dict[str, Analyser] = {}
        self.source = source
        self.vad_name = vad_name or cfg.vad.backend
        self.ready = asyncio.Event()  # models loaded, front-ends bound
        self.stopped = asyncio.Event()  # pipeline done, bus closed: services wind down
        self.stopping = False
        self.problems: dict[str, str] = {}  # what is missing: stage -> why
        self.started = time.monotonic()
        self.tts_model: str | None = None  # the local voice, once the reply capability has one
        # Stage latencies measured by commands, for whichever front-end keeps metrics.
        self.latency_observers: list[Callable[[str, float], None]] = []
        # Capabilities that can take a reloaded config live: (old, new) -> what still needs a
        # restart (config paths), [] when all of it applied.
        self.reload_hooks: list[Callable[[Config, Config], list[str]]] = []
        # Capabilities that check something once the models are loaded (e.g. voiceprints
        # made by another model); run on the loop after `load_analysers`.
        self.load_hooks: list[Callable[[], Awaitable[object]]] = []

    # -- errors -----------------------------------------------------------------------------

    def report(self, err: AgentError, fatal: bool = False) -> None:
        """Log an error and publish it as an `error` event."""
        (log.error if fatal else log.warning)("%s", err)
        self.pub.emit(ErrorEvent, stage=err.stage, code=err.code, message=err.message,
                      fatal=fatal)

    def observe(self, stage: str, seconds: float) -> None:
        """Record one latency of `stage` (e.g. `transcribe_total`)."""
        for fn in self.latency_observers:
            fn(stage, seconds)

    # -- models -----------------------------------------------------------------------------

    async def load_analysers(self) -> None:
        """Build every enabled analyser off the loop; failures are reported and recorded."""
        failed: list[tuple[str, AgentError]] = []
        self.analysers = await asyncio.to_thread(
            build_analysers, self.cfg, self.runner, lambda name, e: failed.append((name, e)))
        for name, e in failed:  # reported here: the bus belongs to the loop, not the thread
            self.problems[name] = e.message  # one entry per missing analyser
            self.report(e)
        for hook in self.load_hooks:
            try:
                await hook()
            except AgentError as e:
                self.problems[e.stage] = e.message
                self.report(e)

    @property
    def asr_engine(self) -> AsrEngine | None:
        """The ASR model, when one is loaded."""
        a = self.analysers.get("asr")
        engine = getattr(a, "engine", None)
        return engine if isinstance(engine, AsrEngine) else None

    def analyser_model(self, name: str) -> str | None:
        """The model id of analyser `name`, if loaded."""
        a = self.analysers.get(name)
        return a.model_id if a is not None else None

    # -- status -----------------------------------------------------------------------------

    def audio_status(self) -> AudioStatus:
        """The audio input's real state."""
        src = self.source
        if src is None:
            return AudioStatus(state="unavailable", source="none", reason="no audio source")
        retry = None if src.retry_at is None else max(0.0, round(src.retry_at
                                                                  - time.monotonic(), 1))
        return AudioStatus(state=src.state, source=src.name,  # type: ignore[arg-type]
                           device=src.device, reason=src.reason, retry_in_s=retry,
                           dropped_chunks=src.dropped_chunks)

    @property
    def provider(self) -> str:
        """The execution provider the models really run on (cpu, cuda, tensorrt, mixed)."""
        return providers.summary()

    def models_status(self) -> ModelsStatus:
        """Loaded model ids."""
        return ModelsStatus(asr=self.analyser_model("asr"), vad=self.vad_name,
                            speaker=self.analyser_model("speaker"),
                            emotion=self.analyser_model("emotion"), tts=self.tts_model)

    def health(self) -> Health:
        """`ok` only when models are loaded and audio flows; otherwise what is missing."""
        audio = self.audio_status()
        problems = [f"{stage}: {why}" for stage, why in self.problems.items()]
        if audio.state in ("unavailable", "stalled"):
            retry = f" (retrying in {audio.retry_in_s:g} s)" if audio.retry_in_s else ""
            problems.append(f"audio {audio.state}: {audio.reason or 'no input'}{retry}")
        if self.stopping or self.stopped.is_set():
            status = "stopping"
        elif not self.ready.is_set():
            status = "starting"
        else:
            status = "degraded" if problems else "ok"
        return Health(status=status, version=__version__,  # type: ignore[arg-type]
                      device_id=self.cfg.device_id, ready=self.ready.is_set(),
                      uptime_s=round(time.monotonic() - self.started, 1),
                      models=self.models_status(), audio=audio, problems=problems,
                      provider=self.provider, providers=dict(providers.in_use()))

    def gate_status(self) -> GateStatus:
        """The gate."""
        g = self.gate
        return GateStatus(mode=g.mode, state=g.state, session_id=g.session_id)

    def snapshot(self) -> Status:
        """Health plus the gate and the newest results (status topics, snapshots, kiosk)."""
        t = self.tracker
        return Status(**self.health().model_dump(), gate=self.gate_status(),
                      current_utterance=t.current_utterance, last_final=t.last_final,
                      last_speaker=t.last_speaker, last_emotion=t.last_emotion,
                      last_error=t.last_error)

    async def follow(self) -> None:
        """Keep the status tracker current until the bus closes."""
        await self.tracker.follow(self._status_sub)

    async def close(self) -> None:
        """Close the analysers and the runner."""
        for a in self.analysers.values():
            await a.close()
        self.runner.close()
