"""The typed event vocabulary: every event the daemon publishes, in one place."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

GateState = Literal["closed", "open"]
GateMode = Literal["ptt", "ptt_toggle", "vad"]
EndReason = Literal["silence", "max_length", "ptt_stop", "reset", "end_of_stream", "shutdown"]


class BaseEvent(BaseModel):
    """Fields every event carries: who, which session/utterance, and when."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    device_id: str
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
    # True when a partial decode had already covered all the audio (`decode_ms` is its time).
    speculative: bool = False


class ErrorEvent(BaseEvent):
    """Something failed; `stage` and `code` are stable, `message` is for humans."""

    type: Literal["error"] = "error"
    stage: str
    code: str
    message: str
    fatal: bool = False


Event = Annotated[
    StateChanged | SpeechStarted | SpeechEnded | UtteranceStarted | UtteranceEnded | AsrPartial
    | AsrFinal | ErrorEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_TYPES: tuple[str, ...] = tuple(
    cls.model_fields["type"].default
    for cls in (StateChanged, SpeechStarted, SpeechEnded, UtteranceStarted, UtteranceEnded,
                AsrPartial, AsrFinal, ErrorEvent)
)


def parse_event(data: str | bytes | dict[str, Any]) -> BaseEvent:
    """Parse a JSON string or dict back into its typed event."""
    if isinstance(data, dict):
        return EVENT_ADAPTER.validate_python(data)
    return EVENT_ADAPTER.validate_json(data)
