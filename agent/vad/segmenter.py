"""Pure utterance segmenter: per-frame speech decisions in, boundaries out (no audio)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from agent.config import SegmenterConfig

Kind = Literal["speech_start", "utterance_start", "speech_end", "utterance_end"]


@dataclass(frozen=True)
class SegmentEvent:
    """A boundary at frame index `frame` (utterance ends are exclusive)."""

    kind: Kind
    frame: int
    reason: str = ""


@dataclass(frozen=True)
class SegmenterParams:
    """Durations in milliseconds, turned into whole frames by the segmenter."""

    frame_ms: float
    min_speech_ms: float = 120
    min_silence_ms: float = 700
    max_utterance_ms: float = 20_000
    pre_roll_ms: float = 200
    post_roll_ms: float = 150

    @classmethod
    def from_config(cls, cfg: SegmenterConfig, frame_ms: float) -> SegmenterParams:
        """Parameters from the `segmenter:` config section."""
        return cls(frame_ms, cfg.min_speech_ms, cfg.min_silence_ms, cfg.max_utterance_s * 1000,
                   cfg.pre_roll_ms, cfg.post_roll_ms)


class Segmenter:
    """State machine: silence -> (min speech) -> utterance -> (min silence | max length) -> ..."""

    def __init__(self, p: SegmenterParams) -> None:
        f = p.frame_ms
        self.p = p
        self.min_speech = max(1, math.ceil(p.min_speech_ms / f))
        self.min_silence = max(1, math.ceil(p.min_silence_ms / f))
        self.max_frames = max(2, int(p.max_utterance_ms // f))
        self.pre_roll = int(p.pre_roll_ms // f)
        # Trailing padding can only come from silence we have already seen.
        self.post_roll = min(int(p.post_roll_ms // f), self.min_silence)
        self.index = 0  # index of the next frame to be fed
        self.floor = 0  # no utterance may start before this (gate opening, previous end)
        self.in_utterance = False
        self.utt_start = 0
        self._speech_run = 0
        self._silence_run = 0

    @property
    def commit_frame(self) -> int:
        """Frames of the current utterance below this index are final and may be forwarded."""
        if not self.in_utterance:
            return self.floor
        if self._silence_run:
            return min(self.index, self.index - self._silence_run + self.post_roll)
        return self.index

    def open_at(self, frame: int) -> None:
        """The gate opened at `frame`: start fresh, no pre-roll from before it."""
        self.index = frame
        self.floor = frame
        self.in_utterance = False
        self._speech_run = self._silence_run = 0

    def feed(self, speech: bool) -> list[SegmentEvent]:
        """Advance one frame."""
        i = self.index
        self.index += 1
        out: list[SegmentEvent] = []
        if not self.in_utterance:
            self._speech_run = self._speech_run + 1 if speech else 0
            if self._speech_run >= self.min_speech:
                start = i - self._speech_run + 1
                self.utt_start = max(self.floor, start - self.pre_roll)
                self.in_utterance = True
                self._silence_run = 0
                out += [SegmentEvent("speech_start", start),
                        SegmentEvent("utterance_start", self.utt_start)]
        elif speech:
            self._silence_run = 0
        else:
            self._silence_run += 1
            if self._silence_run >= self.min_silence:
                out += self._end("silence")
                return out
        if self.in_utterance and self.index - self.utt_start >= self.max_frames:
            if self._silence_run:
                # The cut falls in a pause: end there as if the pause were long enough.
                return out + self._end("max_length")
            # Too long and still talking: cut here and go on in a fresh utterance.
            end = self.index
            self.floor = self.utt_start = end
            out += [SegmentEvent("utterance_end", end, "max_length"),
                    SegmentEvent("utterance_start", end)]
        return out

    def _end(self, reason: str) -> list[SegmentEvent]:
        speech_end = self.index - self._silence_run
        end = min(self.index, speech_end + self.post_roll)
        self.in_utterance = False
        self.floor = end
        self._speech_run = self._silence_run = 0
        return [SegmentEvent("speech_end", speech_end), SegmentEvent("utterance_end", end, reason)]

    def flush(self, reason: str) -> list[SegmentEvent]:
        """The stream or gate closed: end the open utterance, if any."""
        self._speech_run = 0
        if not self.in_utterance:
            return []
        return self._end(reason)
