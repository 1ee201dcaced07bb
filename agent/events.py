"""The typed event vocabulary: every event the daemon publishes, in one place."""

from __future__ import annotations

import os
import threading
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

GateState = Literal["closed", "open"]
GateMode = Literal["ptt", "ptt_toggle", "vad"]
EndReason = Literal["silence", "max_length", "ptt_stop", "reset", "end_of_stream", "shutdown"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_id_lock = threading.Lock()
_id_last = [0, 0]  # (ms, random part) of the last id handed out


def new_event_id() -> str:
    """A ULID: 26 characters, unique, sorting in creation order (also within one ms)."""
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _id_last[0]:
            # Same (or an earlier, after a clock step) millisecond: count up, stay sortable.
            ms, rand = _id_last[0], _id_last[1] + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for the count-up
        _id_last[0], _id_last[1] = ms, rand
    n = (ms << 80) | (rand & ((1 << 80) - 1))
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in range(25, -1, -1))


class BaseEvent(BaseModel):
    """Fields every event carries: who, which session/utterance, and when."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    device_id: str
    # Unique and sortable: consumers de-duplicate redelivered events (MQTT is at least once).
    event_id: str = Field(default_factory=new_event_id)
    # A session is one push-to-talk hold (ptt modes) or one daemon run (vad mode).
    session_id: str | None = None
    utterance_id: str | None = None
    # Wall clock for humans and logs; monotonic for latency arithmetic in one process.
    ts: float = Field(default_factory=time.time)
    mono: float = Field(default_factory=time.monotonic)


class StateChanged(BaseEvent):
    """The push-to-talk gate opened or closed."""

    type: Literal["state.changed"] = "state.changed"
    state: GateState
    previous: GateState
    mode: GateMode
    reason: str


class SpeechStarted(BaseEvent):
    """VAD confirmed speech (after the minimum speech duration)."""

    type: Literal["speech.started"] = "speech.started"
    audio_offset_s: float


class SpeechEnded(BaseEvent):
    """VAD confirmed the end of speech (after the minimum silence), or the gate closed."""

    type: Literal["speech.ended"] = "speech.ended"
    audio_offset_s: float


class UtteranceStarted(BaseEvent):
    """A new utterance begins; analysers receive its audio from `audio_start_s` on."""

    type: Literal["utterance.started"] = "utterance.started"
    audio_start_s: float


class UtteranceEnded(BaseEvent):
    """An utterance is complete (or abandoned, when `reason` is `reset`)."""

    type: Literal["utterance.ended"] = "utterance.ended"
    audio_start_s: float
    audio_end_s: float
    duration_s: float
    reason: EndReason


class AsrPartial(BaseEvent):
    """Interim text of the utterance in progress; `seq` increases within an utterance."""

    type: Literal["asr.partial"] = "asr.partial"
    text: str
    seq: int


class AsrFinal(BaseEvent):
    """The utterance's final transcript, with timings."""

    type: Literal["asr.final"] = "asr.final"
    text: str
    language: str | None
    model: str
    audio_s: float
    decode_ms: float
    # From the utterance end (VAD end or PTT release) to this event.
    eos_to_final_ms: float
    partials: int
    # True when a partial decode had already heard all the speech: no decode at the end.
    speculative: bool = False
    # Sub-segments closed at the speaker's pauses and decoded while speech went on.
    segments: int = 0


class SpeakerIdentified(BaseEvent):
    """Who spoke the utterance: the best enrolled match, or `unknown`."""

    type: Literal["speaker.identified"] = "speaker.identified"
    speaker_id: str | None  # None: nobody enrolled matched
    name: str  # the speaker's name, or "unknown"
    score: float  # similarity of the best candidate (after score normalisation, if on)
    is_match: bool
    model: str
    candidates: list[dict[str, Any]] = Field(default_factory=list)  # top-k: id, name, score
    audio_s: float = 0.0
    compute_ms: float = 0.0
    reason: str | None = None  # why `unknown`: too_short, silent, no_voiceprints, no_match


class AccessDenied(BaseEvent):
    """A speaker who is not allowed tried to trigger a command or a reply."""

    type: Literal["access.denied"] = "access.denied"
    action: str  # what was refused: "reply", a command name
    speaker_id: str | None
    name: str
    reason: str


class EmotionDetected(BaseEvent):
    """The utterance's emotion: label, confidence and every class probability."""

    type: Literal["emotion.detected"] = "emotion.detected"
    label: str
    confidence: float
    probabilities: dict[str, float]
    model: str
    # With an ensemble: each model's result, the best model, and whether all agreed.
    models: list[dict[str, Any]] = Field(default_factory=list)
    best_model: str | None = None
    models_consensus: bool | None = None
    compute_ms: float = 0.0


class EmotionSession(BaseEvent):
    """A session's emotional summary, at its end (PTT hold, /ws/asr connection, time window)."""

    type: Literal["emotion.session"] = "emotion.session"
    utterances: int
    distribution: dict[str, float]
    dominant: str | None
    stability: float  # 1.0: the label never changed between utterances
    valence: float  # 0 (negative) .. 100 (positive)


class LlmStarted(BaseEvent):
    """A reply's LLM request went out."""

    type: Literal["llm.started"] = "llm.started"
    reply_id: str
    model: str
    prompt: str


class LlmText(BaseEvent):
    """A chunk of the reply's text (a sentence, as the chunker cut it)."""

    type: Literal["llm.text"] = "llm.text"
    reply_id: str
    text: str
    seq: int


class LlmDone(BaseEvent):
    """The LLM finished the reply."""

    type: Literal["llm.done"] = "llm.done"
    reply_id: str
    text: str
    first_text_ms: float | None  # request -> first text
    total_ms: float
    finish_reason: str | None = None


class TtsStarted(BaseEvent):
    """Speech synthesis of a reply started."""

    type: Literal["tts.started"] = "tts.started"
    reply_id: str
    voice: str
    backend: str
    sample_rate: int


class TtsFinished(BaseEvent):
    """Speech synthesis (and playback, if any) of a reply finished."""

    type: Literal["tts.finished"] = "tts.finished"
    reply_id: str
    audio_s: float
    first_audio_ms: float | None  # reply trigger -> first audio sample
    played: bool


class ReplyCancelled(BaseEvent):
    """A reply was cut short: barge-in, a new reply, shutdown, or a failure."""

    type: Literal["reply.cancelled"] = "reply.cancelled"
    reply_id: str
    reason: str  # barge_in, superseded, shutdown, error, command


class CloudUnavailable(BaseEvent):
    """The cloud service could not be used; local recognition goes on."""

    type: Literal["cloud.unavailable"] = "cloud.unavailable"
    service: str  # llm, tts, asr
    code: str  # no_api_key, unreachable, unauthorized, rate_limited, server_error, ...
    message: str
    reply_id: str | None = None
    retry_in_s: float | None = None


class ErrorEvent(BaseEvent):
    """Something failed; `stage` and `code` are stable, `message` is for humans."""

    type: Literal["error"] = "error"
    stage: str
    code: str
    message: str
    fatal: bool = False
    reply_id: str | None = None  # the reply it concerns, if any


EVENT_CLASSES: tuple[type[BaseEvent], ...] = (
    StateChanged, SpeechStarted, SpeechEnded, UtteranceStarted, UtteranceEnded, AsrPartial,
    AsrFinal, SpeakerIdentified, AccessDenied, EmotionDetected, EmotionSession, LlmStarted,
    LlmText, LlmDone, TtsStarted, TtsFinished, ReplyCancelled, CloudUnavailable, ErrorEvent,
)
Event = Annotated[
    StateChanged | SpeechStarted | SpeechEnded | UtteranceStarted | UtteranceEnded | AsrPartial
    | AsrFinal | SpeakerIdentified | AccessDenied | EmotionDetected | EmotionSession
    | LlmStarted | LlmText | LlmDone | TtsStarted | TtsFinished | ReplyCancelled
    | CloudUnavailable | ErrorEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_TYPES: tuple[str, ...] = tuple(cls.model_fields["type"].default for cls in EVENT_CLASSES)


def parse_event(data: str | bytes | dict[str, Any]) -> BaseEvent:
    """Parse a JSON string or dict back into its typed event."""
    if isinstance(data, dict):
        return EVENT_ADAPTER.validate_python(data)
    return EVENT_ADAPTER.validate_json(data)
