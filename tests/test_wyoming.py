"""The Wyoming server, driven by `wyoming.client.AsyncTcpClient` as Home Assistant drives it.

Real parts: the default Whisper model on shared speech, the local Piper voice, a real TCP
server on loopback, zeroconf's own browser for the mDNS announcement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from agent import models
from agent.app.capabilities import create_app
from agent.app.core import App
from agent.asr.analyser import AsrAnalyser
from agent.asr.base import AsrEngine
from agent.asr.wer import wer
from agent.config import SherpaOfflineAsrConfig, load_config
from agent.errors import ModelError
from agent.wyoming.config import WyomingConfig
from agent.wyoming.framing import MAX_PAYLOAD
from agent.wyoming.pcm import PcmConverter, PcmFormat, to_float
from agent.wyoming.service import WyomingService
from agent.wyoming.tts import piper_dir

from .conftest import ASR_EN, asr_en_rows, need_shared

MODEL = "whisper-tiny.en-int8"
WER_BOUND = 0.2  # as tests/test_api.py: the default model on the shared clips
CHUNK = 1024  # samples per audio-chunk, as Home Assistant and wyoming-bench send


@pytest.fixture(scope="module")
def engine() -> AsrEngine:
    """The real default model (loaded once per module)."""
    need_shared()
    try:
        models.path(MODEL)
    except ModelError as e:
        pytest.skip(f"ASR model {MODEL} not installed ({e.message})")
    from agent.asr.sherpa import make_engine

    return make_engine(SherpaOfflineAsrConfig(model=MODEL))


def have_piper() -> bool:
    try:
        import piper  # noqa: F401

        piper_dir("piper-joe-us")
    except (ImportError, ModelError):
        return False
    return True


need_piper = pytest.mark.skipif(not have_piper(), reason="Piper voice piper-joe-us or "
                                "piper-tts not installed (voice-agent models install "
                                "piper-joe-us; pip install piper-tts)")


def make_app(tmp_path: Path, engine: AsrEngine | None) -> App:
    """An App with the model loaded and ready, as the daemon has it (no pipeline)."""
    cfg = load_config(None, env={"VOICE_AGENT__DEVICE_ID": "wy-test",
                                 "VOICE_AGENT__STATE_DIR": str(tmp_path)})
    app = create_app(cfg)
    if engine is not None:
        app.analysers["asr"] = AsrAnalyser(engine, app.runner)
    app.ready.set()
    return app


@contextlib.asynccontextmanager
async def serving(app: App, **opts: Any) -> AsyncIterator[WyomingService]:
    """The service on a free loopback port; stopped like the daemon stops it."""
    wcfg = WyomingConfig(enabled=True, host="127.0.0.1", port=0, zeroconf=False,
                         **{"tts": have_piper(), **opts})
    svc = WyomingService(app, wcfg)
    task = asyncio.create_task(svc.run())
    try:
        await asyncio.wait_for(svc.bound.wait(), 30)
        yield svc
    finally:
        app.stopped.set()
        await asyncio.wait_for(task, 20)
        await app.close()


def client(svc: WyomingService, timeout: float = 60.0) -> AsyncTcpClient:
    assert svc.port is not None
    return AsyncTcpClient("127.0.0.1", svc.port, connect_timeout=5, read_timeout=timeout)


def clip(name: str) -> tuple[np.ndarray, str]:
    """A shared clip (16 kHz float32) and its reference."""
    ref = next(r["reference"] for r in asr_en_rows() if r["file"] == name)
    x, sr = sf.read(ASR_EN / name, dtype="float32")
    assert sr == 16000
    return x, ref


def encode(x: np.ndarray, width: int) -> bytes:
    """float32 -> little-endian PCM of `width` bytes (8-bit unsigned, as in WAV)."""
    x = np.clip(x, -1.0, 1.0 - 1e-6)
    if width == 1:
        return (x * 128 + 128).astype(np.uint8).tobytes()
    if width == 2:
        return (x * 32768).astype("<i2").tobytes()
    if width == 3:
        v = (x * (1 << 23)).astype(np.int32)
        return np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], -1).astype(np.uint8).tobytes()
    return (x.astype(np.float64) * 2147483648.0).astype("<i4").tobytes()


@dataclass
class Heard:
    """Events received for one request, with when they arrived (monotonic)."""

    events: list[tuple[float, Event]] = field(default_factory=list)
    stop_sent: float = 0.0

    def of(self, kind: str) -> list[Event]:
        return [e for _, e in self.events if e.type == kind]

    @property
    def types(self) -> list[str]:
        return [e.type for _, e in self.events]


async def send_audio(c: AsyncTcpClient, pcm: bytes, rate: int, width: int, channels: int,
                     pace: float = 0.0) -> None:
    """audio-start, audio-chunk per CHUNK frames (every `pace` s), no audio-stop."""
    await c.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    step = CHUNK * width * channels
    for i in range(0, len(pcm), step):
        await c.write_event(AudioChunk(rate=rate, width=width, channels=channels,
                                       audio=pcm[i:i + step]).event())
        if pace:
            await asyncio.sleep(pace)


async def read_until(c: AsyncTcpClient, heard: Heard, last: str) -> Heard:
    while True:
        ev = await c.read_event()
        assert ev is not None, f"connection closed; got {heard.types}"
        heard.events.append((time.monotonic(), ev))
        if ev.type in (last, "error"):
            return heard


async def stt(svc: WyomingService, x: np.ndarray, rate: int = 16000, width: int = 2,
              channels: int = 1, pace: float = 0.0, language: str | None = "en",
              silence_until_chunk_s: float = 0.0) -> Heard:
    """One transcription over a fresh connection, reading while sending.

    `silence_until_chunk_s`: after the speech, go on sending silence in real time until a
    transcript-chunk came (at most that long), as Home Assistant's VAD sends the silence
    after a command before it stops the stream.
    """
    heard = Heard()
    async with client(svc) as c:
        await c.write_event(Transcribe(language=language).event())
        reader = asyncio.create_task(read_until(c, heard, "transcript-stop"))
        await send_audio(c, encode(x, width), rate, width, channels, pace)
        deadline = time.monotonic() + silence_until_chunk_s
        quiet = encode(np.zeros(CHUNK * channels, np.float32), width)
        while time.monotonic() < deadline and not heard.of("transcript-chunk"):
            await c.write_event(AudioChunk(rate=rate, width=width, channels=channels,
                                           audio=quiet).event())
            await asyncio.sleep(CHUNK / rate)
        heard.stop_sent = time.monotonic()
        await c.write_event(AudioStop().event())
        await asyncio.wait_for(reader, 120)
    return heard


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def test_pcm_widths_rates_and_channels_become_16k_mono() -> None:
    t = np.arange(48000) / 48000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for width in (1, 2, 3, 4):
        back = to_float(encode(tone, width), width)
        assert np.abs(back - tone).max() < (0.01 if width == 1 else 1e-4), width
    stereo = np.stack([tone, 0.5 * tone], -1).reshape(-1)  # interleaved L/R
    conv = PcmConverter(PcmFormat(48000, 3, 2))
    pcm = encode(stereo, 3)
    # Odd-sized chunks: frames split across chunk boundaries must be carried, not lost.
    out = np.concatenate([conv.push(pcm[i:i + 1001]) for i in range(0, len(pcm), 1001)]
                         + [conv.flush()])
    assert abs(len(out) - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(out[1000:15000]))
    assert abs(np.argmax(spectrum) * 16000 / 14000 - 440) < 3  # still the 440 Hz tone
    with pytest.raises(Exception, match="rate must be"):
        PcmFormat.parse({"rate": 1, "width": 2, "channels": 1})
    with pytest.raises(Exception, match="width must be"):
        PcmFormat.parse({"rate": 16000, "width": 5, "channels": 1})
    with pytest.raises(Exception, match="channels must be"):
        PcmFormat.parse({"rate": 16000, "width": 2, "channels": 0})


# ---------------------------------------------------------------------------------------------
# Against a real server
# ---------------------------------------------------------------------------------------------


async def test_describe_lists_models_and_voices_not_a_satellite(tmp_path: Path,
                                                                engine: AsrEngine) -> None:
    async with serving(make_app(tmp_path, engine)) as svc, client(svc, timeout=1.0) as c:
        # Home Assistant gives describe 1 s: the client times out past it.
        await c.write_event(Describe().event())
        ev = await c.read_event()
        assert ev is not None and ev.type == "info"
        assert "satellite" not in ev.data  # a satellite entry makes HA load no STT/TTS
        info = Info.from_event(ev)
        (asr,) = info.asr
        assert asr.supports_transcript_streaming and asr.installed
        assert [m.name for m in asr.models] == [MODEL] and "en" in asr.models[0].languages
        if have_piper():
            (tts,) = info.tts
            assert tts.supports_synthesize_streaming
            assert [v.name for v in tts.voices] == ["en_US-joe-medium"]
            assert tts.voices[0].languages == ["en_US"]
        # The connection serves more than one request.
        await c.write_event(Describe().event())
        again = await c.read_event()
        assert again is not None and again.type == "info"


async def test_stt_on_shared_speech(tmp_path: Path, engine: AsrEngine) -> None:
    rows = asr_en_rows()
    app = make_app(tmp_path, engine)
    async with serving(app) as svc:
        hyps = []
        for row in rows:
            x, _ = clip(row["file"])
            heard = await stt(svc, x)
            assert heard.types[0] == "transcript-start" and heard.types[-1] == "transcript-stop"
            (t,) = heard.of("transcript")
            assert t.data["language"] == "en"
            hyps.append(t.data["text"])
        await all_gone(svc)  # each connection ended with its client
        # Sent faster than real time: no partial decode competed with the finals.
        assert app.runner.completed[("asr", "partial")] == 0
        assert app.runner.completed[("asr", "final")] >= len(rows)
    assert wer([r["reference"] for r in rows], hyps) <= WER_BOUND, hyps


async def test_stt_audio_in_any_format(tmp_path: Path, engine: AsrEngine) -> None:
    x, ref = clip("cards-005.wav")
    async with serving(make_app(tmp_path, engine)) as svc:
        for rate, width, channels in ((48000, 2, 2), (22050, 3, 1), (44100, 4, 1),
                                      (16000, 1, 1)):
            y = soxr.resample(x, 16000, rate) if rate != 16000 else x
            if channels == 2:
                y = np.stack([y, 0.5 * y], -1).reshape(-1)
            heard = await stt(svc, y.astype(np.float32), rate, width, channels)
            (t,) = heard.of("transcript")
            assert wer([ref], [t.data["text"]]) <= WER_BOUND, (rate, width, channels, t.data)


async def test_streaming_stt_sends_chunks_that_add_up(tmp_path: Path,
                                                      engine: AsrEngine) -> None:
    parts = [clip(n) for n in ("sense_and_sensibility_01_austen_64kb-0880.wav",
                               "cards-005.wav", "cards-002.wav")]
    gap = np.zeros(8000, np.float32)  # half a second: a pause that closes a sub-segment
    x = np.concatenate([p for a, _ in parts for p in (a, gap)])
    app = make_app(tmp_path, engine)
    async with serving(app) as svc:
        # Real time, as a microphone sends; on a busy machine the partials come late, so
        # the silence after the speech lasts until one did (bounded).
        heard = await stt(svc, x, pace=CHUNK / 16000, silence_until_chunk_s=15.0)
    types = heard.types
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"]
    assert set(types[1:-2]) == {"transcript-chunk"}, types
    text = heard.of("transcript")[0].data["text"]
    chunks = "".join(e.data["text"] for e in heard.of("transcript-chunk"))
    # Clients append chunks: together they are the transcript.
    assert chunks == text, (chunks, text)
    assert wer([" ".join(r for _, r in parts)], [text]) <= WER_BOUND, text
    early = [e for t, e in heard.events if t < heard.stop_sent and e.type == "transcript-chunk"]
    assert early, "no transcript-chunk while the audio was still coming"
    assert app.runner.completed[("asr", "partial")] > 0  # live audio: partials were decoded


async def test_audio_past_the_cap_is_refused_and_the_rest_transcribed(
        tmp_path: Path, engine: AsrEngine) -> None:
    x, _ = clip("cards-005.wav")  # 3.5 s: "Eight of spades, four of clubs, seven of hearts"
    async with serving(make_app(tmp_path, engine), max_audio_s=2.0) as svc, client(svc) as c:
        reader = asyncio.create_task(read_until(c, Heard(), "transcript"))
        await send_audio(c, encode(x, 2), 16000, 2, 1)
        await c.write_event(AudioStop().event())
        first = await reader  # the error comes first, once
        assert first.types[-1] == "error" and first.of("error")[0].data["code"] == \
            "audio_too_long"
        heard = await read_until(c, Heard(), "transcript")
        assert heard.types[-1] == "transcript"
        text = heard.of("transcript")[0].data["text"].lower()
        assert "spades" in text and "hearts" not in text, text


@need_piper
async def test_tts_synthesize_and_streaming_per_sentence(tmp_path: Path,
                                                         engine: AsrEngine) -> None:
    text = "Eight of spades, four of clubs."
    async with serving(make_app(tmp_path, engine)) as svc, client(svc) as c:
        await c.write_event(Synthesize(text=text).event())
        heard = await read_until(c, Heard(), "audio-stop")
        assert heard.types[0] == "audio-start" and heard.types[-1] == "audio-stop"
        start = heard.of("audio-start")[0].data
        assert (start["rate"], start["width"], start["channels"]) == (16000, 2, 1)
        pcm = b"".join(e.payload or b"" for e in heard.of("audio-chunk"))
        audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
        assert 1.0 < len(audio) / 16000 < 6.0 and np.abs(audio).max() > 0.2
        # Intelligible: our own ASR hears the words.
        heard_text = engine.decode(audio).text
        assert wer([text], [heard_text]) <= 0.25, heard_text

        # Streaming: three sentences in pieces -> three audio streams, then stopped.
        await c.write_event(SynthesizeStart().event())
        for piece in ("Hello there. This is", " the second sentence. And ", "a third one"):
            await c.write_event(SynthesizeChunk(text=piece).event())
        # The copy for servers that cannot stream: ignored here.
        await c.write_event(Synthesize(text="Hello there. This is the second sentence. "
                                            "And a third one").event())
        await c.write_event(SynthesizeStop().event())
        heard = await read_until(c, Heard(), "synthesize-stopped")
        kinds = [k for k in heard.types if k != "audio-chunk"]
        assert kinds == ["audio-start", "audio-stop"] * 3 + ["synthesize-stopped"], kinds
        # Each sentence has audio of its own.
        sizes, n = [], 0
        for _, e in heard.events:
            if e.type == "audio-chunk":
                n += len(e.payload or b"")
            elif e.type == "audio-stop":
                sizes.append(n)
                n = 0
        assert all(s > 16000 for s in sizes), sizes  # > 0.5 s each


async def test_bad_events_get_errors_and_the_connection_goes_on(tmp_path: Path,
                                                                engine: AsrEngine) -> None:
    x, ref = clip("cards-005.wav")

    async def next_event(c: AsyncTcpClient) -> Event:
        ev = await c.read_event()
        assert ev is not None
        return ev

    async with serving(make_app(tmp_path, engine)) as svc, client(svc) as c:
        raw = c._writer
        assert raw is not None

        async def expect_error(code: str) -> None:
            ev = await next_event(c)
            assert (ev.type, ev.data.get("code")) == ("error", code), ev

        raw.write(b"this is not json\n")
        await expect_error("bad_json")
        raw.write(b"[1, 2]\n")
        await expect_error("bad_event")
        await c.write_event(Event(type="make-coffee", data={"sugar": 2}))
        await expect_error("unknown_event")
        # Audio before audio-start: one error for the burst, not one per chunk.
        for _ in range(3):
            await c.write_event(AudioChunk(rate=16000, width=2, channels=1,
                                           audio=b"\0" * 2048).event())
        await c.write_event(AudioStop().event())
        await expect_error("not_started")
        await expect_error("not_started")  # the stop
        # An absurd format: refused at audio-start; its chunks and stop are dropped quietly.
        await c.write_event(AudioStart(rate=1, width=2, channels=1).event())
        await expect_error("bad_audio_format")
        await c.write_event(AudioChunk(rate=1, width=2, channels=1, audio=b"\0" * 64).event())
        await c.write_event(AudioStop().event())
        await c.write_event(AudioStart(rate=16000, width=7, channels=1).event())
        await expect_error("bad_audio_format")
        await c.write_event(AudioStop().event())
        # A payload over the limit is read past (the stream stays in step) and refused.
        big = MAX_PAYLOAD + 1
        raw.write(json.dumps({"type": "audio-chunk", "data": {"rate": 16000, "width": 2,
                                                              "channels": 1},
                              "payload_length": big}).encode() + b"\n" + b"\0" * big)
        await expect_error("too_large")
        raw.write(json.dumps({"type": "describe", "payload_length": -5}).encode() + b"\n")
        await expect_error("bad_event")
        ev = await c.read_event()  # a bad length cannot be skipped: the server hangs up
        assert ev is None
    async with serving(make_app(tmp_path, engine)) as svc, client(svc) as c:
        await c.write_event(Transcribe(language="de").event())
        await c.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await expect_error_on(c, "unsupported_language")
        await c.write_event(AudioStop().event())
        await c.write_event(Event(type="synthesize", data={}))  # no text
        await expect_error_on(c, "bad_event")
        # After all that, the same connection still transcribes.
        await c.write_event(Transcribe(language="en").event())
        reader = asyncio.create_task(read_until(c, Heard(), "transcript-stop"))
        await send_audio(c, encode(x, 2), 16000, 2, 1)
        await c.write_event(AudioStop().event())
        heard = await reader
        assert wer([ref], [heard.of("transcript")[0].data["text"]]) <= WER_BOUND


async def expect_error_on(c: AsyncTcpClient, code: str) -> None:
    ev = await c.read_event()
    assert ev is not None and (ev.type, ev.data.get("code")) == ("error", code), ev


async def test_client_leaving_mid_stream_frees_its_session(tmp_path: Path,
                                                           engine: AsrEngine) -> None:
    x, ref = clip("sense_and_sensibility_01_austen_64kb-0870.wav")
    app = make_app(tmp_path, engine)
    async with serving(app, max_clients=1) as svc:
        c = client(svc)
        await c.connect()
        await send_audio(c, encode(x[:3 * 16000], 2), 16000, 2, 1, pace=CHUNK / 16000 / 4)
        (handler,) = svc.clients
        stt = handler.stt
        assert stt is not None
        # A second client while the only slot is taken: refused with a reason.
        async with client(svc) as other:
            await other.write_event(Describe().event())
            ev = await other.read_event()
            assert ev is not None and ev.data.get("code") == "too_many_clients"
        await c.disconnect()  # gone mid-stream, without audio-stop
        await all_gone(svc)
        stream = stt._stream
        assert stream is not None and stream._closed
        assert stream._ticker is None or stream._ticker.done()
        # Nothing of it waits in the runner; the slot is free for the next client.
        await asyncio.sleep(0.3)
        assert sum(app.runner.waiting().values()) == 0
        heard = await stt_of(svc, x)
        assert wer([ref], [heard]) <= WER_BOUND


async def all_gone(svc: WyomingService) -> None:
    """Wait (bounded) until the server has seen every client leave."""
    for _ in range(250):
        if not svc.clients:
            return
        await asyncio.sleep(0.02)
    assert svc.clients == set()


async def stt_of(svc: WyomingService, x: np.ndarray) -> str:
    heard = await stt(svc, x)
    text: str = heard.of("transcript")[0].data["text"]
    return text


async def test_without_a_model_stt_is_refused_clearly(tmp_path: Path) -> None:
    async with serving(make_app(tmp_path, None), tts=False) as svc, client(svc) as c:
        await c.write_event(Describe().event())
        ev = await c.read_event()
        assert ev is not None and Info.from_event(ev).asr == []
        await send_audio(c, b"\0" * 4096, 16000, 2, 1)
        await c.write_event(AudioStop().event())
        await expect_error_on(c, "asr_unavailable")
        await c.write_event(Synthesize(text="Hello.").event())
        await expect_error_on(c, "tts_unavailable")


async def test_zeroconf_announces_the_service(tmp_path: Path) -> None:
    pytest.importorskip("zeroconf")
    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    from agent.wyoming.zeroconf import SERVICE_TYPE

    app = make_app(tmp_path, None)
    wcfg = WyomingConfig(enabled=True, host="127.0.0.1", port=0, zeroconf=True, tts=False,
                         zeroconf_name="va-zeroconf-test")
    svc = WyomingService(app, wcfg, zeroconf_interfaces=["127.0.0.1"])
    task = asyncio.create_task(svc.run())
    zc = AsyncZeroconf(interfaces=["127.0.0.1"])
    try:
        await asyncio.wait_for(svc.bound.wait(), 30)
        found: asyncio.Queue[str] = asyncio.Queue()

        def on_change(zeroconf: Any, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
            if state_change is ServiceStateChange.Added:
                found.put_nowait(name)

        browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[on_change])
        try:
            name = await asyncio.wait_for(found.get(), 10)
        except TimeoutError:
            pytest.skip("no mDNS answer on loopback (multicast not available in this sandbox)")
        finally:
            await browser.async_cancel()
        assert name == f"va-zeroconf-test.{SERVICE_TYPE}"
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        assert await info.async_request(zc.zeroconf, 3000)
        assert (info.parsed_addresses(), info.port) == (["127.0.0.1"], svc.port)
    finally:
        app.stopped.set()
        await asyncio.wait_for(task, 20)
        await zc.async_close()
        await app.close()
