"""Speech emotion commands, and the hooks `/ws/asr` uses for its connections' sessions.

Commands: `emotion/analyze` (one recording: multipart, an audio body, or JSON base64),
`emotion/batch` (a JSON list of base64 clips), `emotion/session` (`GET
/api/emotion/session/{session_id}`: a session's summary so far, or its final one; sessions
are kept by `agent.app.emotion_sessions`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field

from agent.analysis import Priority
from agent.app.asr import TranscribeRequest, decode_upload, upload_bytes
from agent.app.commands import CallContext, Command, HttpBinding, Payload
from agent.app.emotion_sessions import EmotionSessions, SessionView
from agent.audio.decode import Decoded, decode_base64
from agent.emotion.analyser import EmotionAnalyser
from agent.emotion.ensemble import EnsembleClassifier, EnsembleResult
from agent.errors import AgentError, EmotionError
from agent.events import EmotionDetected

if TYPE_CHECKING:
    from agent.app.core import App

log = logging.getLogger(__name__)

#: Clips in one `emotion/batch` request.
MAX_BATCH = 32


# ---- command models ---------------------------------------------------------------------------


class SessionRequest(Payload):
    """Which session."""

    session_id: str = Field(min_length=1, max_length=64)


class AnalyzeRequest(TranscribeRequest):
    """A recording as base64 (JSON surfaces), unless it came as a file (multipart, raw body)."""


class ModelResult(BaseModel):
    """One model's verdict."""

    model: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    compute_ms: float
    calibrated: bool = True


class AnalyzeTimings(BaseModel):
    """Where the time went, in ms."""

    upload_ms: float | None = None
    audio_decode_ms: float
    compute_ms: float
    total_ms: float


class AnalyzeResult(BaseModel):
    """The emotion of a recording: the final result and each model's."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    model: str  # the model, or the ensemble's ids joined by '+'
    models: list[ModelResult]
    best_model: str
    models_consensus: bool
    duration_s: float
    sample_rate: int  # of the upload (the models see it at 16 kHz, as the live pipeline does)
    channels: int
    truncated: bool = False
    timings: AnalyzeTimings


class Clip(Payload):
    """One clip of a batch."""

    audio: str = Field(description="base64 of a WAV/FLAC/MP3/OGG file (data: URL allowed)")
    name: str | None = Field(default=None, max_length=200, description="echoed back")


class BatchRequest(Payload):
    """Clips to analyse, as base64."""

    clips: list[Clip] = Field(min_length=1, max_length=MAX_BATCH)


class ClipError(BaseModel):
    """Why one clip failed."""

    code: str
    message: str


class ClipOutcome(BaseModel):
    """One clip's result or error."""

    index: int
    name: str | None = None
    ok: bool
    result: AnalyzeResult | None = None
    error: ClipError | None = None


class BatchResult(BaseModel):
    """Each clip's outcome, in order."""

    clips: list[ClipOutcome]
    ok: int
    failed: int
    total_ms: float


# ---- commands ---------------------------------------------------------------------------------


def emotion_analyser(app: App) -> EmotionAnalyser:
    """The loaded emotion analyser, or EmotionError `emotion_unavailable` (503)."""
    a = app.analysers.get("emotion")
    if not isinstance(a, EmotionAnalyser):
        raise EmotionError("emotion_unavailable", "no emotion model is loaded (emotion.enabled "
                           "is false, the model failed to load, or the daemon is still "
                           "starting)", status=503)
    return a


def _sessions(app: App) -> EmotionSessions:
    s = emotion_analyser(app).sessions
    if not isinstance(s, EmotionSessions):
        raise EmotionError("emotion_unavailable", "emotion sessions are not tracked",
                           status=503)
    return s


def _result(r: EnsembleResult, decoded: Decoded, upload_ms: float | None, t0: float, t1: float,
            t2: float) -> AnalyzeResult:
    f = r.event_fields()
    return AnalyzeResult(
        label=f["label"], confidence=f["confidence"], probabilities=f["probabilities"],
        model=f["model"], models=[ModelResult(**m.to_dict()) for m in r.models],
        best_model=r.best_model, models_consensus=r.models_consensus,
        duration_s=round(decoded.duration_s, 3), sample_rate=decoded.sample_rate,
        channels=decoded.channels, truncated=decoded.truncated,
        timings=AnalyzeTimings(upload_ms=upload_ms, audio_decode_ms=round(1000 * (t1 - t0), 1),
                               compute_ms=round(1000 * (t2 - t1), 1),
                               total_ms=round(1000 * (t2 - t0) + (upload_ms or 0), 1)))


async def analyze_bytes(app: App, classifier: EnsembleClassifier, data: bytes,
                        upload_ms: float | None = None) -> AnalyzeResult:
    """Decode and classify one recording in the runner (AgentError for bad audio)."""
    t0 = time.monotonic()
    decoded = await decode_upload(app, data)
    t1 = time.monotonic()
    r = await app.runner.run(classifier.classify, decoded.audio, priority=Priority.UPLOAD,
                             kind="emotion")
    t2 = time.monotonic()
    app.observe("emotion_compute", t2 - t1)
    return _result(r, decoded, upload_ms, t0, t1, t2)


def register(app: App) -> None:
    """Add `emotion/analyze`, `emotion/batch` and `emotion/session`."""

    async def analyze(payload: AnalyzeRequest, ctx: CallContext) -> AnalyzeResult:
        clf = emotion_analyser(app).classifier
        async with app.runner.admit("upload"):
            return await analyze_bytes(app, clf, upload_bytes(payload, ctx),
                                       ctx.extra.get("upload_ms"))

    async def batch(payload: BatchRequest, ctx: CallContext) -> BatchResult:
        clf = emotion_analyser(app).classifier
        t0 = time.monotonic()

        async def one(i: int, clip: Clip) -> ClipOutcome:
            try:
                result = await analyze_bytes(app, clf, decode_base64(clip.audio))
            except AgentError as e:
                return ClipOutcome(index=i, name=clip.name, ok=False,
                                   error=ClipError(code=e.code, message=e.message))
            return ClipOutcome(index=i, name=clip.name, ok=True, result=result)

        async with app.runner.admit("upload"):
            # All queued at once at upload priority: live finals still go first.
            outcomes = await asyncio.gather(*(one(i, c) for i, c in enumerate(payload.clips)))
        ok = sum(o.ok for o in outcomes)
        return BatchResult(clips=list(outcomes), ok=ok, failed=len(outcomes) - ok,
                           total_ms=round(1000 * (time.monotonic() - t0), 1))

    async def session(payload: SessionRequest, ctx: CallContext) -> SessionView:
        view = _sessions(app).view(payload.session_id)
        if view is None:
            raise EmotionError("unknown_session", f"no emotion session "
                               f"{payload.session_id!r} (never seen, or forgotten: the newest "
                               f"{app.cfg.emotion.max_sessions} are kept)", status=404)
        return view

    bad = {400: "bad base64, bad, empty, too short (under emotion.min_audio_s) or silent audio",
           413: "audio longer than api.max_audio_s", 429: "too many requests from this client",
           503: "no emotion model loaded, or the upload queue is full (Retry-After)"}
    app.commands.add(Command(
        "emotion/analyze", AnalyzeRequest, AnalyzeResult, analyze,
        "Speech emotion of a recording (WAV/FLAC/MP3/OGG; others via ffmpeg): each model's "
        "result and the final one", upload=True, errors=bad))
    app.commands.add(Command(
        "emotion/batch", BatchRequest, BatchResult, batch,
        f"Speech emotion of up to {MAX_BATCH} base64 clips: per-clip results or errors",
        errors={400: "no clips, more than the limit, or a bad field",
                429: bad[429], 503: bad[503]}))
    app.commands.add(Command(
        "emotion/session", SessionRequest, SessionView, session,
        "A session's emotion summary: distribution, dominant emotion, stability, valence "
        "(0-100)", http=HttpBinding(method="GET", path="/api/emotion/session/{session_id}"),
        errors={404: "unknown session (unknown_session)", 503: bad[503]}))


# ---- /ws/asr connections ----------------------------------------------------------------------


def open_stream(app: App, session_id: str) -> None:
    """A `/ws/asr` connection began: its utterances form one session."""
    a = app.analysers.get("emotion")
    if isinstance(a, EmotionAnalyser) and isinstance(a.sessions, EmotionSessions):
        a.sessions.open_stream(session_id)


async def analyse_stream_utterance(app: App, session_id: str, utterance_id: str,
                                   audio: np.ndarray) -> EmotionDetected | None:
    """Publish `emotion.detected` for one `/ws/asr` utterance (float32 16 kHz); None if none."""
    a = app.analysers.get("emotion")
    if not isinstance(a, EmotionAnalyser):
        return None
    return await a.classify_clip(audio, app.pub, session_id, utterance_id)


def end_stream(app: App, session_id: str) -> None:
    """The `/ws/asr` connection closed: its summary follows once its utterances are done."""
    a = app.analysers.get("emotion")
    if isinstance(a, EmotionAnalyser) and isinstance(a.sessions, EmotionSessions):
        a.sessions.end(session_id)
