"""Speaker commands: voiceprints on every surface, diarization, re-enrolment problems.

`speakers/register` (a recording, or the next N live utterances), `speakers/add_sample`,
`speakers/identify`, `speakers/verify` (two recordings, or one against an enrolled speaker),
`speakers/verify_batch`, `speakers/list`, `speakers/get`, `speakers/update`, `speakers/delete`,
`speakers/reenrolment` and `speakers/diarize`. Model calls go through the decode runner at
`Priority.UPLOAD`; store calls run in a thread. Audio is checked (decoded, long enough, not
silent, at most `speaker.max_audio_s`) before anything is written: a refused request leaves
the store as it was. List, get, update, delete and reenrolment need only the store, so they
work while the model is missing.

Speakers enrolled with another model only are listed by `speakers/reenrolment` and reported
in health (`problems`, key `speaker`) instead of being compared with incompatible vectors.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.analysis import Priority
from agent.app.asr import decode_upload, upload_bytes
from agent.app.commands import CallContext, Command, Empty, HttpBinding
from agent.app.speaker_access import (
    embed_upload,
    enrol_result,
    enrolled,
    has_audio,
    model_id,
    ms,
    one_reference,
    precheck,
    refresh_problems,
    sample_info,
    speaker_analyser,
    state,
    store_of,
    timings,
    voice_audio,
)
from agent.app.speaker_models import (
    Candidate,
    ClipError,
    DeleteResult,
    DiarizeRequest,
    DiarizeResult,
    EnrolResult,
    IdentifyRequest,
    IdentifyResult,
    Reenrolment,
    RegisterRequest,
    SampleRequest,
    SpeakerIdRequest,
    SpeakerInfo,
    SpeakerList,
    SpeakerResult,
    UpdateRequest,
    VerifyBatchRequest,
    VerifyBatchResult,
    VerifyOutcome,
    VerifyRequest,
    VerifyResult,
)
from agent.audio.decode import decode_base64
from agent.config import Config
from agent.errors import AgentError, AudioDecodeError, SpeakerError
from agent.speaker.analyser import SpeakerAnalyser
from agent.speaker.diarize import diarize
from agent.speaker.scoring import model_threshold

if TYPE_CHECKING:
    from agent.app.core import App

log = logging.getLogger(__name__)

# ---- the commands -----------------------------------------------------------------------------


def _handlers(app: App) -> dict[str, Callable[[Any, CallContext], Awaitable[Any]]]:
    async def register(p: RegisterRequest, ctx: CallContext) -> EnrolResult:
        a = speaker_analyser(app)
        t0 = time.monotonic()
        if p.utterances is not None and has_audio(p, ctx):
            raise SpeakerError("bad_request", "give a recording or `utterances`, not both")
        if p.utterances is None and not has_audio(p, ctx):
            raise AudioDecodeError("empty_audio", 'no audio: send a file, {"audio": '
                                   '"<base64>"}, or {"utterances": N} to enrol from the next '
                                   "N live utterances")
        await asyncio.to_thread(precheck, a.store, p.name, p.user_id, p.email, p.metadata)
        skipped: int = 0
        decode_ms: float | None = None
        ids: list[str | None] = [None]
        if p.utterances is not None:
            enrol = a.start_enrolment(p.name, p.utterances)
            try:
                samples = await asyncio.wait_for(asyncio.shield(enrol.done), p.timeout_s)
            except TimeoutError:
                raise SpeakerError("enrol_timeout", f"{len(enrol.samples)} of {p.utterances} "
                                   f"utterances with enough speech came within "
                                   f"{p.timeout_s:g} s; nothing was stored", status=408
                                   ) from None
            finally:
                a.end_enrolment(enrol)
            skipped, ids = enrol.skipped, list(enrol.utterances)
        else:
            async with app.runner.admit("upload"):
                emb, decode_ms = await embed_upload(app, a, upload_bytes(p, ctx))
            samples = [emb]
        sp = await asyncio.to_thread(a.store.register, p.name, samples, user_id=p.user_id,
                                     email=p.email, metadata=p.metadata)
        await refresh_problems(app)
        return enrol_result(app, sp, a.embedder.model_id,
                             [sample_info(e, u) for e, u in zip(samples, ids * len(samples),
                                                            strict=False)],
                             t0, ctx.extra.get("upload_ms"), decode_ms, skipped)

    async def add_sample(p: SampleRequest, ctx: CallContext) -> EnrolResult:
        a = speaker_analyser(app)
        t0 = time.monotonic()
        await asyncio.to_thread(a.store.get, p.speaker_id)  # 404 before any audio work
        async with app.runner.admit("upload"):
            emb, decode_ms = await embed_upload(app, a, upload_bytes(p, ctx))
        sp = await asyncio.to_thread(a.store.add_sample, p.speaker_id, emb)
        await refresh_problems(app)
        return enrol_result(app, sp, emb.model_id, [sample_info(emb)], t0,
                             ctx.extra.get("upload_ms"), decode_ms)

    async def identify(p: IdentifyRequest, ctx: CallContext) -> IdentifyResult:
        a = speaker_analyser(app)
        t0 = time.monotonic()
        async with app.runner.admit("upload"):
            audio = await voice_audio(app, upload_bytes(p, ctx))
            t1 = time.monotonic()
            ident = await app.runner.run(a.identify_audio, audio, p.top_k,
                                         priority=Priority.UPLOAD, kind="speaker")
        emb, best = ident.embedding, ident.best
        assert emb is not None  # identify_audio raises instead
        return IdentifyResult(
            speaker_id=best.speaker_id if best else None, name=best.name if best else "unknown",
            score=round(ident.matches[0].score, 4) if ident.matches else 0.0,
            is_match=best is not None, threshold=a.store.threshold, model=emb.model_id,
            candidates=[Candidate(**m.to_dict()) for m in ident.matches],
            audio_s=round(emb.audio_s, 3), speech_s=round(emb.speech_s, 2),
            timings=timings(ctx, t0, t1))

    async def verify(p: VerifyRequest, ctx: CallContext) -> VerifyResult:
        a = speaker_analyser(app)
        one_reference(p.reference, p.speaker_id)
        t0 = time.monotonic()
        sp = None if p.speaker_id is None else await enrolled(app, a.store, p.speaker_id)
        test = upload_bytes(p, ctx)
        ref = decode_base64(p.reference) if p.reference is not None else None
        async with app.runner.admit("upload"):
            audios = await asyncio.gather(*(voice_audio(app, d) for d in (test, ref)
                                            if d is not None))
            t1 = time.monotonic()
            embs = await asyncio.gather(*(app.runner.run(
                a.embedder.extract, x, priority=Priority.UPLOAD, kind="speaker")
                for x in audios))
            if sp is not None:
                m = await asyncio.to_thread(a.store.verify, sp.id, embs[0].vector,
                                            embs[0].model_id)
                score, ok = m.score, m.is_match
            else:
                score = float(np.dot(embs[0].vector, embs[1].vector))
                ok = score >= a.store.threshold
        t2 = time.monotonic()
        return VerifyResult(
            similarity=round(score, 4), is_match=ok, result="accept" if ok else "reject",
            threshold=a.store.threshold, model=embs[0].model_id,
            speaker_id=sp.id if sp else None, name=sp.name if sp else None,
            audio_s=round(embs[0].audio_s, 3), speech_s=round(embs[0].speech_s, 2),
            reference_speech_s=round(embs[1].speech_s, 2) if len(embs) > 1 else None,
            processing_time_ms=ms(t1, t2), timings=timings(ctx, t0, t1, t2))

    async def verify_batch(p: VerifyBatchRequest, ctx: CallContext) -> VerifyBatchResult:
        a = speaker_analyser(app)
        one_reference(p.reference, p.speaker_id)
        t0 = time.monotonic()
        sp = None if p.speaker_id is None else await enrolled(app, a.store, p.speaker_id)
        async with app.runner.admit("upload"):
            ref = None
            if p.reference is not None:
                ref, _ = await embed_upload(app, a, decode_base64(p.reference))

            async def one(i: int, audio_b64: str, name: str | None) -> VerifyOutcome:
                try:
                    emb, _ = await embed_upload(app, a, decode_base64(audio_b64))
                    if sp is not None:
                        m = await asyncio.to_thread(a.store.verify, sp.id, emb.vector,
                                                    emb.model_id)
                        score, ok = m.score, m.is_match
                    else:
                        assert ref is not None
                        score = float(np.dot(ref.vector, emb.vector))
                        ok = score >= a.store.threshold
                except AgentError as e:
                    return VerifyOutcome(index=i, name=name, ok=False,
                                         error=ClipError(code=e.code, message=e.message))
                return VerifyOutcome(index=i, name=name, ok=True, similarity=round(score, 4),
                                     is_match=ok, speech_s=round(emb.speech_s, 2))

            # All queued at once at upload priority: live finals still go first.
            out = await asyncio.gather(*(one(i, c.audio, c.name) for i, c in enumerate(p.tests)))
        good = [o for o in out if o.ok]
        return VerifyBatchResult(
            threshold=a.store.threshold, model=a.embedder.model_id,
            speaker_id=sp.id if sp else None, name=sp.name if sp else None,
            reference_speech_s=round(ref.speech_s, 2) if ref else None, results=list(out),
            accepted=sum(bool(o.is_match) for o in good),
            rejected=sum(not o.is_match for o in good), failed=len(out) - len(good),
            total_ms=ms(t0))

    async def list_(_: Any, ctx: CallContext) -> SpeakerList:
        store = await store_of(app)
        speakers = await asyncio.to_thread(store.list_speakers)
        stale = await refresh_problems(app)
        return SpeakerList(speakers=[SpeakerInfo.of(s) for s in speakers], count=len(speakers),
                           model=model_id(app), needs_reenrolment=[s.id for s in stale])

    async def get(p: SpeakerIdRequest, ctx: CallContext) -> SpeakerResult:
        sp = await asyncio.to_thread((await store_of(app)).get, p.speaker_id)
        return SpeakerResult(speaker=SpeakerInfo.of(sp),
                             needs_reenrolment=model_id(app) not in sp.models)

    async def update(p: UpdateRequest, ctx: CallContext) -> SpeakerResult:
        store = await store_of(app)
        sp = await asyncio.to_thread(store.update, p.speaker_id, name=p.name,
                                     user_id=p.user_id, email=p.email, metadata=p.metadata,
                                     clear=p.clear)
        return SpeakerResult(speaker=SpeakerInfo.of(sp),
                             needs_reenrolment=model_id(app) not in sp.models)

    async def delete(p: SpeakerIdRequest, ctx: CallContext) -> DeleteResult:
        sp = await asyncio.to_thread((await store_of(app)).delete, p.speaker_id)
        await refresh_problems(app)
        return DeleteResult(deleted=SpeakerInfo.of(sp))

    async def reenrolment(_: Any, ctx: CallContext) -> Reenrolment:
        stale = await refresh_problems(app)
        return Reenrolment(model=model_id(app), count=len(stale),
                           speakers=[SpeakerInfo.of(s) for s in stale])

    async def diarize_(p: DiarizeRequest, ctx: CallContext) -> DiarizeResult:
        a = speaker_analyser(app)
        cfg = app.cfg
        st = state(app)
        if st.diarizing is None:
            # One long job must not take every worker: finals need one free.
            st.diarizing = asyncio.Semaphore(max(1, app.runner.workers - 1))
        t0 = time.monotonic()
        async with app.runner.admit("upload"):
            decoded = await decode_upload(app, upload_bytes(p, ctx))
            t1 = time.monotonic()
            async with st.diarizing:
                job = functools.partial(
                    diarize, num_speakers=p.num_speakers,
                    threshold=cfg.speaker.diarize_threshold, hop_s=cfg.speaker.diarize_hop_s,
                    store=a.store, max_audio_s=cfg.api.max_audio_s)
                d = await app.runner.run(job, decoded.audio, a.embedder,
                                         priority=Priority.UPLOAD, kind="speaker")
        app.observe("speaker_diarize", time.monotonic() - t1)
        return DiarizeResult.model_validate({**d.to_dict(), "model": a.embedder.model_id,
                                             "truncated": decoded.truncated,
                                             "timings": timings(ctx, t0, t1)})

    return {"register": register, "add_sample": add_sample, "identify": identify,
            "verify": verify, "verify_batch": verify_batch, "list": list_, "get": get,
            "update": update, "delete": delete, "reenrolment": reenrolment,
            "diarize": diarize_}


def _reload(app: App) -> Callable[[Config, Config], list[str]]:
    """Threshold, top_k and the enrolment bar apply live; a new model needs a restart."""
    def hook(old: Config, new: Config) -> list[str]:
        o, n = old.speaker, new.speaker
        a = app.analysers.get("speaker")
        if isinstance(a, SpeakerAnalyser):
            a.top_k = n.top_k
            a.store.threshold = model_threshold(a.embedder.model_id, n.threshold)
            a.store.min_enrol_speech_s = n.min_enrol_speech_s
            a.embedder.min_speech_s = n.min_speech_s
        # gate_actions, allowed and the diarize_* settings are read from app.cfg when used.
        return [f"speaker.{k}" for k in ("enabled", "model", "threads", "max_audio_s")
                if getattr(o, k) != getattr(n, k)]
    return hook


def register(app: App) -> None:
    """Add the `speakers/...` commands and the config reload hook."""
    h = _handlers(app)
    unavailable = "no speaker model loaded, or the upload queue is full (Retry-After)"
    bad_audio = ("bad base64; audio that is not audio, empty, under 0.5 s, silent, or with "
                 "less than speaker.min_speech_s of speech")
    upload = {400: bad_audio, 413: "audio over speaker.max_audio_s (30 s)",
              429: "too many requests from this client", 503: unavailable}
    not_found = {404: "no such speaker (not_found)"}
    cmds: list[Command[Any, Any]] = [
        Command("speakers/list", Empty, SpeakerList, h["list"],
                "Every enrolled speaker, and who needs re-enrolment for the current model",
                http=HttpBinding("GET", "/api/speakers"), errors={503: "store unavailable"}),
        Command("speakers/reenrolment", Empty, Reenrolment, h["reenrolment"],
                "Speakers enrolled with another model only: register them again",
                http=HttpBinding("GET", "/api/speakers/reenrolment"),
                errors={503: "store unavailable"}),
        Command("speakers/get", SpeakerIdRequest, SpeakerResult, h["get"], "One speaker",
                http=HttpBinding("GET", "/api/speakers/{speaker_id}"), errors=not_found),
        Command("speakers/update", UpdateRequest, SpeakerResult, h["update"],
                "Rename a speaker or change user_id, email, metadata (`clear` empties them)",
                http=HttpBinding("PATCH", "/api/speakers/{speaker_id}"),
                errors={**not_found, 400: "bad field", 409: "name or user_id taken"}),
        Command("speakers/delete", SpeakerIdRequest, DeleteResult, h["delete"],
                "Delete a speaker and all its voiceprint samples",
                http=HttpBinding("DELETE", "/api/speakers/{speaker_id}"), errors=not_found),
        Command("speakers/register", RegisterRequest, EnrolResult, h["register"],
                "Enrol a speaker from a recording (0.5-30 s; 8 s of speech or more recognises "
                "reliably: `warning` says when it is less), or from the next `utterances` "
                "live utterances", upload=True,
                errors={**upload, 408: "live enrolment: not enough utterances in timeout_s",
                        409: "name or user_id taken, or another live enrolment is waiting"}),
        Command("speakers/add_sample", SampleRequest, EnrolResult, h["add_sample"],
                "Add a recording to an enrolled speaker's voiceprint", upload=True,
                http=HttpBinding("POST", "/api/speakers/{speaker_id}/samples"),
                errors={**upload, **not_found}),
        Command("speakers/identify", IdentifyRequest, IdentifyResult, h["identify"],
                "Who is speaking: the best `top_k` voiceprints, with similarity and is_match",
                upload=True, errors=upload),
        Command("speakers/verify", VerifyRequest, VerifyResult, h["verify"],
                "1:1 verification of a recording against a second one (`reference`) or an "
                "enrolled speaker (`speaker_id`)", upload=True,
                errors={**upload, **not_found, 409: "the speaker needs re-enrolment"}),
        Command("speakers/verify_batch", VerifyBatchRequest, VerifyBatchResult,
                h["verify_batch"], "One reference (a recording or `speaker_id`) against up "
                "to 32 base64 test clips: a similarity per clip",
                errors={400: "bad reference or fields", **not_found,
                        409: "the speaker needs re-enrolment", 429: upload[429],
                        503: unavailable}),
        Command("speakers/diarize", DiarizeRequest, DiarizeResult, h["diarize"],
                "Who spoke when: segments with start, end, label, confidence, and the names "
                "of enrolled speakers where they match", upload=True,
                errors={**upload, 400: "bad or silent audio",
                        413: "audio over api.max_audio_s"}),
    ]
    for cmd in cmds:
        app.commands.add(cmd)
    app.reload_hooks.append(_reload(app))
    app.load_hooks.append(lambda: refresh_problems(app))
