"""The reply session end to end: real clients on the fake cloud, the real local voice."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.errors import ReplyError
from agent.events import BaseEvent
from agent.reply.cosyvoice import CosyVoiceTts
from agent.reply.llm import DashscopeLlm
from agent.reply.piper import PiperTts
from agent.reply.session import ReplySession
from tests.dashscope_fake import FakeDashscope, LlmScript, TtsScript, fake_pcm, until
from tests.test_reply_piper import piper_dir

TIMEOUT_S = 0.8  # the clients' deadlines in these tests


class Collect:
    """An audio output that keeps what it gets (optionally at real-time pace, like a speaker)."""

    def __init__(self, name: str = "collect", realtime: bool = False,
                 fail_after: int | None = None) -> None:
        self.name = name
        self.realtime = realtime
        self.fail_after = fail_after
        self.pcm = bytearray()
        self.calls: list[str] = []
        self.t_first: float | None = None
        self.t_abort: float | None = None

    async def begin(self, reply_id: str, sample_rate: int) -> None:
        self.calls.append("begin")

    async def write(self, pcm: bytes) -> None:
        if self.fail_after is not None and len(self.pcm) >= self.fail_after:
            raise ReplyError("output_gone", "the kiosk went away")
        self.t_first = self.t_first or time.monotonic()
        self.pcm += pcm
        if self.realtime:
            await asyncio.sleep(len(pcm) / 32000)

    async def end(self) -> None:
        self.calls.append("end")

    def abort(self) -> None:
        self.calls.append("abort")
        self.t_abort = time.monotonic()


class Events(list[BaseEvent]):
    """The emit callable: real, validated events, kept in order."""

    def __call__(self, cls: type[BaseEvent], **fields: Any) -> None:
        self.append(cls(device_id="test", **fields))

    def types(self) -> list[str]:
        return [e.type for e in self]

    def of(self, t: str) -> list[Any]:
        return [e for e in self if e.type == t]


@pytest.fixture(scope="module")
def local_voice() -> PiperTts:
    pytest.importorskip("piper", reason="piper-tts not installed (pip install piper-tts)")
    tts = PiperTts(piper_dir())
    tts.load()
    return tts


@pytest.fixture
async def fake() -> AsyncIterator[FakeDashscope]:
    async with FakeDashscope() as f:
        yield f


def make(fake: FakeDashscope, local_voice: PiperTts | None, *, key: str | None = "fake",
         base: str | None = None, ws: str | None = None, **kw: Any
         ) -> tuple[ReplySession, Events, Collect]:
    api_key = fake.api_key if key == "fake" else key
    events, out = Events(), kw.pop("out", Collect())
    llm = DashscopeLlm(api_key=api_key, base_url=base or fake.http_base,
                       first_text_timeout_s=TIMEOUT_S, idle_timeout_s=TIMEOUT_S,
                       backoff_initial_s=0.05, system_prompt="Be brief.")
    tts = CosyVoiceTts(api_key=api_key, ws_url=ws or fake.ws_url, connect_timeout_s=TIMEOUT_S,
                       first_audio_timeout_s=TIMEOUT_S, idle_timeout_s=TIMEOUT_S,
                       backoff_initial_s=0.05)
    session = ReplySession(events, llm=llm, tts=tts, local_tts=local_voice, outputs=[out], **kw)
    return session, events, out


async def test_reply_streams_text_to_speech_with_events(fake: FakeDashscope) -> None:
    fake.llm_default = LlmScript(token_interval_s=0.005)
    speaking: list[bool] = []
    session, events, out = make(fake, None, on_speaking=speaking.append)
    res = await session.reply("what time is it", session_id="s1", utterance_id="u1")
    await session.aclose()

    assert res.outcome == "done" and res.backends == ["cosyvoice"]
    assert events.types()[0] == "llm.started" and events.types()[-1] == "tts.finished"
    assert events.types().count("llm.done") == 1 and "cloud.unavailable" not in events.types()
    assert {(getattr(e, "reply_id", None), e.session_id, e.utterance_id) for e in events} == {
        (res.reply_id, "s1", "u1")}
    chunks = [e.text for e in events.of("llm.text")]
    assert len(chunks) >= 3 and [e.seq for e in events.of("llm.text")] == [1, 2, 3][:len(chunks)]
    assert " ".join(chunks) == events.of("llm.done")[0].text == res.text
    assert bytes(out.pcm) == b"".join(fake_pcm(c) for c in chunks)  # each chunk, spoken
    assert [t for _, t in fake.tts_log[0].texts] == chunks
    # The first sentence went to the TTS before the LLM had finished.
    assert fake.tts_log[0].texts[0][0] < fake.llm_log[0].t_done  # type: ignore[operator]
    assert out.calls == ["begin", "end"]
    assert speaking == [True, False] and not session.speaking
    done, fin = events.of("llm.done")[0], events.of("tts.finished")[0]
    assert res.first_text_ms is not None and res.first_audio_ms is not None
    assert 0 < res.first_text_ms < res.first_audio_ms
    assert done.first_text_ms > 0 and fin.first_audio_ms == res.first_audio_ms
    assert fin.audio_s == pytest.approx(len(out.pcm) / 32000) and fin.played


async def test_history_goes_into_the_next_request(fake: FakeDashscope) -> None:
    session, _, _ = make(fake, None)
    first = await session.reply("my name is Ada", conversation="kitchen")
    await session.reply("what is my name", conversation="kitchen")
    await session.reply("unrelated", conversation="hall")
    await session.aclose()
    msgs = fake.llm_log[1].body["input"]["messages"]
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1:3] == [{"role": "user", "content": "my name is Ada"},
                         {"role": "assistant", "content": first.text}]
    assert len(fake.llm_log[2].body["input"]["messages"]) == 2  # system + prompt only


async def test_barge_in_stops_llm_tts_and_output_within_100ms(fake: FakeDashscope) -> None:
    fake.llm_default = LlmScript(token_interval_s=0.02, text="Tell me more. " * 60)
    fake.tts_default = TtsScript(frame_bytes=1600, frame_interval_s=0.01)
    speaking: list[bool] = []
    session, events, out = make(fake, None, out=Collect(realtime=True),
                                on_speaking=speaking.append)
    task = asyncio.create_task(session.reply("talk to me"))
    assert await until(lambda: bool(out.pcm))
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    assert await session.cancel("barge_in")
    elapsed = time.monotonic() - t0
    res = await task
    heard = len(out.pcm)
    await asyncio.sleep(0.2)

    assert elapsed < 0.1, f"cancel took {elapsed * 1000:.0f} ms"
    assert out.t_abort is not None and out.t_abort - t0 < 0.01  # silenced first
    assert len(out.pcm) == heard  # nothing written after the cancel
    assert res.outcome == "cancelled" and res.cancel_reason == "barge_in"
    assert events.of("reply.cancelled")[0].reason == "barge_in"
    assert "tts.finished" not in events.types() and "llm.done" not in events.types()
    llm_rec, tts_rec = fake.llm_log[0], fake.tts_log[0]
    assert llm_rec.t_disconnected is not None and llm_rec.t_disconnected - t0 < 0.1
    assert tts_rec.t_closed is not None and tts_rec.t_closed - t0 < 0.1
    assert speaking == [True, False] and not session.busy
    await session.aclose()


async def test_a_new_reply_supersedes_the_old_one(fake: FakeDashscope) -> None:
    fake.llm_default = LlmScript(token_interval_s=0.02, text="Long answer here. " * 40)
    session, events, _ = make(fake, None, out=Collect(realtime=True))
    first = asyncio.create_task(session.reply("one"))
    await asyncio.sleep(0.3)
    fake.llm_default = LlmScript()
    second = await session.reply("two")
    assert (await first).cancel_reason == "superseded"
    assert second.outcome == "done"
    assert [e.reason for e in events.of("reply.cancelled")] == ["superseded"]
    await session.aclose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


FAULTS: dict[str, tuple[dict[str, Any], str, str]] = {
    # name: (what to break, service, code)
    "no_api_key": ({"key": None}, "llm", "no_api_key"),
    "network_down": ({"down": True}, "llm", "unreachable"),
    "unauthorized": ({"llm": LlmScript(status=401)}, "llm", "unauthorized"),
    "rate_limited": ({"llm": LlmScript(status=429)}, "llm", "rate_limited"),
    "server_error": ({"llm": LlmScript(status=500)}, "llm", "server_error"),
    "malformed_sse": ({"llm": LlmScript(malformed_after=0)}, "llm", "bad_response"),
    "slow_first_token": ({"llm": LlmScript(first_token_s=10)}, "llm", "timeout"),
    "ws_drop_mid_audio": ({"tts": TtsScript(drop_after_bytes=9600, frame_bytes=3200)},
                          "tts", "dropped"),
}


@pytest.mark.parametrize("fault", FAULTS)
async def test_cloud_faults_degrade_to_the_local_voice(
        fake: FakeDashscope, local_voice: PiperTts, fault: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    how, service, code = FAULTS[fault]
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    if "llm" in how:
        fake.llm_default = how["llm"]
    if "tts" in how:
        fake.tts_default = how["tts"]
    port = _closed_port() if how.get("down") else None
    session, events, out = make(
        fake, local_voice, key=how.get("key", "fake"),
        base=f"http://127.0.0.1:{port}/api/v1" if port else None,
        ws=f"ws://127.0.0.1:{port}/ws" if port else None)
    t0 = time.monotonic()
    res = await session.reply("are you there")
    await session.aclose()

    unavailable = events.of("cloud.unavailable")
    assert unavailable, events.types()
    first = unavailable[0]
    # Network down: the LLM and the TTS socket both fail, in either order.
    assert (service, code) in {(e.service, e.code) for e in unavailable}, unavailable
    assert first.mono - t0 <= TIMEOUT_S + 0.5, f"{fault} took {first.mono - t0:.2f} s"
    assert res.outcome == "degraded"
    assert res.backends[-1] == "piper"  # the local voice said why
    assert events.of("tts.started")[-1].backend == "piper"
    assert events.types()[-1] == "tts.finished"
    assert len(out.pcm) > 16000  # at least half a second of the local notice
    if fault == "ws_drop_mid_audio":
        assert res.backends == ["cosyvoice", "piper"]
        assert "llm.done" in events.types()


async def test_tts_refused_before_any_audio_the_local_voice_says_the_reply(
        fake: FakeDashscope, local_voice: PiperTts) -> None:
    fake.tts_default = TtsScript(reject_status=401)
    session, events, out = make(fake, local_voice)
    res = await session.reply("hello")
    await session.aclose()
    assert [(e.service, e.code) for e in events.of("cloud.unavailable")] == [
        ("tts", "unauthorized")]
    assert res.backends == ["piper"] and res.outcome == "degraded"
    # The whole reply in the local voice: about as long as the reply's text needs.
    assert len(out.pcm) / 32000 > 2.0


async def test_transient_rate_limit_is_retried_silently(fake: FakeDashscope) -> None:
    fake.llm_plan.append(LlmScript(status=429))
    fake.tts_plan.append(TtsScript(reject_status=503))
    session, events, _ = make(fake, None)
    res = await session.reply("hello")
    await session.aclose()
    assert res.outcome == "done" and "cloud.unavailable" not in events.types()
    assert len(fake.llm_log) == 2 and len(fake.tts_log) == 1  # the refused WS is not logged


async def test_say_works_with_no_cloud_at_all(local_voice: PiperTts) -> None:
    events, out = Events(), Collect()
    session = ReplySession(events, local_tts=local_voice, outputs=[out])
    res = await session.say("The kitchen light is on.")
    assert res.outcome == "done" and res.backends == ["piper"]
    assert events.types() == ["tts.started", "tts.finished"]
    assert len(out.pcm) > 16000
    res = await session.reply("hi")  # and a reply without an LLM is a clear error
    assert res.outcome == "error" and res.error is not None and res.error.code == "no_llm"
    assert events.of("error")[-1].code == "no_llm"


async def test_say_through_the_cloud_voice(fake: FakeDashscope) -> None:
    session, events, out = make(fake, None)
    res = await session.say("First part. Second part!")
    await session.aclose()
    assert res.backends == ["cosyvoice"]
    assert [t for _, t in fake.tts_log[0].texts] == ["First part.", "Second part!"]
    assert bytes(out.pcm) == fake_pcm("First part.") + fake_pcm("Second part!")
    assert "llm.started" not in events.types()


async def test_a_failing_output_is_dropped_and_the_others_go_on(fake: FakeDashscope) -> None:
    good, bad = Collect("speaker"), Collect("kiosk", fail_after=3200)
    events = Events()
    session = ReplySession(events, tts=CosyVoiceTts(api_key=fake.api_key, ws_url=fake.ws_url),
                           outputs=[bad, good])
    res = await session.say("A sentence long enough to need many frames of audio.")
    await session.aclose()
    assert res.outcome == "done"
    assert bytes(good.pcm) == fake_pcm("A sentence long enough to need many frames of audio.")
    assert events.of("error")[0].code == "output_gone"
    assert "end" in good.calls and "end" not in bad.calls


async def test_empty_prompt_is_an_error_event(fake: FakeDashscope) -> None:
    session, events, out = make(fake, None)
    res = await session.reply("   ")
    await session.aclose()
    assert res.outcome == "error" and res.error is not None
    assert res.error.code == "empty_prompt" and events.of("error")[0].code == "empty_prompt"
    assert fake.llm_log == [] and not out.pcm


async def test_api_key_is_never_logged_or_published(
        fake: FakeDashscope, local_voice: PiperTts, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake.llm_plan.extend([LlmScript(status=429), LlmScript(status=401)])
    session, events, _ = make(fake, local_voice)
    await session.reply("hello")
    await session.reply("hello again")
    await session.aclose()
    assert "cloud.unavailable" in events.types()
    assert fake.api_key not in caplog.text
    assert all(fake.api_key not in e.model_dump_json() for e in events)
