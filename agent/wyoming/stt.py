"""One Wyoming transcription: audio-start .. audio-stop -> (transcript-start/-chunks) transcript.

A thin adapter over the daemon's `RecognitionStream`, like `/ws/asr`: audio in any format is
converted to 16 kHz mono, every decode runs in the decode runner, and the partials become
`transcript-chunk`s. A Whisper stream hears at most 30 s, so a long transcription is cut into
streams of `WINDOW_S`; each one's final runs while the next one listens.

Chunks must add up: Wyoming clients append them. A Whisper partial can still change any word
it showed before (even two partials in a row that agreed on "4," gave "4." in the final), so
a chunk carries only text that is final already: each closed sub-segment's decode (the final
joins exactly those), sent while the audio still comes, then the rest with the final. Past
the first window the earlier windows' finals are not known yet, so chunks wait for the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.event import Event

from agent.analysis import Priority
from agent.asr.base import AsrEngine
from agent.asr.schedule import StreamParams
from agent.asr.stream import Final, RecognitionStream
from agent.constants import PIPELINE_RATE
from agent.errors import AudioDecodeError
from agent.wyoming.pcm import PcmConverter, PcmFormat

if TYPE_CHECKING:
    from agent.app.core import App

log = logging.getLogger(__name__)

Send = Callable[[Event], Awaitable[None]]
WINDOW_S = 28.0  # below Whisper's 30 s, like the upload path's windows
PACE_S = 0.5  # audio held back until its pace shows whether partials are worth it


def _decoded_segments(stream: RecognitionStream) -> str:
    """The text of the stream's leading sub-segments whose decode is done: final already."""
    texts = []
    for seg in stream.sched.segments:
        if seg.text is None:
            break
        if seg.text:
            texts.append(seg.text)
    return " ".join(texts)


def speaker_identifier(app: App) -> Callable[[np.ndarray], Mapping[str, Any] | None] | None:
    """The speaker analyser's synchronous `identify(audio)`, once that analyser exists.

    Hook for the speaker issue: an analyser registered as "speaker" with a method
    `identify(float32 16 kHz mono) -> {"name", "speaker_id", "score", "is_match"} | None`
    puts its answer in the transcript's `context` as `{"speaker": ...}`.
    """
    fn = getattr(app.analysers.get("speaker"), "identify", None)
    return fn if callable(fn) else None


class Transcription:
    """The state of one audio-start .. audio-stop."""

    def __init__(self, app: App, engine: AsrEngine, params: StreamParams, fmt: PcmFormat,
                 send: Send, *, streaming: bool, max_audio_s: float,
                 language: str | None = None) -> None:
        self.app = app
        self.engine = engine
        self.params = params
        self.send = send
        self.streaming = streaming
        self.language = language or engine.language
        self.converter = PcmConverter(fmt)
        self.max_samples = int(max_audio_s * PIPELINE_RATE)
        self.window = int(WINDOW_S * PIPELINE_RATE)
        self.fed = 0
        self.refused = False  # audio past max_audio_s was refused (said once)
        self.identify = speaker_identifier(app)
        self._audio: list[np.ndarray] = []  # kept only for the speaker
        self._earlier: list[asyncio.Future[Final]] = []  # finals of the full windows
        self._forwarders: list[asyncio.Task[None]] = []
        self._sent = ""  # the chunks so far, concatenated
        # The stream opens once the pace of the audio is known (`PACE_S` of it, or the end).
        self._stream: RecognitionStream | None = None
        self._held: list[np.ndarray] = []
        self._held_n = 0
        self._t0 = time.monotonic()

    def _new_stream(self) -> RecognitionStream:
        stream = RecognitionStream(self.engine, self.app.runner, self.params)
        self._forwarders.append(asyncio.create_task(self._forward(stream), name="wyoming-stt"))
        return stream

    def _open(self, paced: bool) -> RecognitionStream:
        """Open the stream: partials and sub-segments only when audio comes at speaking pace.

        Audio sent faster than real time (a recording, a benchmark) ends before any partial
        could be shown; a decode started in the burst would only compete with the final for
        the same cores.
        """
        if not paced:
            # Sub-segments pay off only while speech goes on; each decode also pays Whisper's
            # padding, so on audio that is all here already one decode is cheapest.
            self.params = replace(self.params, partials=False, segments=False)
        self._stream = self._new_stream()
        held, self._held, self._held_n = self._held, [], 0
        for x in held:
            self._push(x)
        return self._stream

    async def begin(self) -> None:
        """`transcript-start`, when streaming."""
        if self.streaming:
            await self.send(TranscriptStart(language=self.language).event())

    # -- audio ------------------------------------------------------------------------------

    def feed(self, pcm: bytes, fmt: PcmFormat | None = None) -> None:
        """One audio-chunk (cheap: conversion and buffering only). Raises once past the cap."""
        x = self.converter.push(pcm, fmt)
        self._feed(x)

    def _feed(self, x: np.ndarray) -> None:
        room = self.max_samples - self.fed - self._held_n
        over = len(x) > room
        if over:
            x = x[:max(room, 0)]
        if self._stream is not None:
            self._push(x)
        elif len(x):
            self._held.append(x)
            self._held_n += len(x)
            if self._held_n >= PACE_S * PIPELINE_RATE:
                # At most twice real time counts as live audio (network jitter bunches it).
                elapsed = time.monotonic() - self._t0
                self._open(paced=elapsed >= 0.5 * self._held_n / PIPELINE_RATE)
        if over and not self.refused:
            self.refused = True
            raise AudioDecodeError("audio_too_long", f"more than {self.max_samples // 16000}"
                                   " s of audio (wyoming.max_audio_s): the rest is ignored; "
                                   "the transcript covers what came before", status=413)

    def _push(self, x: np.ndarray) -> None:
        """Into the current stream, a new one every `WINDOW_S`."""
        while len(x):
            assert self._stream is not None
            take = self.window - self._stream.fed_samples
            part, x = x[:take], x[take:]
            self._stream.feed(part)
            self.fed += len(part)
            if self.identify is not None:
                self._audio.append(part)
            if self._stream.fed_samples >= self.window:
                self._roll()

    def _roll(self) -> None:
        """The window is full: finish its stream in the background, go on in a new one."""
        old = self._stream
        assert old is not None
        self._earlier.append(asyncio.ensure_future(old.finish()))
        self._stream = self._new_stream()

    # -- partials -> chunks -----------------------------------------------------------------

    async def _forward(self, stream: RecognitionStream) -> None:
        # Each partial is a moment when a sub-segment may have been decoded meanwhile.
        async for _partial in stream.partials():
            if stream is not self._stream:
                continue
            if self.streaming and not self._earlier:
                # Closed sub-segments already have the text the final will use.
                await self._chunk(_decoded_segments(stream))

    async def _chunk(self, text: str) -> None:
        """Send what `text` adds to the chunks sent, if it extends them."""
        if len(text) > len(self._sent) and text.startswith(self._sent):
            delta, self._sent = text[len(self._sent):], text
            await self.send(TranscriptChunk(text=delta).event())

    # -- the end ----------------------------------------------------------------------------

    async def finish(self) -> Final:
        """audio-stop: the final, then `transcript` (and the last chunk, `transcript-stop`)."""
        t0 = time.monotonic()
        tail = self.converter.flush()
        with contextlib.suppress(AudioDecodeError):  # the cap was said already
            self._feed(tail)
        stream = self._stream or self._open(paced=False)  # it all came before the pace was known
        speaker: asyncio.Future[Any] | None = None
        if self.identify is not None and self._audio:
            speaker = asyncio.ensure_future(self.app.runner.run(
                self.identify, np.concatenate(self._audio), priority=Priority.FINAL,
                kind="speaker"))
        last = await stream.finish()
        await self._forwarders[-1]
        finals = [*(await asyncio.gather(*self._earlier)), last]
        text = " ".join(f.text for f in finals if f.text)
        context: dict[str, Any] | None = None
        if speaker is not None:
            try:
                who = await speaker
            except Exception as e:  # the transcript matters more than who said it
                log.warning("speaker identification for a Wyoming transcript failed: %s", e)
            else:
                context = {"speaker": dict(who)} if who else None
        if self.streaming:
            await self._chunk(text)
        language = last.language or self.language
        await self.send(Transcript(text=text, language=language, context=context).event())
        if self.streaming:
            await self.send(TranscriptStop().event())
        self.app.observe("wyoming_stt_final", time.monotonic() - t0)
        return Final(text, language, round(self.fed / PIPELINE_RATE, 3), last.decode_ms,
                     round(1000 * (time.monotonic() - t0), 1), last.reused,
                     sum(f.partials for f in finals), sum(f.segments for f in finals))

    def abandon(self) -> None:
        """The client left or reset: no transcript; decodes already running finish unread."""
        if self._stream is not None:
            self._stream.abandon()
        for t in self._forwarders:
            t.cancel()
        for f in self._earlier:
            f.cancel()
