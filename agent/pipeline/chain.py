"""The audio chain: source -> gate -> VAD -> segmenter -> analysers, as async generators."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from agent.analysis import Utterance
from agent.bus import Publisher
from agent.config import SegmenterConfig
from agent.constants import PIPELINE_RATE
from agent.events import SpeechEnded, SpeechStarted, UtteranceEnded, UtteranceStarted
from agent.pipeline.gate import GateController, GateMarker, new_id
from agent.pipeline.hub import AnalyserHub
from agent.vad.base import Vad
from agent.vad.segmenter import Segmenter, SegmenterParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Audio:
    """A chunk that passed the gate, with its position in the source stream."""

    offset: int  # samples since the source started
    samples: np.ndarray


@dataclass(frozen=True)
class Frames:
    """VAD frames with their decisions; `first` is the first frame's index in the session."""

    first: int
    frames: list[np.ndarray]
    speech: list[bool]


async def gate_stage(chunks: AsyncIterator[np.ndarray], gate: GateController
                     ) -> AsyncIterator[Audio | GateMarker]:
    """Let audio through only while the gate is open; interleave gate transitions.

    While the gate is muted (half duplex: the daemon is speaking) the audio is replaced by
    silence rather than dropped: an utterance in progress ends by silence as usual, none
    starts, and sample offsets stay those of the source.
    """
    offset = 0
    async for chunk in chunks:
        for marker in gate.drain():
            yield marker
        if gate.is_open:
            if gate.muted:
                gate.muted_samples += len(chunk)
                chunk = np.zeros_like(chunk)
            yield Audio(offset, chunk)
        offset += len(chunk)
    for marker in gate.drain():
        yield marker


async def vad_stage(items: AsyncIterator[Audio | GateMarker], vad: Vad, executor: Executor
                    ) -> AsyncIterator[Frames | GateMarker | int]:
    """Re-frame to the VAD's frame size and decide each frame in the VAD's own thread.

    An int item announces the sample offset of frame 0 of a new gate session.
    """
    loop = asyncio.get_running_loop()
    n = vad.frame_samples
    buf = np.zeros(0, dtype=np.int16)
    frame_index = 0
    need_origin = True
    async for item in items:
        if isinstance(item, GateMarker):
            if item.kind in ("open", "close"):
                buf = buf[:0]
                need_origin = True
                if item.kind == "open":
                    vad.reset()
            yield item
            continue
        if need_origin:
            # Frame 0 of this session starts at this chunk: offsets stay exact across gates.
            frame_index = 0
            need_origin = False
            yield item.offset
        buf = np.concatenate([buf, item.samples]) if len(buf) else item.samples
        count = len(buf) // n
        if not count:
            continue
        frames = [buf[i * n:(i + 1) * n] for i in range(count)]
        buf = buf[count * n:]
        speech = await loop.run_in_executor(executor, vad.process, frames)
        yield Frames(frame_index, frames, speech)
        frame_index += count


class Segmentation:
    """Turns VAD decisions into utterances: events on the bus, audio to the analysers."""

    def __init__(self, cfg: SegmenterConfig, frame_samples: int, pub: Publisher,
                 hub: AnalyserHub, session_id: str | None = None) -> None:
        self.frame_samples = frame_samples
        frame_ms = 1000.0 * frame_samples / PIPELINE_RATE
        self.seg = Segmenter(SegmenterParams.from_config(cfg, frame_ms))
        self.pub = pub
        self.hub = hub
        self.session_id = session_id
        self.origin = 0  # sample offset of frame 0 of the current gate session
        keep = self.seg.pre_roll + self.seg.min_speech + self.seg.min_silence + 4
        self.history: deque[tuple[int, np.ndarray]] = deque(maxlen=keep)
        self.utt: Utterance | None = None
        self.next_fwd = 0
        self.utterances = 0
        self._pending: SegmenterParams | None = None  # a reloaded config, applied between
        # utterances so the one in progress keeps the rules it started with

    def reconfigure(self, cfg: SegmenterConfig) -> None:
        """Take new segmenter settings at the next utterance boundary."""
        self._pending = SegmenterParams.from_config(cfg, self.seg.p.frame_ms)
        self._swap()

    def _swap(self) -> None:
        if self._pending is None or self.seg.in_utterance:
            return
        index = self.seg.index
        self.seg = Segmenter(self._pending)
        self.seg.open_at(index)
        keep = self.seg.pre_roll + self.seg.min_speech + self.seg.min_silence + 4
        self.history = deque(self.history, maxlen=keep)
        self._pending = None

    def seconds(self, frame: int) -> float:
        """Stream time of a session frame index."""
        return (self.origin + frame * self.frame_samples) / PIPELINE_RATE

    def _forward(self, upto: int) -> None:
        """Send history frames [next_fwd, upto) of the current utterance to the analysers."""
        if self.utt is None or upto <= self.next_fwd:
            return
        parts = [f for i, f in self.history if self.next_fwd <= i < upto]
        if parts:
            self.hub.audio(self.utt, np.concatenate(parts))
        self.next_fwd = upto

    def _apply(self, kind: str, frame: int, reason: str = "", mono: float | None = None) -> None:
        sid = self.session_id
        if kind == "speech_start":
            self.pub.emit(SpeechStarted, session_id=sid, audio_offset_s=self.seconds(frame))
        elif kind == "utterance_start":
            self.utterances += 1
            self.utt = Utterance(new_id(), sid, self.seconds(frame))
            self.next_fwd = frame
            self.pub.emit(UtteranceStarted, session_id=sid, utterance_id=self.utt.id,
                          audio_start_s=self.utt.start_s)
            self.hub.start(self.utt)
        elif kind == "speech_end":
            self.pub.emit(SpeechEnded, session_id=sid, audio_offset_s=self.seconds(frame))
        elif kind == "utterance_end" and self.utt is not None:
            if reason != "reset":
                self._forward(frame)
            end_s = self.seconds(frame)
            utt, self.utt = self.utt, None
            self.pub.emit(UtteranceEnded, session_id=sid, utterance_id=utt.id,
                          audio_start_s=utt.start_s, audio_end_s=end_s,
                          duration_s=round(end_s - utt.start_s, 6), reason=reason)
            self.hub.end(utt, end_s, reason, mono)

    def frames(self, item: Frames) -> None:
        """Feed decided frames."""
        for k, (frame, speech) in enumerate(zip(item.frames, item.speech, strict=True)):
            self.history.append((item.first + k, frame))
            for ev in self.seg.feed(speech):
                self._apply(ev.kind, ev.frame, ev.reason)
            if self.utt is not None:
                self._forward(self.seg.commit_frame)
        if self._pending is not None:
            self._swap()

    def open(self, origin: int, session_id: str | None) -> None:
        """A gate session begins at sample `origin`."""
        self.origin = origin
        self.session_id = session_id
        self.history.clear()
        self.seg.open_at(0)

    def close(self, reason: str, mono: float | None = None) -> None:
        """End the utterance in progress with `reason` (the command's time in `mono`)."""
        for ev in self.seg.flush(reason):
            self._apply(ev.kind, ev.frame, ev.reason, mono)


async def run_pipeline(chunks: AsyncIterator[np.ndarray], gate: GateController, vad: Vad,
                       vad_executor: Executor, seg: Segmentation,
                       end_reason: list[str]) -> None:
    """Pull audio through the whole chain until the source ends or is stopped."""
    pending_session: str | None = gate.session_id
    async for item in vad_stage(gate_stage(chunks, gate), vad, vad_executor):
        if isinstance(item, Frames):
            seg.frames(item)
        elif isinstance(item, int):
            seg.open(item, pending_session)
        elif item.kind == "open":
            seg.close("ptt_stop")
            pending_session = item.session_id
        elif item.kind == "close":
            seg.close("ptt_stop", item.mono)
        else:
            seg.close("reset", item.mono)
    # end_reason is filled by the daemon: end_of_stream, or shutdown on a signal.
    seg.close(end_reason[0] if end_reason else "end_of_stream")
