"""Reply commands: `say`, `chat`, `tts` and `reply/cancel`, on every surface via the registry.

`say` and `chat` speak on the daemon's outputs (local speaker, kiosks) and answer once the
reply has been heard or cut short; a new one supersedes the one in progress. `chat` answers
with the whole text; over HTTP, `POST /api/chat/stream` (agent/api/sse_chat.py) streams the
same reply as Server-Sent Events. `tts` returns a WAV or MP3 file and plays nothing.
"""

from __future__ import annotations

import base64
import io
import re
from typing import TYPE_CHECKING, Literal

import numpy as np
import soundfile as sf
from pydantic import BaseModel, Field, StrictBool, field_validator

from agent.analysis import Priority
from agent.app.commands import CallContext, Command, Empty, Payload
from agent.app.reply import Listener, attach
from agent.app.reply_voice import speech_floor_s
from agent.constants import PIPELINE_RATE
from agent.errors import ReplyError
from agent.events import BaseEvent, CloudUnavailable
from agent.reply.piper import MAX_TEXT_CHARS
from agent.reply.session import ReplyResult

if TYPE_CHECKING:
    from agent.app.core import App

#: `ctx.extra` key under which a surface hands `chat` a per-event callback (SSE).
ON_EVENT = "on_event"
_CONVERSATION = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def _text(v: str) -> str:
    if not v.strip():
        raise ValueError("the text is empty")
    return v


class SayRequest(Payload):
    """Text to speak as it is (no LLM)."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    local: StrictBool = Field(default=False, description="the local Piper voice even when "
                                                         "the cloud voice is configured")

    _check = field_validator("text")(_text)


class ChatRequest(Payload):
    """A prompt for the LLM; the reply is spoken and returned."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    conversation: str | None = Field(
        default=None, description="whose history this continues (default: the device's, "
                                  "shared with spoken questions); [A-Za-z0-9_.:-]{1,64}")

    _check = field_validator("text")(_text)

    @field_validator("conversation")
    @classmethod
    def _conv(cls, v: str | None) -> str | None:
        if v is not None and not _CONVERSATION.match(v):
            raise ValueError("1-64 characters of A-Z a-z 0-9 _ . : -")
        return v


class TtsRequest(Payload):
    """Text to synthesise into a file."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    format: Literal["wav", "mp3"] = "wav"
    local: StrictBool = False  # strict: 0 or "no" is a mistake, not false

    _check = field_validator("text")(_text)


class CloudProblem(BaseModel):
    """A cloud service that failed during the reply (the local voice took over)."""

    service: str
    code: str
    message: str


class ReplyOutcome(BaseModel):
    """How a spoken reply ended."""

    reply_id: str
    outcome: Literal["done", "degraded", "cancelled"]
    text: str  # chat: the LLM's reply; say: what was said
    audio_s: float
    first_text_ms: float | None = None  # request -> first LLM text (chat)
    first_audio_ms: float | None = None  # request -> first audio on the outputs
    backends: list[str] = []  # the TTS backends that spoke (cosyvoice, piper)
    cancel_reason: str | None = None  # barge_in, superseded, command, abandoned, shutdown
    cloud_unavailable: list[CloudProblem] = []


class TtsResult(BaseModel):
    """A synthesised file, base64-encoded."""

    format: Literal["wav", "mp3"]
    sample_rate: int
    audio_s: float
    backend: str
    voice: str
    bytes: int
    audio: str  # base64 of the file


class CancelResult(BaseModel):
    """Whether a reply was in progress."""

    cancelled: bool


def outcome(res: ReplyResult, said: str, problems: list[CloudProblem]) -> ReplyOutcome:
    """The command's answer, or the reply's error raised (its code and status)."""
    if res.outcome == "error":
        raise res.error or ReplyError("internal", "the reply failed (logged by the daemon)")
    return ReplyOutcome(
        reply_id=res.reply_id, outcome=res.outcome,  # type: ignore[arg-type]
        text=res.text or said, audio_s=round(res.audio_s, 3),
        first_text_ms=_ms(res.first_text_ms), first_audio_ms=_ms(res.first_audio_ms),
        backends=res.backends, cancel_reason=res.cancel_reason, cloud_unavailable=problems)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def encode(pcm: bytes, fmt: str) -> bytes:
    """16 kHz s16 PCM as a WAV or MP3 file (blocking: MP3 encoding is real work)."""
    buf = io.BytesIO()
    x = np.frombuffer(pcm, dtype="<i2")
    if fmt == "mp3":
        sf.write(buf, x, PIPELINE_RATE, format="MP3", subtype="MPEG_LAYER_III")
    else:
        sf.write(buf, x, PIPELINE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def register(app: App) -> None:
    """The reply capability: build the App's replies, add `say`, `chat`, `tts`, `reply/cancel`."""
    replies = attach(app)

    def collector(problems: list[CloudProblem], forward: Listener | None) -> Listener:
        def on_event(ev: BaseEvent) -> None:
            if isinstance(ev, CloudUnavailable):
                problems.append(CloudProblem(service=ev.service, code=ev.code,
                                             message=ev.message))
            if forward is not None:
                forward(ev)
        return on_event

    def check_length(text: str) -> None:
        # Refused before any synthesis: one Piper call on a page of digits holds a core for
        # minutes, and it would be cut at api.max_audio_s anyway.
        limit = app.cfg.api.max_audio_s
        if (floor := speech_floor_s(text)) > limit:
            raise ReplyError("audio_too_long", f"this text takes at least {floor:.0f} s to "
                             f"say; at most api.max_audio_s = {limit:g} s", status=413)

    async def say(req: SayRequest, ctx: CallContext) -> ReplyOutcome:
        check_length(req.text)
        problems: list[CloudProblem] = []
        res = await replies.speak(req.text, local=req.local,
                                  listener=collector(problems, ctx.extra.get(ON_EVENT)))
        return outcome(res, req.text, problems)

    async def chat(req: ChatRequest, ctx: CallContext) -> ReplyOutcome:
        problems: list[CloudProblem] = []
        res = await replies.speak(req.text, chat=True, conversation=req.conversation,
                                  listener=collector(problems, ctx.extra.get(ON_EVENT)))
        return outcome(res, "", problems)

    async def tts(req: TtsRequest, ctx: CallContext) -> TtsResult:
        check_length(req.text)
        async with app.runner.admit("upload"):
            pcm, voice = await replies.synthesize(req.text, local=req.local)
            if not pcm:
                raise ReplyError("no_audio", "nothing in the text could be spoken", status=400)
            data = await app.runner.run(encode, pcm, req.format, priority=Priority.UPLOAD,
                                        kind="audio")
        return TtsResult(format=req.format, sample_rate=PIPELINE_RATE,
                         audio_s=round(len(pcm) / 2 / PIPELINE_RATE, 3), backend=voice.backend,
                         voice=voice.voice, bytes=len(data),
                         audio=base64.b64encode(data).decode("ascii"))

    async def cancel(_: Empty, ctx: CallContext) -> CancelResult:
        return CancelResult(cancelled=await replies.session.cancel("command"))

    speak_errors: dict[int, str] = {
        400: "empty text, or longer than 5000 characters",
        413: "the speech runs past api.max_audio_s (audio_too_long)",
        429: "too many requests from this client",
        502: "the cloud voice failed and there is no local voice",
        503: "no TTS backend (the local voice is not installed and the cloud is unusable)"}
    app.commands.add(Command(
        "say", SayRequest, ReplyOutcome, say,
        "Speak a text on the daemon's speaker and kiosks (cloud voice, else the local Piper "
        "voice); answers once it has been heard or cut short", errors=speak_errors))
    app.commands.add(Command(
        "chat", ChatRequest, ReplyOutcome, chat,
        "Ask the LLM: the reply is spoken on the daemon's outputs and returned as text (stream "
        "it with POST /api/chat/stream); with the cloud unavailable, the local voice says so",
        errors=speak_errors))
    app.commands.add(Command(
        "tts", TtsRequest, TtsResult, tts,
        "Synthesise a text into a WAV or MP3 file (base64), played nowhere",
        errors={**speak_errors, 400: "empty text, or nothing in it can be spoken",
                503: "no TTS backend, or the upload queue is full (Retry-After)"}))
    app.commands.add(Command(
        "reply/cancel", Empty, CancelResult, cancel,
        "Stop the reply in progress (LLM, TTS and playback); `cancelled` says if one ran"))

