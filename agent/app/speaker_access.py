"""What the speaker commands share: the analyser, the store, audio checks, result builders.

The store is the speaker analyser's when it is loaded; otherwise one is opened for the
commands that need no model (list, get, update, delete, reenrolment), so voiceprints can be
managed while the model is missing. Model calls go through the decode runner, store calls
through a thread: none of it runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.analysis import Priority
from agent.app.asr import decode_upload
from agent.app.commands import CallContext
from agent.app.speaker_models import EnrolResult, Quality, SampleInfo, SpeakerInfo, Timings
from agent.errors import SpeakerError
from agent.speaker.analyser import SpeakerAnalyser, open_store
from agent.speaker.embedder import Embedding
from agent.speaker.scoring import EnrolmentQuality
from agent.speaker.store import Speaker, VoiceprintStore
from agent.speaker.validate import MAX_ID_FIELD, MAX_NAME, check_email, check_metadata, check_text

if TYPE_CHECKING:
    from agent.app.core import App

log = logging.getLogger(__name__)
REENROL = "speaker(s) need re-enrolment"  # marks our entry in app.problems["speaker"]


class _State:
    """Per-app: a store of our own for the model-free commands when no analyser is loaded."""

    def __init__(self) -> None:
        self.store: VoiceprintStore | None = None
        self.lock = asyncio.Lock()
        self.diarizing: asyncio.Semaphore | None = None


_STATES: weakref.WeakKeyDictionary[App, _State] = weakref.WeakKeyDictionary()


def state(app: App) -> _State:
    """The speaker commands' own state on `app`."""
    return _STATES.setdefault(app, _State())


def speaker_analyser(app: App) -> SpeakerAnalyser:
    """The loaded speaker analyser, or SpeakerError `speaker_unavailable` (503)."""
    a = app.analysers.get("speaker")
    if not isinstance(a, SpeakerAnalyser):
        raise SpeakerError("speaker_unavailable", "no speaker model is loaded (speaker.enabled "
                           "is false, the model failed to load, or the daemon is still "
                           "starting)", status=503)
    return a


def model_id(app: App) -> str:
    """The speaker model in use (the configured one while none is loaded)."""
    a = app.analysers.get("speaker")
    return a.embedder.model_id if isinstance(a, SpeakerAnalyser) else app.cfg.speaker.model


async def store_of(app: App) -> VoiceprintStore:
    """The voiceprint store: the analyser's, else one opened for the commands (off the loop)."""
    a = app.analysers.get("speaker")
    if isinstance(a, SpeakerAnalyser):
        return a.store
    st = state(app)
    async with st.lock:
        if st.store is None:
            st.store = await asyncio.to_thread(open_store, app.cfg.speaker, app.cfg.state_dir)
    return st.store


async def refresh_problems(app: App) -> list[Speaker]:
    """Put (or clear) the re-enrolment entry in `app.problems`; returns those speakers."""
    store, model = await store_of(app), model_id(app)
    stale = await asyncio.to_thread(store.needs_reenrolment, model)
    ours = app.problems.get("speaker", "").find(REENROL) >= 0
    if stale:
        names = ", ".join(s.name for s in stale[:5]) + (", ..." if len(stale) > 5 else "")
        app.problems["speaker"] = (f"{len(stale)} {REENROL} for model {model} (enrolled with "
                                   f"another model): {names}")
    elif ours:
        del app.problems["speaker"]
    return stale


def ms(t0: float, t1: float | None = None) -> float:
    return round(1000 * ((time.monotonic() if t1 is None else t1) - t0), 1)


async def voice_audio(app: App, data: bytes) -> np.ndarray:
    """An upload decoded in the runner, within speaker.max_audio_s (413 past it)."""
    decoded = await decode_upload(app, data)
    limit = app.cfg.speaker.max_audio_s
    if decoded.duration_s > limit:
        raise SpeakerError("audio_too_long", f"a voice sample is at most {limit:g} s "
                           f"(speaker.max_audio_s); got {decoded.duration_s:.1f} s", status=413)
    return decoded.audio


async def embed_upload(app: App, a: SpeakerAnalyser, data: bytes) -> tuple[Embedding, float]:
    """(embedding, audio decode ms) of an upload; SpeakerError for too short or silent audio."""
    t0 = time.monotonic()
    audio = await voice_audio(app, data)
    t1 = time.monotonic()
    emb = await app.runner.run(a.embedder.extract, audio, priority=Priority.UPLOAD,
                               kind="speaker")
    return emb, ms(t0, t1)


def precheck(store: VoiceprintStore, name: str, user_id: str | None, email: str | None,
              metadata: dict[str, Any] | None) -> None:
    """Refuse bad fields or a taken name / user_id before any audio work (blocking)."""
    nm = check_text(name, "name", MAX_NAME, required=True)
    uid = check_text(user_id, "user_id", MAX_ID_FIELD)
    check_email(email)
    check_metadata(metadata)
    assert nm is not None
    try:
        store.find(nm)
    except SpeakerError as e:
        if e.code != "not_found":
            raise
    else:
        raise SpeakerError("name_taken", f"a speaker named {nm!r} already exists", status=409)
    if uid is not None and any(s.user_id == uid for s in store.list_speakers()):
        raise SpeakerError("user_id_taken", f"user_id {uid!r} is already enrolled", status=409)


def enrol_result(app: App, sp: Speaker, model: str, added: list[SampleInfo], t0: float,
                  upload_ms: float | None, decode_ms: float | None, skipped: int = 0
                  ) -> EnrolResult:
    n, s = sp.models.get(model, (0, 0.0))
    q = EnrolmentQuality(speech_s=s, samples=n, min_speech_s=app.cfg.speaker.min_enrol_speech_s)
    total = ms(t0)
    return EnrolResult(speaker=SpeakerInfo.of(sp), model=model,
                       quality=Quality.model_validate(q.to_dict()), warning=q.warning,
                       added=added, skipped_utterances=skipped,
                       timings=Timings(upload_ms=upload_ms, audio_decode_ms=decode_ms,
                                       compute_ms=round(total - (decode_ms or 0), 1),
                                       total_ms=round(total + (upload_ms or 0), 1)))


def sample_info(emb: Embedding, utterance_id: str | None = None) -> SampleInfo:
    return SampleInfo(audio_s=round(emb.audio_s, 3), speech_s=round(emb.speech_s, 2),
                      utterance_id=utterance_id)


def has_audio(payload: Any, ctx: CallContext) -> bool:
    return ctx.attachment is not None or getattr(payload, "audio", None) is not None


def one_reference(reference: str | None, speaker_id: str | None) -> None:
    if (reference is None) == (speaker_id is None):
        raise SpeakerError("bad_request", "give exactly one of `reference` (a second "
                           "recording, base64) and `speaker_id` (an enrolled speaker)")


async def enrolled(app: App, store: VoiceprintStore, speaker_id: str) -> Speaker:
    """An enrolled speaker with a voiceprint for the current model (404 / 409 otherwise)."""
    sp = await asyncio.to_thread(store.get, speaker_id)
    if model_id(app) not in sp.models:
        raise SpeakerError("needs_reenrolment", f"speaker {sp.name!r} has no voiceprint for "
                           f"model {model_id(app)}; enrol again", status=409)
    return sp


def timings(ctx: CallContext, t0: float, t1: float, t2: float | None = None) -> Timings:
    """Decode and compute time of a request, plus its upload time when the surface knows it."""
    up = ctx.extra.get("upload_ms")
    end = time.monotonic() if t2 is None else t2
    return Timings(upload_ms=up, audio_decode_ms=ms(t0, t1), compute_ms=ms(t1, end),
                   total_ms=round(ms(t0, end) + (up or 0), 1))
