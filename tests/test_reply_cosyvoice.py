"""The native CosyVoice duplex WebSocket client (and the real SDK) against the fake server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from agent.errors import CloudError
from agent.reply.cosyvoice import CosyVoiceTts
from agent.reply.tts import aiter_texts, synthesize_all
from tests.dashscope_fake import FakeDashscope, TtsScript, fake_pcm, until


@pytest.fixture
async def fake() -> AsyncIterator[FakeDashscope]:
    async with FakeDashscope() as f:
        yield f


def client(fake: FakeDashscope, **kw: object) -> CosyVoiceTts:
    opts: dict[str, object] = {"api_key": fake.api_key, "ws_url": fake.ws_url,
                               "backoff_initial_s": 0.05}
    opts.update(kw)
    return CosyVoiceTts(**opts)  # type: ignore[arg-type]


async def run(tts: CosyVoiceTts, texts: list[str], out: bytearray | None = None) -> bytes:
    """All PCM (into `out` as it comes, so a test sees what came before an error)."""
    out = bytearray() if out is None else out
    try:
        async for pcm in tts.synthesize(aiter_texts(texts)):
            assert len(pcm) % 2 == 0
            out += pcm
    finally:
        await tts.aclose()
    return bytes(out)


async def test_streams_pcm_for_every_text_chunk(fake: FakeDashscope) -> None:
    texts = ["Hello there, how are you?", "今天天气很好。"]
    tts = client(fake, voice="longwan_v2", model="cosyvoice-v2")
    pcm = await run(tts, texts)
    assert pcm == fake_pcm(texts[0]) + fake_pcm(texts[1])
    rec = fake.tts_log[0]
    run_task = rec.run_task
    assert run_task is not None
    assert run_task["header"]["action"] == "run-task"
    assert run_task["header"]["streaming"] == "duplex"
    params = run_task["payload"]["parameters"]
    assert (params["format"], params["sample_rate"], params["voice"]) == ("pcm", 16000,
                                                                          "longwan_v2")
    assert run_task["payload"]["model"] == "cosyvoice-v2"
    assert [t for _, t in rec.texts] == texts
    assert rec.directive is None and rec.t_finish is not None
    assert rec.headers["Authorization"] == f"Bearer {fake.api_key}"
    assert rec.closed_by_client


async def test_real_sdk_streaming_call_against_the_fake(fake: FakeDashscope) -> None:
    """The fake speaks the SDK's duplex protocol: SpeechSynthesizer gets the same audio."""
    import dashscope
    from dashscope.audio.tts_v2 import AudioFormat, ResultCallback, SpeechSynthesizer

    texts = ["First sentence here.", "And a second one."]
    got = bytearray()

    class Collect(ResultCallback):
        def on_data(self, data: bytes) -> None:
            got.extend(data)

    def speak() -> None:
        saved = dashscope.api_key
        dashscope.api_key = fake.api_key
        try:
            synth = SpeechSynthesizer(model="cosyvoice-v2", voice="longxiaochun_v2",
                                      format=AudioFormat.PCM_16000HZ_MONO_16BIT,
                                      callback=Collect(), url=fake.ws_url)
            for t in texts:
                synth.streaming_call(t)
            synth.streaming_complete(complete_timeout_millis=10_000)
        finally:
            dashscope.api_key = saved

    await asyncio.wait_for(asyncio.to_thread(speak), 30)
    assert bytes(got) == fake_pcm(texts[0]) + fake_pcm(texts[1])
    assert await run(client(fake), texts) == bytes(got)


async def test_duplex_audio_flows_before_the_text_ends(fake: FakeDashscope) -> None:
    fake.tts_default = TtsScript(first_audio_s=0.0)
    tts = client(fake)
    first_audio = asyncio.Event()
    sent_second = 0.0

    async def texts() -> AsyncIterator[str]:
        nonlocal sent_second
        yield "The first sentence."
        await asyncio.wait_for(first_audio.wait(), 5)  # the LLM is still thinking
        sent_second = time.monotonic()
        yield "The second sentence."

    pcm = bytearray()
    t_first = 0.0
    async for chunk in tts.synthesize(texts()):
        if not first_audio.is_set():
            t_first = time.monotonic()
            first_audio.set()
        pcm += chunk
    await tts.aclose()
    assert 0 < t_first < sent_second
    assert bytes(pcm) == fake_pcm("The first sentence.") + fake_pcm("The second sentence.")


async def test_sample_rate_other_than_16k_is_resampled(fake: FakeDashscope) -> None:
    text = "Resample me please."
    pcm = await run(client(fake, request_rate=24000), [text])
    assert fake.tts_log[0].run_task["payload"]["parameters"]["sample_rate"] == 24000  # type: ignore[index]
    ref = np.frombuffer(fake_pcm(text, 16000), "<i2").astype(np.float64)
    got = np.frombuffer(pcm, "<i2").astype(np.float64)
    assert abs(len(got) - len(ref)) <= 16
    n = min(len(got), len(ref))
    xc = [float(np.corrcoef(np.roll(got[:n], -k), ref[:n])[0, 1]) for k in range(0, 40)]
    assert max(xc) > 0.97  # same tones, up to the resampler's delay


@pytest.mark.parametrize(("status", "code"), [(401, "unauthorized"), (500, "server_error")])
async def test_handshake_refused(fake: FakeDashscope, status: int, code: str) -> None:
    fake.tts_default = TtsScript(reject_status=status)
    tts = client(fake, connect_timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(CloudError) as ei:
        await run(tts, ["hello"])
    assert ei.value.code == code
    assert tts.connects == (1 if status == 401 else 3)  # 5xx retried twice, 401 never
    assert time.monotonic() - t0 < 2.0 + 0.5


async def test_rate_limited_handshake_is_retried(fake: FakeDashscope) -> None:
    fake.tts_plan.append(TtsScript(reject_status=429))
    tts = client(fake)
    assert await run(tts, ["Hello again."]) == fake_pcm("Hello again.")
    assert tts.connects == 2


async def test_task_failed(fake: FakeDashscope) -> None:
    fake.tts_default = TtsScript(fail=True)
    with pytest.raises(CloudError) as ei:
        await run(client(fake), ["hello"])
    assert ei.value.code == "task_failed"
    assert "fake task failure" in ei.value.message


async def test_connection_dropped_mid_audio(fake: FakeDashscope) -> None:
    fake.tts_default = TtsScript(drop_after_bytes=6400, frame_bytes=3200)
    got = bytearray()
    t0 = time.monotonic()
    with pytest.raises(CloudError) as ei:
        await run(client(fake, idle_timeout_s=2.0), ["A rather long sentence to speak."], got)
    assert ei.value.code == "dropped"
    assert len(got) == 6400
    assert time.monotonic() - t0 < 2.0 + 0.5


async def test_slow_first_audio_times_out(fake: FakeDashscope) -> None:
    fake.tts_default = TtsScript(first_audio_s=10.0)
    t0 = time.monotonic()
    with pytest.raises(CloudError) as ei:
        await run(client(fake, first_audio_timeout_s=0.5), ["hello"])
    assert ei.value.code == "timeout"
    assert 0.45 <= time.monotonic() - t0 <= 0.5 + 0.5


async def test_slow_task_start_times_out(fake: FakeDashscope) -> None:
    fake.tts_default = TtsScript(start_delay_s=5.0)
    t0 = time.monotonic()
    with pytest.raises(CloudError) as ei:
        await run(client(fake, connect_timeout_s=0.5), ["hello"])
    assert ei.value.code == "timeout"
    assert time.monotonic() - t0 <= 0.5 + 0.5


async def test_no_text_means_no_audio(fake: FakeDashscope) -> None:
    assert await run(client(fake), []) == b""
    assert fake.tts_log[0].t_finish is not None


async def test_cancel_closes_the_socket_within_100ms(fake: FakeDashscope) -> None:
    fake.tts_default = TtsScript(frame_interval_s=0.05, frame_bytes=1600)
    tts = client(fake)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in tts.synthesize(aiter_texts(["word " * 100])):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    t_cancel = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t_cancel < 0.1
    rec = fake.tts_log[0]
    await until(lambda: rec.t_closed is not None, 1.0)
    assert rec.t_closed is not None and rec.t_closed - t_cancel < 0.1
    sent_after = rec.audio_bytes
    await asyncio.sleep(0.2)
    assert rec.audio_bytes == sent_after  # the server stopped sending
    await tts.aclose()


async def test_synthesize_all_and_no_key(fake: FakeDashscope,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tts = client(fake)
    assert await synthesize_all(tts, "One. Two.") == fake_pcm("One. Two.")
    await tts.aclose()
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    with pytest.raises(CloudError) as ei:
        await run(client(fake, api_key=None), ["x"])
    assert ei.value.code == "no_api_key"
    assert len(fake.tts_log) == 1
