"""The ASR analyser: streams an utterance into an engine, publishes partials and the final."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from agent.analysers import Analyser, Utterance
from agent.asr.base import AsrEngine, AsrSession, Transcript, has_words
from agent.bus import Publisher
from agent.constants import PIPELINE_RATE
from agent.events import AsrFinal, AsrPartial

log = logging.getLogger(__name__)

# Audio that stops arriving for this long means the speaker paused (the segmenter holds
# back silence): decode everything now, so the final is ready or under way when the
# gate closes or the VAD's silence runs out.
IDLE_S = 0.09
# Whisper needs a few hundred ms of speech for a word; a wordless partial is retried after this.
RETRY_S = 0.15


class _Partials:
    """Re-decodes one utterance's growing buffer; at most one decode in flight."""

    def __init__(self, owner: AsrAnalyser, session: AsrSession,
                 publish: Callable[[str], None]) -> None:
        self.owner = owner
        self.session = session
        self.publish = publish
        self.fed = asyncio.Event()
        self.last_feed = 0.0
        self.inflight: tuple[int, asyncio.Future[str]] | None = None
        self.task = asyncio.create_task(self._run())

    def feed(self, samples: np.ndarray) -> None:
        """Buffer audio (on the loop: cheap) and wake the ticker."""
        self.session.feed(samples)
        self.last_feed = time.monotonic()
        self.fed.set()

    async def _settle(self, done_at: int, t0: float, interval: float) -> None:
        """Wait out the interval, or less when the audio pauses with undecoded samples."""
        deadline = t0 + interval
        while (now := time.monotonic()) < deadline:
            if self.session.fed_samples != done_at and now - self.last_feed >= IDLE_S:
                return
            await asyncio.sleep(min(deadline - now, IDLE_S / 3))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        done_at = 0
        while True:
            await self.fed.wait()
            self.fed.clear()
            n = self.session.fed_samples
            if n < self.owner.min_samples or n == done_at:
                continue
            t0 = time.monotonic()
            fut = loop.run_in_executor(self.owner.partial_ex, self.session.partial)
            self.inflight = (n, fut)
            try:
                text = await fut
            finally:
                self.inflight = None
            done_at = n
            self.publish(text)
            # Until the first words show up, retry sooner: early partials matter most.
            interval = self.owner.interval if has_words(text) else RETRY_S
            await self._settle(done_at, t0, interval)
            if self.session.fed_samples != done_at:
                self.fed.set()

    async def stop(self) -> None:
        """Stop; a decode in flight over all the audio is the final, so let it finish."""
        if self.inflight is not None and self.inflight[0] == self.session.fed_samples:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.inflight[1])
        # Otherwise a decode running in its thread finishes there; its text is dropped.
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class AsrAnalyser(Analyser):
    """Partials never delay the final: they run in their own thread and are skipped if stale."""

    name = "asr"

    def __init__(self, engine: AsrEngine, partials: bool = True, partial_interval_ms: int = 400,
                 partial_min_audio_ms: int = 300) -> None:
        self.engine = engine
        self.partials = partials
        self.interval = partial_interval_ms / 1000
        self.min_samples = PIPELINE_RATE * partial_min_audio_ms // 1000
        # Separate single threads: a final never queues behind a partial decode.
        self.final_ex = ThreadPoolExecutor(1, thread_name_prefix="asr-final")
        self.partial_ex = ThreadPoolExecutor(1, thread_name_prefix="asr-partial")

    async def analyse(self, utt: Utterance, audio: AsyncIterator[np.ndarray],
                      pub: Publisher) -> None:
        """Feed the utterance, publish partials while it lasts, then the final."""
        loop = asyncio.get_running_loop()
        session = self.engine.session()
        seq = 0
        last = ""

        def publish_partial(text: str) -> None:
            nonlocal seq, last
            if has_words(text) and text != last and not utt.ended.is_set():
                last = text
                seq += 1
                pub.emit(AsrPartial, session_id=utt.session_id, utterance_id=utt.id,
                         text=text, seq=seq)

        if session.streaming:
            async for chunk in audio:
                text = await loop.run_in_executor(self.final_ex, session.feed, _f32(chunk))
                if self.partials and text:
                    publish_partial(text)
        elif self.partials:
            partials = _Partials(self, session, publish_partial)
            async for chunk in audio:
                partials.feed(_f32(chunk))
            await partials.stop()
        else:
            async for chunk in audio:
                session.feed(_f32(chunk))
        if utt.aborted:
            return
        t0 = time.monotonic()
        result: Transcript = await loop.run_in_executor(self.final_ex, session.finish)
        now = time.monotonic()
        end = utt.end_mono if utt.end_mono is not None else t0
        pub.emit(AsrFinal, session_id=utt.session_id, utterance_id=utt.id,
                 text=result.text if has_words(result.text) else "",
                 language=result.language, model=self.engine.model_id,
                 audio_s=round(session.fed_samples / PIPELINE_RATE, 3),
                 decode_ms=round(1000 * result.decode_s, 1),
                 eos_to_final_ms=round(1000 * (now - end), 1), partials=seq,
                 speculative=result.reused)

    async def close(self) -> None:
        """Stop the worker threads."""
        self.partial_ex.shutdown(wait=False, cancel_futures=True)
        self.final_ex.shutdown(wait=True, cancel_futures=True)


def _f32(chunk: np.ndarray) -> np.ndarray:
    return chunk.astype(np.float32) / 32768.0
