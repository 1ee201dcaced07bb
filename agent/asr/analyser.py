"""The ASR analyser: the live pipeline's adapter over one recognition stream per utterance."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import numpy as np

from agent.analysis import Analyser, Runner, Utterance
from agent.asr.base import AsrEngine
from agent.asr.schedule import StreamParams
from agent.asr.stream import RecognitionStream
from agent.bus import Publisher
from agent.events import AsrFinal, AsrPartial

log = logging.getLogger(__name__)


class AsrAnalyser(Analyser):
    """Publishes `asr.partial` while the utterance lasts and `asr.final` at its end."""

    name = "asr"

    def __init__(self, engine: AsrEngine, runner: Runner, params: StreamParams | None = None
                 ) -> None:
        self.engine = engine
        self.runner = runner
        self.params = params or StreamParams()

    @property
    def model_id(self) -> str | None:
        """The loaded model."""
        return self.engine.model_id

    async def analyse(self, utt: Utterance, audio: AsyncIterator[np.ndarray],
                      pub: Publisher) -> None:
        """Feed the utterance into a stream; partials while it lasts, then the final."""
        stream = RecognitionStream(self.engine, self.runner, self.params)
        seq = 0

        async def forward() -> None:
            nonlocal seq
            async for p in stream.partials():
                # Once the utterance has ended, only its final speaks for it.
                if not utt.ended.is_set():
                    seq += 1
                    pub.emit(AsrPartial, session_id=utt.session_id, utterance_id=utt.id,
                             text=p.text, seq=seq)

        pump = asyncio.create_task(forward(), name=f"asr-partials:{utt.id}")
        try:
            async for chunk in audio:
                stream.feed(chunk.astype(np.float32) / 32768.0)
            if utt.aborted:
                stream.abandon()
                return
            final = await stream.finish()
        except BaseException:
            stream.abandon()
            raise
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        now = time.monotonic()
        end = utt.end_mono if utt.end_mono is not None else now
        result = pub.emit(AsrFinal, session_id=utt.session_id, utterance_id=utt.id,
                          text=final.text, language=final.language, model=self.engine.model_id,
                          audio_s=final.audio_s, decode_ms=final.decode_ms,
                          eos_to_final_ms=round(1000 * (now - end), 1), partials=seq,
                          speculative=final.reused, segments=final.segments)
        utt.results["asr"] = result
        utt.result_event("asr").set()
