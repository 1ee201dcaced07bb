"""ASR commands: `asr/transcribe` (a recording in, its transcript out)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from agent.analysis import Priority
from agent.app.commands import CallContext, Command, Payload
from agent.asr.base import has_words
from agent.audio.decode import Decoded, DecodeLimits, decode_audio, decode_base64, windows
from agent.constants import PIPELINE_RATE
from agent.errors import AsrError, AudioDecodeError

if TYPE_CHECKING:
    from agent.app.core import App


class TranscribeRequest(Payload):
    """A recording as base64 (JSON surfaces), unless it came as a file (multipart, raw body)."""

    audio: str | None = Field(
        default=None, description="base64 of a WAV/FLAC/MP3/OGG (others via ffmpeg) file; a "
                                  "data: URL prefix is allowed")


class Timings(BaseModel):
    """Where the time went, in ms."""

    upload_ms: float | None = None
    audio_decode_ms: float
    decode_ms: float
    total_ms: float
    rtf: float | None


class TranscribeResult(BaseModel):
    """The transcript of a recording."""

    text: str
    language: str | None
    model: str
    audio_s: float
    windows: int
    truncated: bool = False  # the file ended before its header said: this is what there was
    timings: Timings


def upload_bytes(payload: TranscribeRequest, ctx: CallContext) -> bytes:
    """The recording, whichever way it came."""
    if ctx.attachment is not None:
        return ctx.attachment
    if payload.audio is None:
        raise AudioDecodeError("empty_audio", 'no audio: send a file, or {"audio": "<base64>"}')
    return decode_base64(payload.audio)


async def decode_upload(app: App, data: bytes) -> Decoded:
    """Decode an upload in the runner (its CPU counts against the same cores)."""
    limits = DecodeLimits(app.cfg.api.max_audio_s, app.cfg.api.max_decode_samples)
    return await app.runner.run(decode_audio, data, limits, priority=Priority.UPLOAD,
                                kind="audio")


def register(app: App) -> None:
    """Add `asr/transcribe`."""

    async def transcribe(payload: TranscribeRequest, ctx: CallContext) -> TranscribeResult:
        engine = app.asr_engine
        if engine is None:
            raise AsrError("asr_unavailable", "no ASR model is loaded (asr.enabled is false, "
                           "the model failed to load, or the daemon is still starting)")
        t0 = time.monotonic()
        async with app.runner.admit("upload"):
            decoded = await decode_upload(app, upload_bytes(payload, ctx))
            t1 = time.monotonic()
            texts: list[str] = []
            language = engine.language
            parts = windows(decoded.audio)
            for part in parts:
                result = await app.runner.run(engine.transcribe, part, priority=Priority.UPLOAD)
                # Whisper's non-speech tags ([BLANK_AUDIO], [ Silence ]) are not words.
                if has_words(result.text):
                    texts.append(result.text)
                language = result.language or language
            t2 = time.monotonic()
        audio_s = len(decoded.audio) / PIPELINE_RATE
        upload_ms = ctx.extra.get("upload_ms")
        app.observe("transcribe_audio_decode", t1 - t0)
        app.observe("transcribe_decode", t2 - t1)
        app.observe("transcribe_total", t2 - t0 + (upload_ms or 0) / 1000)
        return TranscribeResult(
            text=" ".join(texts), language=language, model=engine.model_id,
            audio_s=round(audio_s, 3), windows=len(parts), truncated=decoded.truncated,
            timings=Timings(upload_ms=upload_ms, audio_decode_ms=round(1000 * (t1 - t0), 1),
                            decode_ms=round(1000 * (t2 - t1), 1),
                            total_ms=round(1000 * (t2 - t0) + (upload_ms or 0), 1),
                            rtf=round((t2 - t1) / audio_s, 4) if audio_s else None))

    app.commands.add(Command(
        "asr/transcribe", TranscribeRequest, TranscribeResult, transcribe,
        "Recognise a recording (WAV/FLAC/MP3/OGG; others via ffmpeg)", upload=True,
        errors={400: "bad base64, bad or empty audio", 413: "audio longer than api.max_audio_s "
                "or more decoding work than api.max_decode_samples",
                429: "too many requests from this client", 503: "no ASR model loaded, or the "
                "upload queue is full (Retry-After)"}))
