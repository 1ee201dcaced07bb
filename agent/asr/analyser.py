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
from agent.asr.base import AsrEngine, AsrSession
from agent.bus import Publisher
from agent.config import PIPELINE_RATE
from agent.events import AsrFinal, AsrPartial

log = logging.getLogger(__name__)


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
        self._final_ex = ThreadPoolExecutor(1, thread_name_prefix="asr-final")
        self._partial_ex = ThreadPoolExecutor(1, thread_name_prefix="asr-partial")
        # Per session: samples covered by the partial decode in flight, and its future.
        self._inflight: dict[int, int] = {}
        self._inflight_fut: dict[int, asyncio.Future[str]] = {}

    async def analyse(self, utt: Utterance, audio: AsyncIterator[np.ndarray],
                      pub: Publisher) -> None:
        """Feed the utterance, publish partials while it lasts, then the final."""
        loop = asyncio.get_running_loop()
        session = self.engine.session()
        seq = 0
        last = ""

        def publish_partial(text: str) -> None:
            nonlocal seq, last
            if text and text != last and not utt.ended.is_set():
                last = text
                seq += 1
                pub.emit(AsrPartial, session_id=utt.session_id, utterance_id=utt.id,
                         text=text, seq=seq)

        ticker: asyncio.Task[None] | None = None
        if session.streaming:
            async for chunk in audio:
                text = await loop.run_in_executor(self._final_ex, session.feed, _f32(chunk))
                if self.partials and text:
                    publish_partial(text)
        else:
            fed = asyncio.Event()
            if self.partials:
                ticker = asyncio.create_task(self._partials(session, fed, publish_partial))
            async for chunk in audio:
                session.feed(_f32(chunk))
                fed.set()
        if ticker is not None:
            await self._stop_partials(ticker, session)
        if utt.aborted:
            return
        t0 = time.monotonic()
        result = await loop.run_in_executor(self._final_ex, session.finish)
        now = time.monotonic()
        end = utt.end_mono if utt.end_mono is not None else t0
        pub.emit(AsrFinal, session_id=utt.session_id, utterance_id=utt.id, text=result.text,
                 language=result.language, model=self.engine.model_id,
                 audio_s=round(session.fed_samples / PIPELINE_RATE, 3),
                 decode_ms=round(1000 * (now - t0), 1),
                 eos_to_final_ms=round(1000 * (now - end), 1), partials=seq)

    async def _stop_partials(self, ticker: asyncio.Task[None], session: AsrSession) -> None:
        """Stop partials; a decode in flight over all the audio is the final, so let it end."""
        if self._inflight.get(id(session)) == session.fed_samples:
            # Speculative final: the user stopped talking before the gate closed (PTT) or
            # the VAD's silence ran out, and that decode already started.
            fut = self._inflight_fut.get(id(session))
            if fut is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(fut)
        # Otherwise a decode running in its thread finishes there; its text is dropped.
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker

    async def _partials(self, session: AsrSession, fed: asyncio.Event,
                        publish: Callable[[str], None]) -> None:
        """Re-decode the growing buffer every interval, at most one decode in flight."""
        loop = asyncio.get_running_loop()
        done_at = 0
        while True:
            await fed.wait()
            fed.clear()
            n = session.fed_samples
            if n < self.min_samples or n == done_at:
                continue
            t0 = time.monotonic()
            fut = loop.run_in_executor(self._partial_ex, session.partial)
            self._inflight[id(session)], self._inflight_fut[id(session)] = n, fut
            try:
                text = await fut
            finally:
                self._inflight.pop(id(session), None)
                self._inflight_fut.pop(id(session), None)
            done_at = n
            publish(text)
            # Wait out the rest of the interval; newer audio sets `fed` again meanwhile.
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t0)))

    async def close(self) -> None:
        """Stop the worker threads."""
        self._partial_ex.shutdown(wait=False, cancel_futures=True)
        self._final_ex.shutdown(wait=True, cancel_futures=True)


def _f32(chunk: np.ndarray) -> np.ndarray:
    return chunk.astype(np.float32) / 32768.0
