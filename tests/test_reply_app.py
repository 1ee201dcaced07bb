"""Replies in the daemon: commands on every surface, triggers, barge-in, faults, half duplex.

A real daemon (API on a loopback port, the reply service, the real DashScope clients) talks
to the loopback fake cloud (`tests/dashscope_fake.py`); the local voice is the real Piper.
Audio is checked byte for byte: the fake's tones are a function of the text it was sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile as sf

from agent import models
from agent.api.openapi import build_spec
from agent.api.server import ApiService
from agent.api.ws_tts import openapi_ops
from agent.app.reply import ReplyService, replies_of
from agent.app.reply_outputs import KioskHub
from agent.audio.base import AudioSource
from agent.bus import EventBus, Publisher
from agent.config import load_config
from agent.daemon import Daemon
from agent.errors import ModelError
from agent.events import AccessDenied, AsrFinal, BaseEvent
from agent.pipeline.chain import Audio, gate_stage
from agent.pipeline.gate import GateController
from tests.conftest import ASR_EN, REPO, Joined, asr_en_rows, need_shared
from tests.dashscope_fake import FakeDashscope, LlmScript, TtsScript, fake_pcm, fake_reply, until
from tests.sources import SilentSource

WAIT_S = 20.0
BASE_ENV = {"api__port": "0", "gate__mode": "ptt", "asr__enabled": "false",
            "playback__enabled": "false", "emotion__enabled": "false",
            "reply__llm__first_text_timeout_s": "1.0", "reply__llm__idle_timeout_s": "1.0",
            "reply__cosyvoice__connect_timeout_s": "1.0",
            "reply__cosyvoice__first_audio_timeout_s": "1.0",
            "reply__cosyvoice__idle_timeout_s": "1.0", "dashscope__retries": "1",
            "dashscope__backoff_initial_s": "0.05", "dashscope__backoff_max_s": "0.1"}
MAX_BARGE_IN_S = 0.100


def need_piper() -> None:
    """Skip, saying how to get it, when the local voice is not installed."""
    pytest.importorskip("piper", reason="piper-tts not installed (pip install piper-tts)")
    try:
        models.path("piper-joe-us")
    except ModelError as e:
        pytest.skip(f"Piper voice not installed: {e.message}")


def cloud_env(fake: FakeDashscope | None) -> dict[str, str]:
    """Config pointing the clients at the fake (no key at all when `fake` is None)."""
    if fake is None:
        return {}
    return {"dashscope__api_key": fake.api_key, "dashscope__base_url": fake.http_base,
            "dashscope__ws_url": fake.ws_url}


class Tap:
    """An extra audio output that keeps exactly what the reply session wrote."""

    name = "tap"

    def __init__(self) -> None:
        self.pcm = bytearray()
        self.begun = 0
        self.aborted = 0

    async def begin(self, reply_id: str, sample_rate: int) -> None:
        self.begun += 1
        self.pcm.clear()

    async def write(self, pcm: bytes) -> None:
        self.pcm += pcm

    async def end(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted += 1


@dataclass
class Running:
    """A daemon that runs, its API's base URL, an HTTP session and everything it published."""

    d: Daemon
    base: str
    http: aiohttp.ClientSession
    events: list[BaseEvent] = field(default_factory=list)
    tap: Tap = field(default_factory=Tap)

    def of(self, type_: str, **match: Any) -> list[Any]:
        """Events of one type whose fields match."""
        return [e for e in self.events if e.type == type_
                and all(getattr(e, k) == v for k, v in match.items())]

    async def wait(self, type_: str, within_s: float = WAIT_S, **match: Any) -> Any:
        """The first event of `type_` matching, waiting for it."""
        assert await until(lambda: self.of(type_, **match), within_s), \
            f"no {type_} {match}; got {[e.type for e in self.events]}"
        return self.of(type_, **match)[0]

    async def post(self, path: str, body: dict[str, Any] | None = None,
                   status: int = 200) -> dict[str, Any]:
        """POST JSON, check the status, return the JSON answer."""
        r = await self.http.post(self.base + path, json=body or {})
        data: dict[str, Any] = await r.json()
        assert r.status == status, (path, r.status, data)
        return data


@asynccontextmanager
async def reply_daemon(fake: FakeDashscope | None, *, source: AudioSource | None = None,
                       build_analysers: bool = False, config_source: bool = False,
                       settings: Mapping[str, str] | None = None,
                       **env: str) -> AsyncIterator[Running]:
    """`voice-agent run` in this process with the API and the reply service.

    The source is `source`, the configured one (`config_source`, e.g. a microphone), or
    silence; `settings` and `env` are config as `section__key=value`.
    """
    merged = {**BASE_ENV, **cloud_env(fake), **(settings or {}), **env}
    cfg = load_config(None, env={f"VOICE_AGENT__{k.upper()}": v for k, v in merged.items()})
    d = Daemon(cfg, analysers=None if build_analysers else [],
               source=None if config_source else source or SilentSource(30))
    if not any(isinstance(s, ReplyService) for s in d.services):
        d.services.append(ReplyService(d.app))  # until daemon.build_services lists it
    sub = d.bus.subscribe(100_000, name="test")
    run = Running(d, "", aiohttp.ClientSession())
    replies_of(d.app).session.outputs.append(run.tap)

    async def record() -> None:
        async for ev in sub:
            run.events.append(ev)

    recorder = asyncio.create_task(record())
    task = asyncio.create_task(d.run())
    api = next(s for s in d.services if isinstance(s, ApiService))
    try:
        assert await until(lambda: api.port is not None or task.done(), WAIT_S), "API not up"
        run.base = f"http://127.0.0.1:{api.port}"
        yield run
    finally:
        d.shutdown()
        await asyncio.wait_for(task, WAIT_S)
        await asyncio.wait_for(recorder, WAIT_S)
        await run.http.close()


def fake_audio_of(fake: FakeDashscope, n: int = -1) -> bytes:
    """What the fake TTS sent on connection `n`: the tones of the texts it received."""
    return b"".join(fake_pcm(t) for _, t in fake.tts_log[n].texts)


# ---- the half-duplex hook in the pipeline ----------------------------------------------------


async def test_muted_gate_passes_silence_and_an_explicit_open_unmutes() -> None:
    gate = GateController("ptt", Publisher(EventBus(), "t"))
    loud = [np.full(480, 1000 * (i + 1), np.int16) for i in range(6)]

    async def chunks() -> AsyncIterator[np.ndarray]:
        for i, c in enumerate(loud):
            if i == 1:
                gate.start()
            if i == 2:
                gate.mute(True)
            if i == 4:
                gate.stop()
                gate.start()  # push-to-talk while the daemon speaks: a barge-in
            yield c

    items = [x async for x in gate_stage(chunks(), gate)]
    audio = [x for x in items if isinstance(x, Audio)]
    assert [a.offset for a in audio] == [480, 960, 1440, 1920, 2400]  # stream time goes on
    assert [int(np.abs(a.samples).max()) for a in audio] == [2000, 0, 0, 5000, 6000]
    assert gate.muted is False and gate.muted_samples == 960


def _one_clip() -> Path:
    need_shared()
    return ASR_EN / asr_en_rows()[0]["file"]


@pytest.mark.parametrize("muted", [False, True], ids=["listening", "muted"])
async def test_muted_vad_finds_no_utterance_in_real_speech(muted: bool) -> None:
    from agent.audio.file import FileSource

    src = FileSource(_one_clip(), 30, realtime=False)
    cfg = load_config(None, env={"VOICE_AGENT__GATE__MODE": "vad",
                                 "VOICE_AGENT__API__ENABLED": "false"})
    d = Daemon(cfg, analysers=[], source=src)
    d.gate.mute(muted)
    sub = d.bus.subscribe(10_000, types=["utterance.started"])
    assert await asyncio.wait_for(d.run(), WAIT_S) == 0
    started = [e async for e in sub]
    assert (len(started) == 0) if muted else (len(started) >= 1)
    assert (d.gate.muted_samples > 16000) == muted


# ---- commands --------------------------------------------------------------------------------


async def test_say_streams_the_cloud_voice_to_every_output_and_kiosk() -> None:
    async with FakeDashscope() as fake, reply_daemon(fake) as run:
        frames = bytearray()
        async with run.http.ws_connect(run.base + "/ws/tts") as ws, \
                run.http.ws_connect(run.base + "/ws/tts?encoding=base64") as ws64:
            assert (await ws.receive_json())["type"] == "tts.ready"
            assert (await ws64.receive_json())["encoding"] == "base64"
            text = "The kitchen lights are on. The oven is warming up!"
            res = await run.post("/api/say", {"text": text})
            msgs: list[Any] = []
            while not (msgs and isinstance(msgs[-1], dict) and msgs[-1]["type"] == "tts.end"):
                m = await ws.receive(timeout=WAIT_S)
                if m.type == aiohttp.WSMsgType.BINARY:
                    frames += m.data
                else:
                    msgs.append(json.loads(m.data))
            b64 = bytearray()
            while (m64 := await ws64.receive_json(timeout=WAIT_S))["type"] != "tts.end":
                if m64["type"] == "tts.audio":
                    b64 += base64.b64decode(m64["data"])
        sent = fake_audio_of(fake)
        assert res["outcome"] == "done" and res["backends"] == ["cosyvoice"]
        assert res["audio_s"] == pytest.approx(len(sent) / 32000, abs=0.001)
        assert bytes(run.tap.pcm) == sent and bytes(frames) == sent and bytes(b64) == sent
        assert msgs[0] == {"type": "tts.start", "reply_id": res["reply_id"],
                           "sample_rate": 16000, "format": "s16le", "channels": 1}
        assert msgs[-1]["audio_s"] == pytest.approx(res["audio_s"], abs=0.001)
        assert "".join(t for _, t in fake.tts_log[0].texts).replace(" ", "") == \
            text.replace(" ", "")
        fin = await run.wait("tts.finished", reply_id=res["reply_id"])
        assert fin.played and fin.first_audio_ms == pytest.approx(res["first_audio_ms"], abs=1)
        # Raw audio never goes on the bus.
        assert all("pcm" not in e.model_dump() for e in run.events)
        assert replies_of(run.d.app).kiosk.replies == 1


async def test_say_without_any_cloud_speaks_with_the_local_voice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    need_piper()
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    async with reply_daemon(None) as run:
        res = await run.post("/api/say", {"text": "The front door is locked."})
        assert res["outcome"] == "degraded" and res["backends"] == ["piper"]
        assert [p["code"] for p in res["cloud_unavailable"]] == ["no_api_key"]
        assert 0.8 < res["audio_s"] < 5
        assert len(run.tap.pcm) == pytest.approx(res["audio_s"] * 32000, abs=32)
        ev = await run.wait("cloud.unavailable", service="tts")
        assert ev.code == "no_api_key" and ev.reply_id == res["reply_id"]
        local = await run.post("/api/say", {"text": "Good night.", "local": True})
        assert local["outcome"] == "done" and local["backends"] == ["piper"]
        assert local["cloud_unavailable"] == []
        assert np.abs(np.frombuffer(bytes(run.tap.pcm), "<i2")).max() > 3000  # speech, loud
        # `tts` without a cloud: the local voice, as a file.
        wav = await run.post("/api/tts", {"text": "Good night."})
        assert wav["backend"] == "piper" and wav["voice"] == "en_US-joe-medium"


async def test_chat_answers_with_the_spoken_text_and_its_events() -> None:
    async with FakeDashscope() as fake, reply_daemon(fake) as run:
        res = await run.post("/api/chat", {"text": "what is on tonight"})
        assert res["outcome"] == "done" and res["text"] == fake_reply("what is on tonight")
        assert res["first_text_ms"] is not None and res["first_audio_ms"] is not None
        rid = res["reply_id"]
        types = [e.type for e in run.events if getattr(e, "reply_id", None) == rid]
        assert types[0] == "llm.started" and types[-1] == "tts.finished"
        assert {"llm.text", "llm.done", "tts.started"} <= set(types)
        assert "".join(e.text for e in run.of("llm.text", reply_id=rid)).replace(" ", "") == \
            res["text"].replace(" ", "")
        assert bytes(run.tap.pcm) == fake_audio_of(fake)
        # The conversation goes on: the second request carries the first exchange.
        await run.post("/api/chat", {"text": "and tomorrow"})
        msgs = fake.llm_log[-1].body["input"]["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
        assert msgs[2]["content"] == res["text"]
        # Over /ws/events too (every surface dispatches the same registry).
        async with run.http.ws_connect(run.base + "/ws/events?types=llm.done") as ws:
            assert (await ws.receive_json())["type"] == "snapshot"
            await ws.send_json({"command": "chat", "text": "hello", "id": 7})
            got = [await ws.receive_json(timeout=WAIT_S) for _ in range(2)]
        result = next(g for g in got if g["type"] == "command.result")
        assert result["id"] == 7 and result["outcome"] == "done"
        assert any(g["type"] == "llm.done" and g["reply_id"] == result["reply_id"] for g in got)


def parse_sse(body: str) -> list[tuple[str, Any]]:
    """(event, JSON data) of each event of an SSE body (comments skipped)."""
    out = []
    for block in body.strip().split("\n\n"):
        lines = [ln for ln in block.splitlines() if not ln.startswith(":")]
        if not lines:
            continue
        event = next(ln[7:] for ln in lines if ln.startswith("event: "))
        data = "\n".join(ln[6:] for ln in lines if ln.startswith("data: "))
        out.append((event, json.loads(data)))
    return out


async def test_chat_stream_sends_each_event_as_it_happens() -> None:
    async with FakeDashscope() as fake, reply_daemon(fake) as run:
        fake.llm_default = LlmScript(token_interval_s=0.05)
        r = await run.http.post(run.base + "/api/chat/stream", json={"text": "tell me"})
        assert r.status == 200 and r.content_type == "text/event-stream"
        arrivals: list[float] = []
        body = ""
        async for chunk in r.content.iter_any():
            body += chunk.decode()
            arrivals.append(time.monotonic())
        events = parse_sse(body)
        names = [e for e, _ in events]
        assert names[0] == "llm.started" and names[-1] == "done"
        assert names.count("llm.text") >= 3 and "tts.started" in names
        done = events[-1][1]
        assert done["outcome"] == "done" and done["text"] == fake_reply("tell me")
        assert {d["reply_id"] for e, d in events[:-1]} == {done["reply_id"]}
        # Streamed, not buffered: the body arrived over the LLM's ~1 s, not in one piece.
        assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] > 0.5
        # Refused before streaming: plain JSON errors.
        for body_, ctype, status, code in (
                ('{"text": ""}', "application/json", 400, "bad_payload"),
                ('{"text": "x", "nope": 1}', "application/json", 400, "bad_payload"),
                ("{not json", "application/json", 400, "bad_json"),
                ("hello", "text/plain", 415, "unsupported_media_type")):
            r = await run.http.post(run.base + "/api/chat/stream", data=body_,
                                    headers={"Content-Type": ctype})
            assert r.status == status and (await r.json())["error"]["code"] == code, body_


async def test_tts_returns_a_file_and_plays_nothing() -> None:
    async with FakeDashscope() as fake, reply_daemon(fake) as run:
        text = "Three sentences. Each one its own tone. Done!"
        wav = await run.post("/api/tts", {"text": text})
        x, sr = sf.read(io.BytesIO(base64.b64decode(wav["audio"])), dtype="int16")
        assert sr == 16000 and wav["backend"] == "cosyvoice" and wav["bytes"] > 44
        assert x.tobytes() == fake_audio_of(fake)
        assert wav["audio_s"] == pytest.approx(len(x) / 16000, abs=0.001)
        mp3 = await run.post("/api/tts", {"text": text, "format": "mp3"})
        y, sr = sf.read(io.BytesIO(base64.b64decode(mp3["audio"])), dtype="float32")
        assert sr == 16000 and abs(len(y) - len(x)) < 0.1 * 16000  # encoder padding only
        assert mp3["bytes"] < wav["bytes"]
        assert run.tap.begun == 0 and not run.of("tts.started")  # no reply, nothing played
        for bad in ({"text": "x", "format": "ogg"}, {"text": "x", "local": 0}, {"text": " "},
                    {"text": "x" * 5001}, {"text": "x", "voice": "y"}):
            err = await run.post("/api/tts", bad, status=400)
            assert err["error"]["code"] == "bad_payload", bad


async def test_speech_past_the_audio_limit_is_refused() -> None:
    async with FakeDashscope() as fake, reply_daemon(fake, api__max_audio_s="26") as run:
        # 27.6 s of the fake's tones (0.46 s a sentence), at least 24 s for any voice: only
        # synthesis can tell it is too long.
        long = "Mmmmmmmmmm. " * 60
        for path in ("/api/tts", "/api/say"):
            err = await run.post(path, {"text": long}, status=413)
            assert err["error"]["code"] == "audio_too_long", path
        assert 0 < len(run.tap.pcm) <= 26 * 32000  # the outputs never got more than that
        assert len(fake.tts_log) == 2  # synthesis began, and was cut at the limit
        # Hopeless texts are refused before any synthesis.
        err = await run.post("/api/tts", {"text": "0" * 100}, status=413)
        assert "at least 30 s" in err["error"]["message"] and len(fake.tts_log) == 2
        ok = await run.post("/api/say", {"text": "Short."})
        assert ok["outcome"] == "done"


async def test_barge_in_and_cancel_stop_the_reply_at_once() -> None:
    async with FakeDashscope() as fake, reply_daemon(fake) as run:
        # 50 ms frames at real-time pace: the reply plays for seconds.
        fake.tts_default = TtsScript(frame_bytes=1600, frame_interval_s=0.05)
        async with run.http.ws_connect(run.base + "/ws/tts") as ws:
            await ws.receive_json()
            say = asyncio.create_task(run.post("/api/say", {"text": "Mmmmmmmmmmmm. " * 30}))
            got = 0
            while got < 6 * 1600:
                m = await ws.receive(timeout=WAIT_S)
                got += len(m.data) if m.type == aiohttp.WSMsgType.BINARY else 0
            t_cmd = time.monotonic()
            await run.post("/api/ptt/start")
            while (m := await ws.receive(timeout=WAIT_S)).type == aiohttp.WSMsgType.BINARY:
                pass
            t_abort = time.monotonic()
            msg = json.loads(m.data)
            res = await say
        assert msg["type"] == "tts.abort" and msg["reply_id"] == res["reply_id"]
        print(f"barge-in: kiosk told to stop {1000 * (t_abort - t_cmd):.1f} ms after PTT start")
        assert t_abort - t_cmd <= MAX_BARGE_IN_S
        assert res["outcome"] == "cancelled" and res["cancel_reason"] == "barge_in"
        ev = await run.wait("reply.cancelled", reply_id=res["reply_id"])
        assert ev.reason == "barge_in"
        assert run.tap.aborted >= 1
        # The cloud socket was closed too, and it never sent the rest.
        rec = fake.tts_log[-1]
        assert rec.t_closed is not None and rec.t_closed - t_cmd <= 0.5
        assert rec.audio_bytes < len(fake_audio_of(fake))
        # reply/cancel: nothing running -> false; running -> cancelled with reason command.
        await run.post("/api/ptt/stop")
        assert (await run.post("/api/reply/cancel"))["cancelled"] is False
        say = asyncio.create_task(run.post("/api/say", {"text": "Mmmmmmmm. " * 30}))
        assert await until(lambda: len(run.of("tts.started")) >= 2, WAIT_S)
        assert (await run.post("/api/reply/cancel"))["cancelled"] is True
        assert (await say)["cancel_reason"] == "command"


# ---- the trigger on finals, the speaker gate ------------------------------------------------


async def test_a_final_triggers_a_reply_unless_empty_or_denied() -> None:
    async with FakeDashscope() as fake, reply_daemon(fake, reply__enabled="true") as run:
        app = run.d.app
        replies = replies_of(app)

        def final(uid: str, text: str) -> AsrFinal:
            return app.pub.emit(AsrFinal, session_id="s1", utterance_id=uid, text=text,
                                language="en", model="m", audio_s=1.0, decode_ms=1.0,
                                eos_to_final_ms=1.0, partials=0)

        ev = final("u1", "What is the weather like?")
        started = await run.wait("llm.started", utterance_id="u1")
        assert started.session_id == "s1" and started.prompt == "What is the weather like?"
        done = await run.wait("tts.finished", utterance_id="u1")
        assert done.first_audio_ms is not None and done.first_audio_ms < 2000
        assert fake.llm_log[-1].t_received - ev.mono < 0.5
        # Whisper's non-words, and a speaker refused by the access check: no reply.
        final("u2", "[BLANK_AUDIO]")
        app.pub.emit(AccessDenied, utterance_id="u3", action="reply", speaker_id=None,
                     name="unknown", reason="not enrolled")
        final("u3", "Open the garage.")
        replies.gates.append(lambda e: _refuse_if(e, "u4"))
        final("u4", "Unlock the door.")
        final("u5", "Thanks.")  # still answered: the gates refuse only u4
        await run.wait("tts.finished", utterance_id="u5")
        asked = {e.utterance_id for e in run.of("llm.started")}
        assert asked == {"u1", "u5"}
        assert replies.skipped == {"no_words": 1, "denied": 2}
    # reply.enabled false (the default): finals get no reply, commands still work.
    async with FakeDashscope() as fake, reply_daemon(fake) as run:
        run.d.app.pub.emit(AsrFinal, utterance_id="u9", text="Hello there.", language="en",
                           model="m", audio_s=1.0, decode_ms=1.0, eos_to_final_ms=1.0,
                           partials=0)
        await asyncio.sleep(0.3)
        assert not run.of("llm.started") and fake.llm_log == []
    # speaker.gate_actions fails closed: without speaker recognition nobody gets a reply.
    async with FakeDashscope() as fake, reply_daemon(fake, reply__enabled="true",
                                                     speaker__gate_actions="true") as run:
        run.d.app.pub.emit(AsrFinal, utterance_id="u7", text="Open the door.", language="en",
                           model="m", audio_s=1.0, decode_ms=1.0, eos_to_final_ms=1.0,
                           partials=0)
        denied = await run.wait("access.denied", utterance_id="u7")
        assert denied.action == "reply" and "not running" in denied.reason
        await asyncio.sleep(0.2)
        assert not run.of("llm.started") and fake.llm_log == []


async def _refuse_if(ev: AsrFinal, uid: str) -> str | None:
    return "gate says no" if ev.utterance_id == uid else None


# ---- cloud faults ----------------------------------------------------------------------------

# (name, LLM scripts, TTS scripts, service, acceptable codes, at most seconds, at least seconds)
FAULTS: list[tuple[str, list[LlmScript], list[TtsScript], str, set[str], float, float]] = [
    ("llm 401", [LlmScript(status=401)], [], "llm", {"unauthorized"}, 0.5, 0.0),
    ("llm 429", [LlmScript(status=429, error_format="json")] * 2, [], "llm",
     {"rate_limited"}, 0.8, 0.0),
    ("llm 500", [LlmScript(status=500)] * 2, [], "llm", {"server_error"}, 0.8, 0.0),
    ("llm malformed SSE", [LlmScript(malformed_after=1)], [], "llm", {"bad_response"},
     0.5, 0.0),
    ("llm cut mid-text", [LlmScript(drop_after=2)], [], "llm",
     {"dropped", "unreachable", "truncated"}, 0.5, 0.0),
    ("llm error in stream", [LlmScript(stream_error_status=500)], [], "llm",
     {"server_error"}, 0.5, 0.0),
    ("llm slow first token", [LlmScript(first_token_s=5.0)], [], "llm", {"timeout"},
     1.5, 0.9),
    ("tts handshake 500", [], [TtsScript(reject_status=500)] * 2, "tts", {"server_error"},
     0.8, 0.0),
    ("tts task failed", [], [TtsScript(fail=True)], "tts", {"task_failed", "bad_request",
                                                            "server_error"}, 0.5, 0.0),
    ("tts drop mid-audio", [], [TtsScript(drop_after_bytes=6400)], "tts",
     {"dropped", "unreachable"}, 0.8, 0.0),
    ("tts slow first audio", [], [TtsScript(first_audio_s=5.0)], "tts", {"timeout"}, 1.5, 0.9),
]


async def test_every_cloud_fault_degrades_to_the_local_voice_in_time() -> None:
    need_piper()
    problems = []
    async with FakeDashscope() as fake, reply_daemon(fake) as run:
        for name, llm, tts, service, codes, at_most, at_least in FAULTS:
            fake.llm_plan.extend(llm)
            fake.tts_plan.extend(tts)
            res = await run.post("/api/chat", {"text": f"fault {name}"})
            rid = res["reply_id"]
            started = await run.wait("llm.started", reply_id=rid)
            cloud = run.of("cloud.unavailable", reply_id=rid)
            local = run.of("tts.started", reply_id=rid, backend="piper")
            took = cloud[0].mono - started.mono if cloud else None
            line = (f"{name}: outcome {res['outcome']}, cloud "
                    f"{[(c.service, c.code) for c in cloud]}, after "
                    f"{None if took is None else round(took, 3)} s, backends "
                    f"{res['backends']}")
            print(line)
            ok = (res["outcome"] == "degraded" and len(cloud) == 1
                  and cloud[0].service == service and cloud[0].code in codes
                  and took is not None and at_least <= took <= at_most and local
                  and local[0].mono >= cloud[0].mono and res["audio_s"] > 0.5
                  and [p["code"] for p in res["cloud_unavailable"]] == [cloud[0].code]
                  and run.of("tts.finished", reply_id=rid))
            if not ok:
                problems.append(line)
            fake.llm_plan.clear()
            fake.tts_plan.clear()
        # After all that, the cloud works again and nothing was left broken.
        res = await run.post("/api/chat", {"text": "all good?"})
        assert res["outcome"] == "done" and res["backends"] == ["cosyvoice"], res
    assert not problems, "\n".join(problems)


async def test_recognition_goes_on_while_the_cloud_fails(joined: Joined) -> None:
    need_piper()
    from agent.asr.wer import wer
    from agent.audio.file import FileSource

    try:
        models.path("whisper-tiny.en-int8")
    except ModelError as e:
        pytest.skip(f"ASR model not installed: {e.message}")
    refs = [r["reference"] for r in asr_en_rows()]
    async with FakeDashscope() as fake:
        fake.llm_default = LlmScript(status=500)
        src = FileSource(joined.path, 30, realtime=False)
        async with reply_daemon(fake, source=src, build_analysers=True, gate__mode="vad",
                                asr__enabled="true", reply__enabled="true") as run:
            assert await until(lambda: src.state == "ended", 120), src.state
            assert await until(lambda: len(run.of("asr.final")) >= len(refs), 60)
            await asyncio.sleep(1.0)  # the last reply fails and says so
            starts = {e.utterance_id: e.audio_start_s for e in run.of("utterance.started")}
            # Utterances are decoded in parallel: a short one's final can come first.
            finals = sorted(run.of("asr.final"), key=lambda f: starts[f.utterance_id])
            hyp = [f.text for f in finals]
            asked = run.of("llm.started")
            cloud = run.of("cloud.unavailable")
            errors = [e for e in run.of("error") if e.stage in ("asr", "analyser", "vad")]
    score = wer(refs, hyp)
    print(f"{len(finals)} finals, WER {score:.3f}; {len(asked)} replies asked, "
          f"{len(cloud)} cloud.unavailable, {len(fake.llm_log)} LLM requests")
    assert len(finals) == len(refs) and score <= 0.2
    assert errors == []
    final_ids = {f.utterance_id for f in finals}
    assert asked and {a.utterance_id for a in asked} <= final_ids
    assert cloud and all(c.service == "llm" and c.code == "server_error" for c in cloud)


# ---- kiosk queue, OpenAPI, CLI ---------------------------------------------------------------


async def test_a_kiosk_that_falls_behind_is_dropped_not_waited_for() -> None:
    hub = KioskHub(max_client_bytes=8000)
    slow, fast = hub.connect("slow"), hub.connect("fast")
    await hub.begin("r1", 16000)
    assert (await fast.get()).kind == "start"
    for _ in range(5):
        await hub.write(b"\x00\x01" * 1000)
        while fast.queued_bytes:
            await fast.get()
    assert slow.overflowed and hub.dropped == 1 and not fast.overflowed
    assert [(await slow.get()).kind] == ["overflow"]
    hub.abort()
    assert (await fast.get()).kind == "abort"
    assert fast.sent_bytes == 5 * 2000


async def test_openapi_entries_cover_the_reply_routes() -> None:
    async with FakeDashscope() as fake, reply_daemon(fake, api__key="k" * 20) as run:
        api = next(s for s in run.d.services if isinstance(s, ApiService))
        router = api.web.router
        spec = build_spec(api.ctx.cfg, run.d.app.commands, router)
        registered = {(r.method.lower(), r.resource.canonical) for r in router.routes()
                      if r.resource is not None and r.method != "HEAD"}
        documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
        ours = {k for k in openapi_ops() if k in registered}
        mine = {k for k in registered if k[1] in ("/ws/tts", "/api/chat/stream")}
        # Every route ws_tts.setup() adds is described by ws_tts.openapi_ops(), for
        # agent.api.openapi to merge; the player script is a kiosk asset (/static/{name}).
        assert mine == ours and len(mine) == 2
        assert ours - documented <= registered - documented
        assert {("post", "/api/say"), ("post", "/api/chat"), ("post", "/api/tts"),
                ("post", "/api/reply/cancel")} <= documented
        r = await run.http.get(run.base + "/static/player.js", params={"token": "k" * 20})
        assert r.status == 200 and "voiceAgentPlayer" in await r.text()
        r = await run.http.get(run.base + "/static/player.js")
        assert r.status == 401


def test_cli_say_writes_a_wav_without_playing(tmp_path: Path) -> None:
    need_piper()
    out = tmp_path / "reply.wav"
    res = subprocess.run([sys.executable, "-m", "agent", "say", "--local", "--out", str(out),
                          "Dinner is ready."], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    x, sr = sf.read(out, dtype="int16")
    assert sr == 16000 and 0.5 < len(x) / sr < 4 and np.abs(x).max() > 3000
    assert "piper" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "agent", "say", "  "], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert bad.returncode == 1 and "empty" in bad.stderr



def test_a_reload_names_the_reply_settings_that_need_a_restart() -> None:
    """reply.enabled, conversation and echo_tail_ms apply live; voices, clients, the player
    and the DashScope key are built at start, so a reload lists them as needing a restart."""
    from agent.app.reply import restart_paths

    old = load_config(None, env={})
    new = load_config(None, env={"VOICE_AGENT__REPLY__ENABLED": "true",
                                 "VOICE_AGENT__REPLY__ECHO_TAIL_MS": "500",
                                 "VOICE_AGENT__REPLY__DUPLEX": "full",
                                 "VOICE_AGENT__REPLY__PIPER__LENGTH_SCALE": "1.2",
                                 "VOICE_AGENT__PLAYBACK__BUFFER_S": "3",
                                 "VOICE_AGENT__DASHSCOPE__API_KEY": "sk-other"})
    assert restart_paths(old, new) == ["reply.duplex", "reply.piper", "playback.buffer_s",
                                       "dashscope.api_key"]
    assert restart_paths(old, old) == []
