"""The daemon's status as typed models: health, the snapshot, and what follows the bus to fill it.

One model for every surface: `/api/health`, `/api/stats`, `/metrics`, the `/ws/events`
snapshot, the MQTT `state` topic, the kiosk and the terminal all render these.
"""

from __future__ import annotations

import time
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from agent.bus import Subscription
from agent.events import (
    AsrFinal,
    BaseEvent,
    EmotionDetected,
    ErrorEvent,
    GateMode,
    GateState,
    SpeakerIdentified,
    UtteranceEnded,
    UtteranceStarted,
)

DaemonState = Literal["starting", "ok", "degraded", "stopping"]
AudioState = Literal["starting", "ok", "unavailable", "stalled", "ended"]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class GateStatus(_Out):
    """The push-to-talk gate."""

    mode: GateMode
    state: GateState
    session_id: str | None


class AudioStatus(_Out):
    """The audio input: really flowing, or why not."""

    state: AudioState
    source: str
    device: str | None = None
    reason: str | None = None  # why it is unavailable or stalled
    retry_in_s: float | None = None  # when the next attempt to open it is due
    dropped_chunks: int = 0


class ModelsStatus(_Out):
    """Loaded models (None: that analyser is off or failed to load)."""

    asr: str | None
    vad: str
    speaker: str | None = None
    emotion: str | None = None
    tts: str | None = None


class LastFinal(_Out):
    """The newest final transcript."""

    utterance_id: str | None
    text: str
    language: str | None
    ts: float


class LastSpeaker(_Out):
    """Who spoke the newest identified utterance."""

    utterance_id: str | None
    speaker_id: str | None
    name: str
    score: float
    is_match: bool
    ts: float


class LastEmotion(_Out):
    """The newest utterance's emotion."""

    utterance_id: str | None
    label: str
    confidence: float
    ts: float


class LastError(_Out):
    """The newest error event."""

    stage: str
    code: str
    message: str
    ts: float


class Health(_Out):
    """Liveness and readiness, with what is missing when not `ok`."""

    status: DaemonState
    version: str
    device_id: str
    ready: bool
    uptime_s: float
    models: ModelsStatus
    audio: AudioStatus
    problems: list[str] = []
    provider: str = "cpu"  # what the models run on: cpu, cuda, tensorrt, or mixed
    providers: dict[str, str] = {}  # per model: asr, vad, speaker, emotion -> provider


class Status(Health):
    """Everything a dashboard shows: health plus the gate and the newest results."""

    gate: GateStatus
    current_utterance: str | None
    last_final: LastFinal | None
    last_speaker: LastSpeaker | None = None
    last_emotion: LastEmotion | None = None
    last_error: LastError | None = None


ORDER_KEPT = 256  # utterances whose start order the tracker remembers


class _Result(Protocol):
    utterance_id: str | None


class StatusTracker:
    """Follows events to know the current utterance, the newest results and simple counters."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.current_utterance: str | None = None
        self.last_final: LastFinal | None = None
        self.last_speaker: LastSpeaker | None = None
        self.last_emotion: LastEmotion | None = None
        self.last_error: LastError | None = None
        self.counts: dict[str, int] = {}
        # Start order of recent utterances: results come out of order (the speaker waits for
        # the final, a long final for its decode), and "last" means the newest utterance's.
        self._order: dict[str, int] = {}
        self._started = 0

    def _newest(self, utterance_id: str | None, last: _Result | None) -> bool:
        """Whether a result for `utterance_id` is not older than `last`'s."""
        if last is None or utterance_id is None:
            return True
        mine = self._order.get(utterance_id)
        theirs = self._order.get(last.utterance_id) if last.utterance_id else None
        return mine is None or theirs is None or mine >= theirs

    def apply(self, ev: BaseEvent) -> None:
        """Update from one event."""
        self.counts[ev.type] = self.counts.get(ev.type, 0) + 1
        if isinstance(ev, UtteranceStarted):
            self.current_utterance = ev.utterance_id
            if ev.utterance_id is not None:
                self._started += 1
                self._order[ev.utterance_id] = self._started
                if len(self._order) > ORDER_KEPT:
                    del self._order[next(iter(self._order))]
        elif isinstance(ev, UtteranceEnded) and ev.utterance_id == self.current_utterance:
            self.current_utterance = None
        elif isinstance(ev, AsrFinal) and self._newest(ev.utterance_id, self.last_final):
            self.last_final = LastFinal(utterance_id=ev.utterance_id, text=ev.text,
                                        language=ev.language, ts=ev.ts)
        elif isinstance(ev, SpeakerIdentified) and self._newest(ev.utterance_id,
                                                                self.last_speaker):
            self.last_speaker = LastSpeaker(utterance_id=ev.utterance_id,
                                            speaker_id=ev.speaker_id, name=ev.name,
                                            score=ev.score, is_match=ev.is_match, ts=ev.ts)
        elif isinstance(ev, EmotionDetected) and self._newest(ev.utterance_id,
                                                              self.last_emotion):
            self.last_emotion = LastEmotion(utterance_id=ev.utterance_id, label=ev.label,
                                            confidence=ev.confidence, ts=ev.ts)
        elif isinstance(ev, ErrorEvent):
            self.last_error = LastError(stage=ev.stage, code=ev.code, message=ev.message,
                                        ts=ev.ts)

    async def follow(self, sub: Subscription) -> None:
        """Apply every event until the bus closes."""
        async for ev in sub:
            self.apply(ev)

    @property
    def uptime_s(self) -> float:
        """Seconds since the daemon started."""
        return time.monotonic() - self.started
