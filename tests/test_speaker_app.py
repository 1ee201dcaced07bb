"""Speaker recognition in the daemon: every command through the registry, bad input, live
enrolment, the speaker of each live utterance, re-enrolment problems, the voiceprint gate and
diarization. Real GE2E model, real shared speech, real SQLite store."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from agent import models
from agent.analysis import Utterance
from agent.app.capabilities import create_app
from agent.app.commands import CallContext
from agent.app.core import App
from agent.app.speaker_gate import decide, speaker_allowed
from agent.audio.file import FileSource
from agent.config import Config, load_config
from agent.daemon import Daemon
from agent.errors import AgentError, ModelError
from agent.events import AccessDenied, SpeakerIdentified, UtteranceEnded
from agent.speaker.analyser import SpeakerAnalyser, open_store
from agent.speaker.embedder import Embedding, Ge2eEmbedder

from .conftest import SHARED, need_shared
from .joined import join_clips
from .test_speaker_diarize import alternate, check_turns

SPEAKERS_EN = SHARED / "data" / "speakers-en"
MODEL_ID = "ge2e-resemblyzer"
A, B, C = "1688", "1998", "2414"  # a man, a woman, another man (never enrolled)
SR = 16000


# ---- shared helpers (tests/test_speaker_surfaces.py uses them too) ----------------------------


def ge2e_or_skip() -> Ge2eEmbedder:
    """The real default speaker model; a skip with the reason when it or the data is absent."""
    need_shared()
    try:
        return Ge2eEmbedder(models.path(MODEL_ID))
    except ModelError as e:
        pytest.skip(f"speaker model {MODEL_ID} not installed ({e.message}); run "
                    f"`voice-agent models install {MODEL_ID}`")


@pytest.fixture(scope="session")
def embedder() -> Ge2eEmbedder:
    """The real default speaker model, loaded once."""
    return ge2e_or_skip()


def clip_path(speaker: str, i: int) -> Path:
    return sorted((SPEAKERS_EN / speaker).glob("*.flac"))[i]


def clip_bytes(speaker: str, i: int) -> bytes:
    """A shared clip as its FLAC file."""
    return clip_path(speaker, i).read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_of(speaker: str, i: int) -> np.ndarray:
    x, sr = sf.read(clip_path(speaker, i), dtype="float32")
    assert sr == SR
    return x


def encode(x: np.ndarray, fmt: str = "WAV", rate: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype="VORBIS" if fmt == "OGG" else "PCM_16")
    return buf.getvalue()


def speaker_config(state_dir: Path, **env: str) -> Config:
    """Speaker on; ASR, emotion and replies off; the store in `state_dir`."""
    return load_config(None, env={"VOICE_AGENT__STATE_DIR": str(state_dir),
                                  "VOICE_AGENT__ASR__ENABLED": "false",
                                  "VOICE_AGENT__EMOTION__ENABLED": "false",
                                  "VOICE_AGENT__API__PORT": "0",
                                  **{f"VOICE_AGENT__{k.upper()}": v for k, v in env.items()}})


def attach(app: App, embedder: Ge2eEmbedder) -> SpeakerAnalyser:
    """The speaker analyser on `app`, with the shared model and the app's own store."""
    a = SpeakerAnalyser(embedder, open_store(app.cfg.speaker, app.cfg.state_dir), app.runner,
                        top_k=app.cfg.speaker.top_k)
    app.analysers["speaker"] = a
    return a


async def run(app: App, name: str, payload: dict[str, Any] | None = None,
              attachment: bytes | None = None, surface: str = "internal") -> Any:
    ctx = CallContext(surface=surface, attachment=attachment)  # type: ignore[arg-type]
    return await app.commands.dispatch(name, payload or {}, ctx)


async def refused(app: App, name: str, payload: dict[str, Any] | None, code: str,
                  status: int, attachment: bytes | None = None) -> str:
    with pytest.raises(AgentError) as ei:
        await run(app, name, payload, attachment)
    assert (ei.value.code, ei.value.status) == (code, status), ei.value
    assert ei.value.message
    return ei.value.message


@pytest.fixture
async def app(tmp_path: Path, embedder: Ge2eEmbedder) -> AsyncIterator[App]:
    a = create_app(speaker_config(tmp_path))
    attach(a, embedder)
    yield a
    await a.close()


def snapshot(app: App) -> list[tuple[str, str, int]]:
    """(id, name, samples) of every speaker, for "the store is untouched" checks."""
    a = app.analysers["speaker"]
    assert isinstance(a, SpeakerAnalyser)
    return [(s.id, s.name, s.samples) for s in a.store.list_speakers()]


# ---- commands ---------------------------------------------------------------------------------


async def test_register_identify_verify_and_manage(app: App) -> None:
    r = await run(app, "speakers/register", {"name": "Ann", "email": "ann@example.org",
                                             "audio": b64(clip_bytes(A, 0))})
    ann = r.speaker.id
    # 15 s clip: ~11 s of speech, over the 8 s enrolment bar
    assert r.quality.ok and r.warning is None and r.quality.speech_s >= 8
    assert r.speaker.models[MODEL_ID].samples == 1 and r.timings.compute_ms > 0
    short = await run(app, "speakers/register", {"name": "Bea"}, attachment=clip_bytes(B, 8))
    assert not short.quality.ok and "add samples" in (short.warning or "")
    bea = short.speaker.id
    more = await run(app, "speakers/add_sample", {"speaker_id": bea},
                     attachment=clip_bytes(B, 0))
    assert more.speaker.samples == 2 and more.quality.speech_s > short.quality.speech_s
    assert more.quality.ok and more.warning is None

    for spk, want in ((A, "Ann"), (B, "Bea")):
        who = await run(app, "speakers/identify", {"audio": b64(clip_bytes(spk, 5)), "top_k": 2})
        assert who.is_match and who.name == want and who.score >= who.threshold
        assert who.candidates[0].name == want and len(who.candidates) == 2
        assert who.candidates[1].score < who.candidates[0].score
    stranger = await run(app, "speakers/identify", {}, attachment=clip_bytes(C, 2))
    assert not stranger.is_match and stranger.name == "unknown" and stranger.speaker_id is None
    assert stranger.score < stranger.threshold and stranger.candidates

    same = await run(app, "speakers/verify", {"audio": b64(clip_bytes(A, 6)),
                                              "reference": b64(clip_bytes(A, 7))})
    diff = await run(app, "speakers/verify", {"audio": b64(clip_bytes(C, 1)),
                                              "reference": b64(clip_bytes(A, 7))})
    assert (same.result, diff.result) == ("accept", "reject")
    assert same.similarity > diff.similarity and same.processing_time_ms > 0
    assert same.reference_speech_s and same.speaker_id is None
    vs_id = await run(app, "speakers/verify", {"speaker_id": ann}, attachment=clip_bytes(A, 3))
    assert vs_id.is_match and vs_id.name == "Ann" and vs_id.reference_speech_s is None
    not_ann = await run(app, "speakers/verify", {"speaker_id": ann, "audio": b64(clip_bytes(B, 3))})
    assert not not_ann.is_match and not_ann.similarity < vs_id.similarity

    batch = await run(app, "speakers/verify_batch", {"speaker_id": ann, "tests": [
        {"audio": b64(clip_bytes(A, 4)), "name": "ann-4"}, {"audio": b64(clip_bytes(B, 4))},
        {"audio": b64(b"not audio at all" * 10), "name": "junk"},
        {"audio": b64(encode(np.zeros(SR * 2, np.float32)))}]})
    assert [o.index for o in batch.results] == [0, 1, 2, 3]
    assert batch.results[0].is_match and batch.results[0].name == "ann-4"
    assert batch.results[1].ok and not batch.results[1].is_match
    assert batch.results[2].error and batch.results[2].error.code == "bad_audio"
    assert batch.results[3].error and batch.results[3].error.code == "silent"
    assert (batch.accepted, batch.rejected, batch.failed) == (1, 1, 2)
    by_ref = await run(app, "speakers/verify_batch", {"reference": b64(clip_bytes(B, 1)),
                                                      "tests": [{"audio": b64(clip_bytes(B, 2))}]})
    assert by_ref.accepted == 1 and by_ref.reference_speech_s

    listed = await run(app, "speakers/list")
    assert [s.name for s in listed.speakers] == ["Ann", "Bea"] and listed.count == 2
    assert listed.needs_reenrolment == []
    upd = await run(app, "speakers/update", {"speaker_id": ann, "name": "Anne", "user_id": "u1",
                                             "metadata": {"room": "kitchen"}})
    assert upd.speaker.name == "Anne" and upd.speaker.user_id == "u1"
    got = await run(app, "speakers/get", {"speaker_id": ann})
    assert got.speaker.metadata == {"room": "kitchen"} and got.speaker.email == "ann@example.org"
    cleared = await run(app, "speakers/update", {"speaker_id": ann, "clear": ["email"]})
    assert cleared.speaker.email is None and cleared.speaker.name == "Anne"
    gone = await run(app, "speakers/delete", {"speaker_id": bea})
    assert gone.deleted.name == "Bea"
    await refused(app, "speakers/get", {"speaker_id": bea}, "not_found", 404)
    assert [n for _, n, _ in snapshot(app)] == ["Anne"]


BAD_AUDIO = [
    (b"RIFF\x00\x00\x00\x00WAVEjunk" * 8, "bad_audio", 400),
    (b"", "empty_audio", 400),
]


@pytest.mark.parametrize("command", ["speakers/register", "speakers/add_sample",
                                     "speakers/identify", "speakers/verify"])
async def test_bad_audio_is_refused_and_the_store_is_untouched(app: App, command: str) -> None:
    first = await run(app, "speakers/register", {"name": "Ann"}, attachment=clip_bytes(A, 1))
    sid = first.speaker.id
    before = snapshot(app)
    extra: dict[str, Any] = {"speakers/register": {"name": "Newcomer"}, "speakers/add_sample":
             {"speaker_id": sid}, "speakers/identify": {}, "speakers/verify":
             {"speaker_id": sid}}[command]
    cases = [*BAD_AUDIO,
             (encode(np.zeros(SR * 3, np.float32)), "silent", 400),  # digital silence
             (encode(audio_of(A, 2)[:int(0.3 * SR)]), "too_short", 400),  # under 0.5 s
             # 1 s of noise at -60 dBFS: not silent, but no speech in it
             (encode(np.random.default_rng(1).normal(0, 0.001, SR).astype(np.float32)),
              None, 400),
             (encode(np.tile(audio_of(A, 0), 3)), "audio_too_long", 413)]  # 45 s
    for data, code, status in cases:
        with pytest.raises(AgentError) as ei:
            await run(app, command, extra, attachment=data)
        assert ei.value.status == status, (code, ei.value)
        if code is not None:
            assert ei.value.code == code, ei.value
        else:
            assert ei.value.code in ("silent", "too_short"), ei.value
    await refused(app, command, {**extra, "audio": "%%% not base64"}, "bad_base64", 400)
    assert snapshot(app) == before


async def test_bad_fields_are_refused_before_any_audio_work(app: App) -> None:
    ann = (await run(app, "speakers/register", {"name": "Ann", "user_id": "ann"},
                     attachment=clip_bytes(A, 0))).speaker.id
    before = snapshot(app)
    audio = b64(clip_bytes(B, 0))
    cases: list[tuple[str, dict[str, Any], str, int]] = [
        ("speakers/register", {"audio": audio}, "bad_payload", 400),  # no name
        ("speakers/register", {"name": "x", "audio": audio, "colour": 1}, "bad_payload", 400),
        ("speakers/register", {"name": "ANN", "audio": audio}, "name_taken", 409),
        ("speakers/register", {"name": "Bo", "user_id": "ann", "audio": audio},
         "user_id_taken", 409),
        ("speakers/register", {"name": "Bo", "email": "no-at-sign", "audio": audio},
         "bad_request", 400),
        ("speakers/register", {"name": "Bo\x07", "audio": audio}, "bad_request", 400),
        ("speakers/register", {"name": "Bo", "metadata": {"k": "v" * 20000}, "audio": audio},
         "bad_request", 400),
        ("speakers/register", {"name": "Bo", "audio": audio, "utterances": 2}, "bad_request", 400),
        ("speakers/register", {"name": "Bo"}, "empty_audio", 400),
        ("speakers/register", {"name": "Bo", "utterances": 11}, "bad_payload", 400),
        ("speakers/add_sample", {"speaker_id": "f" * 32, "audio": audio}, "not_found", 404),
        ("speakers/add_sample", {"speaker_id": "../etc", "audio": audio}, "not_found", 404),
        ("speakers/identify", {"audio": audio, "top_k": 0}, "bad_payload", 400),
        ("speakers/verify", {"audio": audio}, "bad_request", 400),  # no reference at all
        ("speakers/verify", {"audio": audio, "reference": audio, "speaker_id": ann},
         "bad_request", 400),
        ("speakers/verify", {"audio": audio, "speaker_id": "0" * 32}, "not_found", 404),
        ("speakers/verify_batch", {"speaker_id": ann, "tests": []}, "bad_payload", 400),
        ("speakers/verify_batch", {"speaker_id": ann, "tests": [{"audio": audio}] * 33},
         "bad_payload", 400),
        ("speakers/verify_batch", {"reference": "@@", "tests": [{"audio": audio}]},
         "bad_base64", 400),
        ("speakers/update", {"speaker_id": ann, "name": ""}, "bad_payload", 400),
        ("speakers/update", {"speaker_id": ann, "clear": ["name"]}, "bad_payload", 400),
        ("speakers/update", {"speaker_id": "1" * 32, "name": "Zed"}, "not_found", 404),
        ("speakers/delete", {"speaker_id": "nobody"}, "not_found", 404),
        ("speakers/get", {}, "bad_payload", 400),
        ("speakers/diarize", {"num_speakers": 0, "audio": audio}, "bad_payload", 400),
        ("speakers/nope", {}, "unknown_command", 404),
    ]
    for name, payload, code, status in cases:
        await refused(app, name, payload, code, status)
    assert snapshot(app) == before


async def test_without_the_model_only_the_store_commands_work(tmp_path: Path,
                                                             embedder: Ge2eEmbedder) -> None:
    # A store written while the model was there, then a daemon whose model is missing.
    first = create_app(speaker_config(tmp_path))
    attach(first, embedder)
    ann = (await run(first, "speakers/register", {"name": "Ann"},
                     attachment=clip_bytes(A, 0))).speaker.id
    await first.close()
    app = create_app(speaker_config(tmp_path))
    try:
        assert "speaker" not in app.analysers
        assert [s.name for s in (await run(app, "speakers/list")).speakers] == ["Ann"]
        assert (await run(app, "speakers/update", {"speaker_id": ann, "name": "Anne"})
                ).speaker.name == "Anne"
        needs_model: list[tuple[str, dict[str, Any]]] = [
            ("speakers/identify", {"audio": b64(clip_bytes(A, 1))}),
            ("speakers/register", {"name": "X", "utterances": 1}),
            ("speakers/diarize", {"audio": b64(clip_bytes(A, 1))})]
        for name, payload in needs_model:
            await refused(app, name, payload, "speaker_unavailable", 503)
        assert (await run(app, "speakers/delete", {"speaker_id": ann})).deleted.name == "Anne"
    finally:
        await app.close()


# ---- the live pipeline ------------------------------------------------------------------------


async def chunks_of(x: np.ndarray, n: int = 480) -> AsyncIterator[np.ndarray]:
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    for i in range(0, len(pcm), n):
        yield pcm[i:i + n]
        await asyncio.sleep(0)


async def live(app: App, x: np.ndarray, uid: str, reason: str = "silence") -> Utterance:
    """One utterance through the speaker analyser, as the pipeline hands it over."""
    utt = Utterance(uid, "session-1", 0.0, end_s=len(x) / SR, end_reason=reason)
    await app.analysers["speaker"].analyse(utt, chunks_of(x), app.pub)
    return utt


async def test_each_utterance_gets_its_speaker(app: App) -> None:
    sub = app.bus.subscribe(100, types=["speaker.identified"])
    await run(app, "speakers/register", {"name": "Ann"}, attachment=clip_bytes(A, 0))
    ann = await live(app, audio_of(A, 6), "u-ann")
    bea = await live(app, audio_of(B, 6), "u-bea")
    tiny = await live(app, audio_of(A, 2)[:int(0.4 * SR)], "u-tiny")
    reset = await live(app, audio_of(A, 7), "u-reset", reason="reset")
    app.bus.close()
    events = [e async for e in sub if isinstance(e, SpeakerIdentified)]
    assert [e.utterance_id for e in events] == ["u-ann", "u-bea", "u-tiny"]  # not the reset
    e_ann, e_bea, e_tiny = events
    assert e_ann.is_match and e_ann.name == "Ann" and e_ann.model == MODEL_ID
    assert e_ann.session_id == "session-1" and e_ann.compute_ms > 0 and e_ann.audio_s > 7
    assert not e_bea.is_match and e_bea.name == "unknown" and e_bea.speaker_id is None
    assert e_bea.candidates and e_bea.candidates[0]["name"] == "Ann"
    assert e_tiny.name == "unknown" and e_tiny.score == 0.0 and e_tiny.candidates == []
    # Why nobody was named: said in the event (the terminal hides "no_voiceprints").
    assert (e_ann.reason, e_bea.reason, e_tiny.reason) == (None, "no_match", "too_short")
    for utt, ev in ((ann, e_ann), (bea, e_bea), (tiny, e_tiny)):
        assert utt.result_event("speaker").is_set() and utt.results["speaker"] == ev
    # Abandoned: nothing published, but whoever waits on it is not left hanging.
    assert reset.result_event("speaker").is_set() and reset.results["speaker"] is None


async def enrolment_started(a: SpeakerAnalyser) -> None:
    for _ in range(1000):  # the command has reached the analyser within a few loop turns
        if a.enrolment is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the live enrolment never started")


async def test_register_from_the_next_live_utterances(app: App) -> None:
    task = asyncio.create_task(run(app, "speakers/register", {"name": "Live", "utterances": 2,
                                                             "timeout_s": 30}))
    a = app.analysers["speaker"]
    assert isinstance(a, SpeakerAnalyser)
    await enrolment_started(a)
    await refused(app, "speakers/register", {"name": "Other", "utterances": 1},
                  "enrol_pending", 409)
    await live(app, audio_of(B, 2)[:int(0.3 * SR)], "u0")  # too little speech: skipped
    await live(app, audio_of(B, 0), "u1")
    assert not task.done()
    await live(app, audio_of(B, 3), "u2")
    r = await asyncio.wait_for(task, 10)
    assert r.speaker.name == "Live" and r.speaker.samples == 2
    assert [s.utterance_id for s in r.added] == ["u1", "u2"] and r.skipped_utterances == 1
    assert r.quality.ok and a.enrolment is None
    # Now the live utterances of that voice are hers.
    utt = await live(app, audio_of(B, 5), "u3")
    assert utt.results["speaker"].name == "Live"


async def test_live_enrolment_times_out_and_stores_nothing(app: App) -> None:
    task = asyncio.create_task(run(app, "speakers/register", {"name": "Slow", "utterances": 2,
                                                             "timeout_s": 1.0}))
    a = app.analysers["speaker"]
    assert isinstance(a, SpeakerAnalyser)
    await enrolment_started(a)
    await live(app, audio_of(A, 3), "u1")
    with pytest.raises(AgentError) as ei:
        await task
    assert (ei.value.code, ei.value.status) == ("enrol_timeout", 408)
    assert "1 of 2" in ei.value.message
    assert snapshot(app) == [] and a.enrolment is None
    # a caller that goes away (an HTTP client hanging up) takes its enrolment with it
    task = asyncio.create_task(run(app, "speakers/register", {"name": "Gone", "utterances": 1}))
    await enrolment_started(a)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.enrolment is None
    await live(app, audio_of(A, 4), "u2")
    assert snapshot(app) == []


def _other_model_sample(vec_seed: int) -> Embedding:
    v = np.random.default_rng(vec_seed).normal(size=192).astype(np.float32)
    return Embedding(v / np.linalg.norm(v), "speaker-campplus-zh-en", 5.0, 9.0)


async def test_a_model_change_lists_who_needs_reenrolment(app: App) -> None:
    a = app.analysers["speaker"]
    assert isinstance(a, SpeakerAnalyser)
    # Enrolled in the past with another model (192-d CAM++ vectors): never compared with GE2E.
    old = await asyncio.to_thread(a.store.register, "Old", [_other_model_sample(1)])
    await run(app, "speakers/register", {"name": "Ann"}, attachment=clip_bytes(A, 0))
    listed = await run(app, "speakers/list")
    assert listed.needs_reenrolment == [old.id] and listed.model == MODEL_ID
    re = await run(app, "speakers/reenrolment")
    assert re.count == 1 and re.speakers[0].name == "Old"
    assert "1 speaker(s) need re-enrolment" in app.problems["speaker"]
    assert "Old" in app.problems["speaker"]
    assert any("re-enrolment" in p for p in app.health().problems)
    assert (await run(app, "speakers/get", {"speaker_id": old.id})).needs_reenrolment
    who = await run(app, "speakers/identify", {}, attachment=clip_bytes(A, 5))
    assert [c.name for c in who.candidates] == ["Ann"]  # Old is not a candidate
    await refused(app, "speakers/verify", {"speaker_id": old.id, "audio": b64(clip_bytes(A, 5))},
                  "needs_reenrolment", 409)
    # Enrolling Old again with this model (a new sample) clears it.
    await run(app, "speakers/add_sample", {"speaker_id": old.id}, attachment=clip_bytes(C, 2))
    assert (await run(app, "speakers/reenrolment")).count == 0
    assert "speaker" not in app.problems


# ---- voiceprint-gated actions -----------------------------------------------------------------


async def test_only_enrolled_or_allowed_speakers_trigger_actions(tmp_path: Path,
                                                                  embedder: Ge2eEmbedder) -> None:
    app = create_app(speaker_config(tmp_path, speaker__gate_actions="true"))
    attach(app, embedder)
    sub = app.bus.subscribe(100, types=["access.denied"])
    try:
        await run(app, "speakers/register", {"name": "Ann"}, attachment=clip_bytes(A, 0))
        await run(app, "speakers/register", {"name": "Bea"}, attachment=clip_bytes(B, 0))
        ann = await live(app, audio_of(A, 6), "u-ann")
        stranger = await live(app, audio_of(C, 5), "u-stranger")
        tiny = await live(app, audio_of(A, 2)[:int(0.4 * SR)], "u-tiny")
        assert await speaker_allowed(app, ann) is True
        denied = await speaker_allowed(app, stranger, "reply")
        assert isinstance(denied, AccessDenied) and denied.utterance_id == "u-stranger"
        assert denied.action == "reply" and denied.name == "unknown"
        assert "under the threshold" in denied.reason
        assert isinstance(await speaker_allowed(app, tiny), AccessDenied)
        # `allowed` narrows it to the listed names (or ids): Bea is enrolled, not allowed.
        bea = await live(app, audio_of(B, 5), "u-bea")
        app.cfg = app.cfg.model_copy(update={"speaker": app.cfg.speaker.model_copy(
            update={"allowed": ["ann"]})})
        assert await speaker_allowed(app, ann, "command") is True
        no_bea = await speaker_allowed(app, bea, "command")
        assert isinstance(no_bea, AccessDenied) and no_bea.name == "Bea"
        assert "not in speaker.allowed" in no_bea.reason and no_bea.speaker_id
        # Without the speaker analyser, the gate fails closed, at once.
        loaded = app.analysers.pop("speaker")
        gone = await speaker_allowed(app, Utterance("u-x", None, 0.0), timeout_s=30)
        assert isinstance(gone, AccessDenied) and "not running" in gone.reason
        # A result that never comes is a refusal too, after the timeout.
        app.analysers["speaker"] = loaded
        late = await speaker_allowed(app, Utterance("u-late", None, 0.0), timeout_s=0.05)
        assert isinstance(late, AccessDenied) and "within" in late.reason
        app.bus.close()
        published = [e async for e in sub]
        assert [e.utterance_id for e in published] == ["u-stranger", "u-tiny", "u-bea", "u-x",
                                                       "u-late"]
    finally:
        await app.close()


def test_gate_decision_is_open_when_off() -> None:
    cfg = load_config(None, env={}).speaker
    assert not cfg.gate_actions and decide(cfg, None) == (True, "speaker.gate_actions is off")
    on = cfg.model_copy(update={"gate_actions": True})
    assert decide(on, None)[0] is False


# ---- diarization through the command ----------------------------------------------------------


async def test_diarize_command_finds_the_turns_and_names_enrolled_speakers(app: App) -> None:
    audio, truth = alternate(A, B)
    # enrol A from clips that are not in the recording
    await run(app, "speakers/register", {"name": "Ann"}, attachment=clip_bytes(A, 6))
    res = await run(app, "speakers/diarize", {}, attachment=encode(audio))
    label_of = check_turns(res, truth)  # right turns, boundaries within 0.5 s
    assert res.num_speakers == 2 and res.model == MODEL_ID and res.timings.compute_ms > 0
    named = {s.label: s.name for s in res.speakers}
    assert named[label_of[A]] == "Ann" and named[label_of[B]] is None
    assert all((t.name == "Ann") == (t.label == label_of[A]) for t in res.segments)
    told = await run(app, "speakers/diarize", {"num_speakers": 2, "audio": b64(encode(audio))})
    check_turns(told, truth)
    await refused(app, "speakers/diarize", {}, "silent", 400,
                  attachment=encode(np.zeros(SR * 5, np.float32)))


# ---- a real daemon --------------------------------------------------------------------------


@pytest.fixture
def two_voices(tmp_path: Path) -> Iterator[tuple[Path, list[tuple[float, float, str]]]]:
    """Clips of A, B, A, B joined over room tone (speech spans known), as a WAV file."""
    need_shared()
    plan = [(A, 3), (B, 3), (A, 8), (B, 1)]
    audio, spans, _ = join_clips([clip_path(s, i) for s, i in plan], 1.5, 0.5, 1.0)
    path = tmp_path / "two-voices.wav"
    sf.write(path, audio, SR, subtype="PCM_16")
    yield path, [(sp.onset, sp.offset, s) for sp, (s, _) in zip(spans, plan, strict=True)]


async def test_daemon_publishes_the_speaker_of_each_utterance(
        tmp_path: Path, embedder: Ge2eEmbedder,
        two_voices: tuple[Path, list[tuple[float, float, str]]]) -> None:
    path, truth = two_voices
    state = tmp_path / "state"
    # Ann enrolled beforehand, from clips not in the recording.
    first = create_app(speaker_config(state))
    attach(first, embedder)
    await run(first, "speakers/register", {"name": "Ann"}, attachment=clip_bytes(A, 0))
    await first.close()
    asr = "true"
    try:
        models.path("whisper-tiny.en-int8")
    except ModelError:
        asr = "false"  # the speaker does not need ASR; with it, both run side by side
    cfg = speaker_config(state, gate__mode="vad", asr__enabled=asr)
    d = Daemon(cfg, source=FileSource(path, 30, realtime=False))
    sub = d.bus.subscribe(100_000)
    assert await d.run() == 0
    events = [e async for e in sub]
    assert d.app.analysers["speaker"].model_id == MODEL_ID  # built by the registry
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    speakers = {e.utterance_id: e for e in events if isinstance(e, SpeakerIdentified)}
    assert len(ended) >= len(truth)
    assert {e.utterance_id for e in ended} == set(speakers)  # one event for each utterance
    for u in ended:
        who = max(truth, key=lambda t: min(t[1], u.audio_end_s) - max(t[0], u.audio_start_s))[2]
        ev = speakers[u.utterance_id]
        if u.duration_s >= 2.0:  # enough speech to tell
            assert ev.is_match == (who == A), (u, ev)
            assert ev.name == ("Ann" if who == A else "unknown")
    if asr == "true":
        finals = {e.utterance_id for e in events if e.type == "asr.final"}
        assert finals == set(speakers)
    last = d.app.snapshot().last_speaker
    assert last is not None and last.utterance_id == ended[-1].utterance_id
