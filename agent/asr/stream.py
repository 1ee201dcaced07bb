"""One recognition stream: feed audio, get partials, `finish()` the final, or `abandon()`.

Every surface that recognises speech (the live pipeline's ASR analyser, `/ws/asr`, Wyoming)
is a thin adapter over this class. Offline engines (Whisper) re-decode the tail as partials
and close sub-segments at the speaker's pauses, decoding them while speech goes on, so that at
the end only the audio since the last pause is decoded (or nothing, when a partial already
heard all of it). Streaming engines decode as audio arrives. Every decode goes through the
daemon-wide runner: finals first, partials shed under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from agent.analysis import Priority, Runner
from agent.asr.base import AsrEngine, Transcript, has_words
from agent.asr.schedule import FRAME, Decode, Scheduler, StreamParams
from agent.audio.convert import float_to_int16
from agent.constants import PIPELINE_RATE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partial:
    """Interim text; `audio_s` is how much audio the decode heard."""

    text: str
    seq: int
    audio_s: float
    decode_ms: float | None


@dataclass(frozen=True)
class Final:
    """The stream's result."""

    text: str
    language: str | None
    audio_s: float
    decode_ms: float  # the decode that made the tail's text (a reused partial's, if reused)
    finish_ms: float  # time spent in finish(): what the caller waited
    reused: bool  # the tail's text came from a partial already decoded
    partials: int
    segments: int


class _Buffer:
    """Growing float32 audio with cheap appends and slices."""

    def __init__(self) -> None:
        self._data = np.zeros(PIPELINE_RATE * 4, np.float32)
        self.n = 0

    def append(self, x: np.ndarray) -> None:
        """Add samples."""
        need = self.n + len(x)
        if need > len(self._data):
            grown = np.zeros(max(need, 2 * len(self._data)), np.float32)
            grown[:self.n] = self._data[:self.n]
            self._data = grown
        self._data[self.n:need] = x
        self.n = need

    def slice(self, start: int, end: int) -> np.ndarray:
        """A copy of [start, end) (copied: the buffer may grow while a decode runs)."""
        return self._data[start:end].copy()


class _Vad:
    """Lenient WebRTC VAD over the stream: where speech is, for endpoints and pauses."""

    def __init__(self) -> None:
        import webrtcvad

        self._vad = webrtcvad.Vad(1)
        self._carry = np.zeros(0, np.int16)

    def push(self, x: np.ndarray) -> list[bool]:
        """Decisions for the whole frames completed by `x` (float32)."""
        pcm = float_to_int16(x)
        buf = np.concatenate([self._carry, pcm]) if len(self._carry) else pcm
        n = len(buf) // FRAME
        out = [self._vad.is_speech(buf[i * FRAME:(i + 1) * FRAME].tobytes(), PIPELINE_RATE)
               for i in range(n)]
        self._carry = buf[n * FRAME:]
        return out


class RecognitionStream:
    """One utterance's recognition; created per utterance, used from the event loop."""

    def __init__(self, engine: AsrEngine, runner: Runner, params: StreamParams | None = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.runner = runner
        self.p = params or StreamParams()
        self.clock = clock
        self.sched = Scheduler(self.p)
        self.buf = _Buffer()
        self._vad = _Vad()
        self._partials: asyncio.Queue[Partial | None] = asyncio.Queue()
        self._seq = 0
        self._last_text = ""
        self._heard_ms = 0.0  # decode time of the newest partial over the tail
        self._closed = False
        self._wake = asyncio.Event()
        self._inflight: asyncio.Task[None] | None = None
        self._segment_tasks: list[asyncio.Task[None]] = []
        self._session = engine.session() if engine.streaming else None
        self._feeds: asyncio.Task[None] | None = None
        self._feed_q: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        self._ticker: asyncio.Task[None] | None = None
        if self._session is not None:
            self._feeds = asyncio.create_task(self._stream_feeds(), name="asr-stream-feed")
        elif self.p.partials or self.p.segments:
            self._ticker = asyncio.create_task(self._tick(), name="asr-stream-tick")

    # -- input ------------------------------------------------------------------------------

    @property
    def fed_samples(self) -> int:
        """Samples fed so far."""
        return self.buf.n

    def audio(self) -> np.ndarray:
        """A copy of everything fed (for analysers of client-streamed audio)."""
        return self.buf.slice(0, self.buf.n)

    def feed(self, samples: np.ndarray) -> None:
        """Add float32 16 kHz mono audio (cheap: safe on the event loop)."""
        if self._closed or not len(samples):
            return
        self.buf.append(samples)
        if self._session is not None:
            self._feed_q.put_nowait(samples)
            return
        self.sched.feed(len(samples), self.clock(), self._vad.push(samples))
        self._wake.set()

    def endpoint(self) -> None:
        """A hint that speech may have ended (PTT release coming): decode now, not later."""
        self.sched.last_feed = min(self.sched.last_feed, self.clock() - self.p.idle_s)
        self._wake.set()

    async def partials(self) -> AsyncIterator[Partial]:
        """Partials as they come, until the stream finishes or is abandoned."""
        while (item := await self._partials.get()) is not None:
            yield item

    # -- offline engines: partials and segments ---------------------------------------------

    async def _tick(self) -> None:
        while not self._closed:
            for d in self.sched.poll(self.clock()):
                if d.kind == "segment":
                    self._segment_tasks.append(asyncio.create_task(
                        self._segment(d), name="asr-stream-segment"))
                else:
                    self._inflight = asyncio.create_task(self._partial(d),
                                                         name="asr-stream-partial")
            wake = self.sched.wake_at()
            self._wake.clear()
            timeout = None if wake is None else max(0.0, wake - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _decode(self, start: int, end: int) -> Transcript:
        return self.engine.decode(self.buf.slice(start, end))

    async def _partial(self, d: Decode) -> None:
        t0 = self.clock()
        try:
            if d.endpoint:
                # Likely the final, decoded before the release: as urgent as a segment.
                result: Transcript | None = await self.runner.run(
                    self._decode, d.start, d.end, priority=Priority.SEGMENT)
            else:
                result = await self.runner.partial(self._decode, d.start, d.end)
        except Exception as e:  # a failed partial is not worth the utterance
            log.debug("partial decode failed: %s", e)
            result = None
        text = None if result is None else (result.text if has_words(result.text) else "")
        took_ms = 1000 * (self.clock() - t0)
        if log.isEnabledFor(logging.DEBUG):  # what a latency hunt needs, decode by decode
            log.debug("partial [%d, %d)%s: %s in %.0f ms (fed %d)", d.start, d.end,
                      " endpoint" if d.endpoint else "", "shed" if text is None else repr(text),
                      took_ms, self.sched.fed)
        self.sched.partial_done(d, text, self.clock(), bool(text))
        if text is not None and d.start == self.sched.seg_start:
            self._heard_ms = took_ms
        if text and not self._closed:
            shown = self.sched.text(text) if d.start == self.sched.seg_start \
                else self.sched.text("")
            self._publish(shown, d.end, took_ms)
        self._wake.set()

    async def _segment(self, d: Decode) -> None:
        result = await self.runner.run(self._decode, d.start, d.end, priority=Priority.SEGMENT)
        self.sched.segment_done(d.segment, result.text if has_words(result.text) else "")

    def _publish(self, text: str, heard: int, ms: float | None) -> None:
        if text == self._last_text:
            return
        self._last_text = text
        self._seq += 1
        self._partials.put_nowait(Partial(text, self._seq, round(heard / PIPELINE_RATE, 3),
                                          round(ms, 1) if ms is not None else None))

    # -- streaming engines ------------------------------------------------------------------

    async def _stream_feeds(self) -> None:
        session = self._session
        assert session is not None
        while (x := await self._feed_q.get()) is not None:
            # Feeding decodes: it must happen, in order, so it is not a sheddable partial.
            text = await self.runner.run(session.feed, x, priority=Priority.FINAL)
            if self.p.partials and text and has_words(text) and not self._closed:
                self._publish(text, session.fed_samples, None)

    # -- the end ----------------------------------------------------------------------------

    async def finish(self) -> Final:
        """The final transcript (the stream is closed afterwards)."""
        t0 = self.clock()
        if self._session is not None:
            self._feed_q.put_nowait(None)
            assert self._feeds is not None
            await self._feeds
            result = await self.runner.run(self._session.finish, priority=Priority.FINAL)
            self._close()
            return Final(result.text if has_words(result.text) else "", result.language,
                         round(self.buf.n / PIPELINE_RATE, 3), round(1000 * result.decode_s, 1),
                         round(1000 * (self.clock() - t0), 1), False, self._seq, 0)
        await self._stop_ticker()
        # A partial already decoding everything said becomes the final: wait for it.
        if self.sched.reuse_if_inflight() is not None and self._inflight is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._inflight)
        plan = self.sched.plan_final()
        log.debug("final plan %s (heard %s, fed %d, speech end %d, covered %d)", plan,
                  self.sched.heard and self.sched.heard[0], self.sched.fed,
                  self.sched.speech_end, self.sched._covered())
        language = self.engine.language
        decode_ms = self._heard_ms if plan.reuse is not None else 0.0
        tail = plan.reuse or ""
        tail_task: asyncio.Future[Transcript] | None = None
        if plan.needs_decode:
            tail_task = asyncio.ensure_future(self.runner.run(
                self._decode, plan.start, plan.end, priority=Priority.FINAL))
        # Segments still decoding are needed too: they run beside the tail's decode.
        await asyncio.gather(*self._segment_tasks)
        if tail_task is not None:
            result = await tail_task
            tail = result.text if has_words(result.text) else ""
            language = result.language or language
            decode_ms = 1000 * result.decode_s
        self._close()
        return Final(self.sched.text(tail), language, round(self.buf.n / PIPELINE_RATE, 3),
                     round(decode_ms, 1), round(1000 * (self.clock() - t0), 1),
                     plan.reuse is not None, self._seq, len(self.sched.segments))

    async def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    def _close(self) -> None:
        self._closed = True
        self._partials.put_nowait(None)

    def abandon(self) -> None:
        """Drop the utterance: no final; decodes already running finish unread."""
        if self._closed:
            return
        self._close()
        if self._ticker is not None:
            self._ticker.cancel()
        for t in self._segment_tasks:
            t.cancel()
        if self._feeds is not None:
            self._feeds.cancel()
