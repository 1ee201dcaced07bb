"""The local player on a real output device: a private PulseAudio null sink, recorded.

The player opens PortAudio's ALSA device `pulse` (the private server's default sink, a null
sink); `parec` records that sink's monitor at 16 kHz. Played TTS audio must come back
correlated >= 0.99, and a flush (or a barge-in on a reply) must silence the recording within
100 ms of the call. The recording's clock: each block's arrival time bounds when its last
sample was captured, so the earliest (arrival - samples so far / rate) anchors sample 0 no
earlier than it really was: a silence measured this way is never earlier than the truth.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest

from agent.audio.playback import Player, list_output_devices
from agent.errors import ReplyError
from agent.reply.cosyvoice import CosyVoiceTts
from agent.reply.piper import PiperTts
from agent.reply.session import ReplySession
from tests.dashscope_fake import FakeDashscope, LlmScript, TtsScript, until
from tests.pulse import PulseServer, missing_requirements, pulse_server
from tests.test_mic_pulse import align
from tests.test_reply_piper import piper_dir

RATE = 16000
SILENCE = 300  # int16: well above the null sink's zeros, far below the tones (~9800)
MAX_FLUSH_S = 0.100


@pytest.fixture(scope="module")
def pulse() -> Iterator[PulseServer]:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    with pulse_server(rate=48000) as srv:
        yield srv


class Recorder:
    """parec on the null sink's monitor, with a sample clock in time.monotonic()."""

    def __init__(self, srv: PulseServer) -> None:
        self.srv = srv
        self.data = bytearray()
        self.t0 = float("inf")
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        self._proc = await asyncio.create_subprocess_exec(
            "parec", f"--device={self.srv.sink}.monitor", "--raw", "--format=s16le",
            f"--rate={RATE}", "--channels=1", "--latency-msec=5", "--process-time-msec=5",
            env=self.srv.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._task = asyncio.create_task(self._read())
        assert await until(lambda: len(self.data) >= RATE // 5), "parec records nothing"
        return self

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while chunk := await self._proc.stdout.read(640):
            now = time.monotonic()
            self.data += chunk
            self.t0 = min(self.t0, now - (len(self.data) // 2) / RATE)

    async def __aexit__(self, *exc: object) -> None:
        assert self._proc is not None and self._task is not None
        self._proc.terminate()
        await self._proc.wait()
        await self._task

    @property
    def samples(self) -> np.ndarray:
        return np.frombuffer(bytes(self.data[: len(self.data) & ~1]), "<i2")

    def time_of(self, index: int) -> float:
        return self.t0 + index / RATE

    def index_of(self, t: float) -> int:
        return int((t - self.t0) * RATE)


def loud_span(x: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(np.abs(x.astype(np.int32)) > SILENCE)
    assert len(idx), "nothing audible was recorded"
    return int(idx[0]), int(idx[-1])


def tone(seconds: float, f: float = 440.0) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * f * t) * 32767).astype("<i2").tobytes()


async def pieces(pcm: bytes, ms: int = 100) -> AsyncIterator[bytes]:
    step = RATE * ms // 1000 * 2
    for i in range(0, len(pcm), step):
        yield pcm[i:i + step]


@pytest.fixture
def player(pulse: PulseServer) -> Iterator[Player]:
    names = [d["name"] for d in list_output_devices()]
    assert "pulse" in names, f"PortAudio lists no 'pulse' output: {names}\n{pulse.log}"
    p = Player("pulse", block_ms=10, latency_s=0.03)
    yield p
    p.close()


async def test_played_tts_comes_out_unchanged(pulse: PulseServer, player: Player) -> None:
    pytest.importorskip("piper", reason="piper-tts not installed (pip install piper-tts)")
    voice = PiperTts(piper_dir(), volume=0.8)
    ref = await asyncio.to_thread(voice.synthesize_blocking,
                                  "The kitchen lights are on, and the oven is warming up.")
    async with Recorder(pulse) as rec:
        await player.play(pieces(ref.tobytes()))
        await asyncio.sleep(0.3)
    lag, corr = align(rec.samples, ref)
    start = round(lag)
    seg = rec.samples[start:start + len(ref)].astype(np.float64)
    gain = float(np.sqrt(np.mean(seg ** 2) / np.mean(ref.astype(np.float64) ** 2)))
    print(f"device rate {player.device_rate} latency {player.output_latency_s * 1000:.0f} ms "
          f"corr {corr:.5f} gain {gain:.3f} underruns {player.underruns}")
    assert corr >= 0.99, f"correlation {corr:.5f}"
    assert 0.9 < gain < 1.1
    assert player.underruns == 0


async def test_flush_silences_within_100ms(pulse: PulseServer, player: Player) -> None:
    async with Recorder(pulse) as rec:
        writer = asyncio.create_task(player.play(pieces(tone(6.0))))
        assert await until(lambda: player.frames_played > 0)
        await asyncio.sleep(1.5)
        t_flush = time.monotonic()
        dropped = player.flush()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await asyncio.sleep(0.5)
    first, last = loud_span(rec.samples)
    tail_s = rec.time_of(last) - t_flush
    print(f"flush: last sound {tail_s * 1000:.1f} ms after flush() "
          f"(dropped {dropped / player.device_rate:.2f} s queued)")  # type: ignore[operator]
    assert (last - first) / RATE > 1.0  # the tone really played before the flush
    assert dropped > 0  # there was audio queued that never played
    assert tail_s <= MAX_FLUSH_S, f"still sounding {tail_s * 1000:.0f} ms after flush"
    after = rec.samples[rec.index_of(t_flush + MAX_FLUSH_S):]
    assert len(after) > RATE // 4 and np.abs(after.astype(np.int32)).max() <= SILENCE


async def test_barge_in_on_a_reply_silences_the_speaker(pulse: PulseServer,
                                                        player: Player) -> None:
    async with FakeDashscope() as fake:
        # No spaces or punctuation: the fake's tones run on without pauses to hide in.
        fake.llm_default = LlmScript(text="Mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm. " * 20,
                                     token_interval_s=0.01)
        fake.tts_default = TtsScript(frame_bytes=1600)
        from agent.reply.llm import DashscopeLlm

        session = ReplySession(
            lambda cls, **kw: None,
            llm=DashscopeLlm(api_key=fake.api_key, base_url=fake.http_base),
            tts=CosyVoiceTts(api_key=fake.api_key, ws_url=fake.ws_url), outputs=[player])
        async with Recorder(pulse) as rec:
            task = asyncio.create_task(session.reply("talk"))
            assert await until(lambda: player.frames_played > 0)
            await asyncio.sleep(1.0)
            t_cancel = time.monotonic()
            await session.cancel("barge_in")
            res = await task
            await asyncio.sleep(0.5)
        await session.aclose()
    first, last = loud_span(rec.samples)
    tail_s = rec.time_of(last) - t_cancel
    print(f"barge-in: last sound {tail_s * 1000:.1f} ms after cancel()")
    assert res.outcome == "cancelled"
    assert (last - first) / RATE > 0.8
    assert tail_s <= MAX_FLUSH_S, f"still sounding {tail_s * 1000:.0f} ms after barge-in"


def test_unknown_output_device_is_a_clear_error(pulse: PulseServer) -> None:
    with pytest.raises(ReplyError) as ei:
        Player("no-such-speaker-xyz").open()
    assert ei.value.code == "playback_device_not_found"
    assert "no-such-speaker-xyz" in ei.value.message
