"""The recognition stream (`agent/asr/stream.py`) over a counting stub engine, a controlled
clock and real speech; the streaming `OnlineSession` over a stub recogniser; and one live
daemon whose final is the speculative partial (`speculative: true`) on the real model.

The stub engine's text is the number of samples it decoded, so every text says which audio
it came from. Decodes run inline (the stub costs nothing) or on the real decode runner.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from agent import models
from agent.analysis import Priority
from agent.app.runner import DecodeRunner
from agent.asr.base import AsrEngine, AsrSession, Transcript
from agent.asr.schedule import StreamParams
from agent.asr.sherpa import OnlineSession, SherpaOnlineEngine
from agent.asr.stream import Final, Partial, RecognitionStream
from agent.asr.wer import wer
from agent.config import load_config
from agent.constants import PIPELINE_RATE
from agent.daemon import Daemon
from agent.errors import ModelError
from agent.events import AsrFinal

from .conftest import ASR_EN, asr_en_rows, need_shared
from .joined import join_clips

SR = PIPELINE_RATE
CHUNK = SR * 30 // 1000
WAIT_S = 10.0
MODEL = "whisper-tiny.en-int8"


def speech(name: str = "cards-005.wav") -> np.ndarray:
    """A shared clip, float32."""
    need_shared()
    x, sr = sf.read(ASR_EN / name, dtype="float32")
    assert sr == SR
    return x


def quiet(seconds: float) -> np.ndarray:
    """Silence: a pause for the stream's lenient VAD."""
    return np.zeros(int(seconds * SR), np.float32)


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class CountingEngine(AsrEngine):
    """Text = how many samples were decoded; records each decode and when it ran."""

    model_id = "counting"
    language = "en"

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.decodes: list[tuple[float, int]] = []  # (clock time, samples)

    def decode(self, audio: np.ndarray) -> Transcript:
        self.decodes.append((self.clock(), len(audio)))
        return Transcript(f"heard {len(audio)}", "en", decode_s=0.001)


class InlineRunner:
    """Runs each call at once on the loop (stub engines only); can shed partials; counts."""

    def __init__(self, shed: int = 0) -> None:
        self.shed_left = shed
        self.shed = 0
        self.calls: list[tuple[str, Priority]] = []

    async def run(self, fn: Callable[..., Any], *args: Any, priority: Priority = Priority.FINAL,
                  kind: str = "asr") -> Any:
        self.calls.append((kind, priority))
        await asyncio.sleep(0)
        return fn(*args)

    async def partial(self, fn: Callable[..., Any], *args: Any, kind: str = "asr") -> Any:
        await asyncio.sleep(0)
        if self.shed_left:
            self.shed_left -= 1
            self.shed += 1
            return None
        self.calls.append((kind, Priority.PARTIAL))
        return fn(*args)


async def settle() -> None:
    """Let the stream's tasks run until nothing moves (inline decodes finish at once)."""
    for _ in range(30):
        await asyncio.sleep(0)


async def feed_live(stream: RecognitionStream, clock: Clock, audio: np.ndarray) -> None:
    """Feed in 30 ms chunks as a live source would, the clock moving with the audio."""
    for i in range(0, len(audio), CHUNK):
        clock.t += CHUNK / SR
        stream.feed(audio[i:i + CHUNK])
        await settle()


async def collect(stream: RecognitionStream) -> list[Partial]:
    """Every partial until the stream closes."""
    return [p async for p in stream.partials()]


class Partials:
    """Collects a stream's partials in the background; `wait(n)` for the n-th."""

    def __init__(self, stream: RecognitionStream) -> None:
        self.got: list[Partial] = []
        self._more = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(stream))

    async def _run(self, stream: RecognitionStream) -> None:
        async for p in stream.partials():
            self.got.append(p)
            self._more.set()

    async def wait(self, n: int) -> Partial:
        """The n-th partial (1-based), once it has come."""
        async with asyncio.timeout(WAIT_S):
            while len(self.got) < n:
                self._more.clear()
                await self._more.wait()
        return self.got[n - 1]


def make(params: StreamParams | None = None, runner: Any = None
         ) -> tuple[RecognitionStream, CountingEngine, Clock, Any]:
    clock = Clock()
    engine = CountingEngine(clock)
    runner = runner or InlineRunner()
    return RecognitionStream(engine, runner, params, clock=clock), engine, clock, runner


async def test_partials_while_speaking_then_the_final_reuses_the_last() -> None:
    s, engine, clock, _ = make(StreamParams(segments=False))
    got = asyncio.ensure_future(collect(s))
    x = speech()
    await feed_live(s, clock, x)
    # The user lets go: the daemon's segmenter holds silence back, audio stops arriving.
    clock.t += s.p.idle_s
    for _ in range(int(WAIT_S / 0.01)):
        if engine.decodes and engine.decodes[-1][1] == len(x):
            break
        await asyncio.sleep(0.01)  # the ticker's own timer fires the pause trigger
    assert engine.decodes[-1][1] == len(x), "no partial over everything at the pause"
    before = len(engine.decodes)
    final = await s.finish()
    partials = await got
    assert len(engine.decodes) == before  # the final cost no decode ...
    assert final.reused and final.text == f"heard {len(x)}" == partials[-1].text  # ... reused
    assert final.partials == len(partials) >= 3
    assert [p.seq for p in partials] == list(range(1, len(partials) + 1))
    assert all(a.audio_s < b.audio_s for a, b in itertools.pairwise(partials))
    # While speech went on, partials were at least `interval_s` apart (or sooner on a pause
    # in the speech, which only a retry or an endpoint may cause).
    times = [t for t, _ in engine.decodes]
    assert engine.decodes[0][1] >= s.p.min_audio_s * SR
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sum(g >= s.p.interval_s - 0.031 for g in gaps) >= len(gaps) // 2, gaps


async def test_endpoint_decodes_now() -> None:
    s, engine, clock, _ = make(StreamParams(interval_s=60.0, segments=False))
    partials = Partials(s)
    x = speech()[: SR]
    await feed_live(s, clock, x)
    assert len(engine.decodes) == 1  # the first partial, then none for a minute
    await partials.wait(1)
    s.endpoint()  # PTT release coming
    p = await partials.wait(2)
    assert len(engine.decodes) == 2 and p.audio_s == round(len(x) / SR, 3)
    s.abandon()


async def test_client_stream_speech_end_triggers_a_partial() -> None:
    # A client streams faster than real time: the clock does not move, audio never pauses.
    s, engine, _, runner = make(StreamParams(interval_s=60.0, segments=False))
    x = speech()
    s.feed(x[: SR])
    await settle()
    assert len(engine.decodes) == 1
    s.feed(np.concatenate([x[SR:], quiet(0.4)]))
    await settle()
    assert len(engine.decodes) == 2 and engine.decodes[-1][1] == len(x) + int(0.4 * SR)
    final = await s.finish()
    assert final.reused and len(engine.decodes) == 2
    # The periodic partial was best effort; the endpoint's, likely the final, is not shed.
    assert runner.calls == [("asr", Priority.PARTIAL), ("asr", Priority.SEGMENT)]


async def test_sub_segments_are_cut_at_pauses_and_joined() -> None:
    runner = InlineRunner()
    s, engine, clock, _ = make(StreamParams(partials=False), runner)
    a, b = speech("sense_and_sensibility_01_austen_64kb-0880.wav"), speech()
    await feed_live(s, clock, np.concatenate([a, quiet(0.6), b]))
    final = await s.finish()
    assert final.segments >= 1
    assert runner.calls.count(("asr", Priority.SEGMENT)) == final.segments
    assert runner.calls[-1] == ("asr", Priority.FINAL)  # the tail, at the end
    lengths = [n for _, n in engine.decodes]
    assert sum(lengths) == len(a) + int(0.6 * SR) + len(b)  # every sample decoded once
    assert final.text == " ".join(f"heard {n}" for n in lengths)
    assert not final.reused


async def test_reuse_off_always_decodes_the_final() -> None:
    s, engine, _, runner = make(StreamParams(reuse=False, segments=False))
    x = speech()
    s.feed(np.concatenate([x, quiet(0.4)]))
    await settle()
    n = len(engine.decodes)
    final = await s.finish()
    assert not final.reused and len(engine.decodes) == n + 1
    assert runner.calls[-1] == ("asr", Priority.FINAL)


async def test_shed_partials_are_retried_soon() -> None:
    runner = InlineRunner(shed=2)
    s, engine, clock, _ = make(StreamParams(interval_s=60.0, segments=False), runner)
    x = speech()[: SR]
    retry = round(s.p.retry_s * SR) // CHUNK * CHUNK  # whole chunks inside retry_s
    at = int(s.p.min_audio_s * SR)
    await feed_live(s, clock, x[:at])
    assert runner.shed == 1 and engine.decodes == []  # the first try was shed
    await feed_live(s, clock, x[at:at + retry])
    assert runner.shed == 1  # not retried before retry_s
    await feed_live(s, clock, x[at + retry:at + retry + CHUNK])
    assert runner.shed == 2 and engine.decodes == []  # retried, shed again
    await feed_live(s, clock, x[at + retry + CHUNK:at + 2 * (retry + CHUNK)])
    assert len(engine.decodes) == 1  # the third try ran, with words: then none for a minute
    await feed_live(s, clock, x[at + 2 * (retry + CHUNK):])
    assert len(engine.decodes) == 1
    s.abandon()


async def test_abandon_publishes_nothing_more_and_decodes_nothing() -> None:
    s, engine, clock, _ = make(StreamParams(segments=False))
    got = asyncio.ensure_future(collect(s))
    await feed_live(s, clock, speech()[: SR])
    n = len(engine.decodes)
    assert n >= 1
    s.abandon()
    partials = await asyncio.wait_for(got, WAIT_S)  # the iterator ends
    await feed_live(s, clock, speech()[SR:])
    clock.t += 10
    s.endpoint()
    await settle()
    assert len(engine.decodes) == n and len(partials) <= n


async def test_on_the_daemon_runner_in_threads() -> None:
    runner = DecodeRunner(2)
    clock = Clock()
    engine = CountingEngine(clock)
    s = RecognitionStream(engine, runner, StreamParams(segments=False), clock=clock)
    x = speech()
    s.feed(np.concatenate([x, quiet(0.4)]))
    final = await asyncio.wait_for(s.finish(), WAIT_S)
    assert final.text == f"heard {len(x) + int(0.4 * SR)}"
    # One decode ran in a worker: the final's, or the endpoint partial it reused.
    assert sum(runner.completed.values()) == 1 and runner.running == 0
    runner.close()


# ---- streaming engines: OnlineSession over a stub recogniser ---------------------------------


class StubOnlineStream:
    """What sherpa's OnlineStream holds: samples in, a flag at the end."""

    def __init__(self) -> None:
        self.samples = 0
        self.decoded = 0
        self.finished = False
        self.chunks: list[int] = []


class StubOnlineRecognizer:
    """sherpa_onnx.OnlineRecognizer's interface: one word per 0.1 s decoded."""

    STEP = SR // 10

    def create_stream(self) -> StubOnlineStream:
        return StubOnlineStream()

    def accept_waveform(self, stream: StubOnlineStream, samples: np.ndarray) -> None:
        stream.samples += len(samples)
        stream.chunks.append(len(samples))

    def is_ready(self, stream: StubOnlineStream) -> bool:
        left = stream.samples - stream.decoded
        return left >= self.STEP or (stream.finished and left > 0)

    def decode_stream(self, stream: StubOnlineStream) -> None:
        stream.decoded = min(stream.samples, stream.decoded + self.STEP)

    def get_result(self, stream: StubOnlineStream) -> str:
        return " ".join(f"w{i}" for i in range(-(-stream.decoded // self.STEP)))


class _Bound:
    """Binds the stub's stream methods the way sherpa's stream objects carry them."""

    def __init__(self, rec: StubOnlineRecognizer, stream: StubOnlineStream) -> None:
        self.rec, self.stream = rec, stream

    def accept_waveform(self, rate: int, samples: np.ndarray) -> None:
        assert rate == SR
        self.rec.accept_waveform(self.stream, samples)

    def input_finished(self) -> None:
        self.stream.finished = True


class StubRecognizerApi(StubOnlineRecognizer):
    """Streams whose methods live on them, as in sherpa-onnx."""

    def create_stream(self) -> Any:
        return _Bound(self, StubOnlineStream())

    def is_ready(self, s: Any) -> bool:
        return super().is_ready(s.stream)

    def decode_stream(self, s: Any) -> None:
        super().decode_stream(s.stream)

    def get_result(self, s: Any) -> str:
        return super().get_result(s.stream)


def stub_online_engine() -> SherpaOnlineEngine:
    """A SherpaOnlineEngine whose recogniser is the stub (no model files exist for it)."""
    engine = SherpaOnlineEngine.__new__(SherpaOnlineEngine)
    engine._rec = StubRecognizerApi()
    engine.model_id = "stub-online"
    engine.language = "en"
    return engine


def test_online_session_decodes_as_audio_arrives_and_flushes_at_finish() -> None:
    session = stub_online_engine().session()
    assert isinstance(session, OnlineSession) and isinstance(session, AsrSession)
    assert session.feed(np.zeros(SR // 20, np.float32)) == ""  # 50 ms: nothing ready
    assert session.feed(np.zeros(SR // 20, np.float32)) == "w0"
    assert session.feed(np.zeros(SR // 4, np.float32)) == "w0 w1 w2"
    assert session.fed_samples == SR // 20 * 2 + SR // 4
    final = session.finish()
    # finish() feeds 0.3 s of silence (the model's right context), then decodes it all.
    inner = session._stream.stream
    assert inner.finished and inner.chunks[-1] == int(0.3 * SR)
    assert final.text == "w0 w1 w2 w3 w4 w5 w6" and final.language == "en"
    assert session.fed_samples == SR // 20 * 2 + SR // 4  # the padding is not the caller's


def test_online_session_feeds_from_threads_stay_whole() -> None:
    session = stub_online_engine().session()
    block = np.zeros(1000, np.float32)
    threads = [threading.Thread(target=lambda: [session.feed(block) for _ in range(50)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert session.fed_samples == 4 * 50 * 1000
    assert session._stream.stream.chunks == [1000] * 200


async def test_recognition_stream_over_a_streaming_engine() -> None:
    runner = InlineRunner()
    s = RecognitionStream(stub_online_engine(), runner, StreamParams())
    got = asyncio.ensure_future(collect(s))
    for _ in range(10):
        s.feed(np.zeros(SR // 10, np.float32))
    final: Final = await s.finish()
    partials = await got
    assert [p.text for p in partials] == [" ".join(f"w{i}" for i in range(k))
                                          for k in range(1, 11)]
    assert final.text == " ".join(f"w{i}" for i in range(13)) and final.audio_s == 1.0
    assert not final.reused and final.partials == 10
    # Feeding decodes, in order: it is never a sheddable partial.
    assert set(runner.calls) == {("asr", Priority.FINAL)} and len(runner.calls) == 11


# ---- the live daemon on the real model -------------------------------------------------------


@pytest.fixture(scope="module")
def asr_model() -> Path:
    need_shared()
    try:
        return models.path(MODEL)
    except ModelError as e:
        pytest.skip(f"ASR model {MODEL} not installed ({e.message})")


async def test_live_final_is_the_speculative_partial(asr_model: Path, tmp_path: Path) -> None:
    """Real time, VAD mode: the partial decoded while the segmenter waits out its silence
    becomes the final (`speculative: true`), and it is right.

    The segmenter waits 2 s (not 0.7) so that a loaded machine still finishes the pause's
    partial in time: this test is about the path, bench/asr.py measures how often it wins.
    """
    rows = [r for r in asr_en_rows() if r["file"] in ("cards-005.wav", "cards-003.wav")]
    audio, _, _ = join_clips([ASR_EN / r["file"] for r in rows], 3.0, lead_s=0.5, tail_s=3.0)
    path = tmp_path / "two.wav"
    sf.write(path, audio, SR, subtype="PCM_16")
    cfg = load_config(None, env={"VOICE_AGENT__AUDIO__SOURCE": "file",
                                 "VOICE_AGENT__AUDIO__FILE": str(path),
                                 "VOICE_AGENT__AUDIO__REALTIME": "true",
                                 "VOICE_AGENT__GATE__MODE": "vad",
                                 "VOICE_AGENT__SEGMENTER__MIN_SILENCE_MS": "2000"})
    d = Daemon(cfg)
    sub = d.bus.subscribe(10_000)
    assert await d.run() == 0
    events = [e async for e in sub]
    finals = [e for e in events if isinstance(e, AsrFinal)]
    assert len(finals) == 2
    assert any(f.speculative for f in finals), [(f.text, f.speculative) for f in finals]
    # A speculative final's decode time is its partial's: it was measured, not zero.
    assert all(f.decode_ms > 0 for f in finals)
    assert wer([r["reference"] for r in rows], [f.text for f in finals]) <= 0.2
