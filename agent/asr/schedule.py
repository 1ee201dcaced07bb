"""Pure scheduling of one recognition stream: when to decode partials, where to cut segments,
and whether the final can reuse a partial. Sample counts and times in, decisions out.

The stream around it (`agent/asr/stream.py`) feeds audio and lenient-VAD frame decisions,
asks `poll(now)` what to decode, runs those decodes, and reports them back. Kept free of
asyncio and models so that it is tested with durations alone, like the segmenter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from agent.constants import PIPELINE_RATE

FRAME = PIPELINE_RATE * 30 // 1000  # the lenient VAD's frame: 30 ms


@dataclass(frozen=True)
class StreamParams:
    """Timing of partials, endpoints and segments (seconds)."""

    partials: bool = True
    interval_s: float = 0.4  # between partial decodes once they have words
    min_audio_s: float = 0.3  # Whisper writes nothing useful on less
    retry_s: float = 0.15  # a wordless (or shed) partial is retried this soon
    # Audio that stops arriving this long means the speaker paused (the daemon's segmenter
    # holds silence back): decode everything now, so the final is ready at the release.
    idle_s: float = 0.09
    # This much silence after speech means the speaker may have stopped: a partial at once.
    margin_s: float = 0.15
    # A partial that heard this far past the last voiced frame heard everything said, and is
    # the final (two 30 ms VAD frames: the decision's granularity). Smaller than `margin_s`:
    # a periodic partial that happens to end just after the speech is reused, not redone.
    cover_s: float = 0.06
    reuse: bool = True
    # Close sub-segments at the speaker's own pauses and decode them while speech goes on.
    segments: bool = True
    # A pause this long, with speech on both sides, cuts a segment once it holds at least
    # `min_segment_s` of audio. Short pauses: the lenient VAD's hangover eats ~100 ms of each
    # (a 0.35 s gap between sentences reads as 0.18-0.4 s); `python bench/asr.py --long`
    # measured 300 ms / 2 s against 150 ms / 0.8 s (README).
    pause_s: float = 0.15
    min_segment_s: float = 0.8
    max_segment_s: float = 28.0  # Whisper's window: a segment is cut here whatever it holds


@dataclass
class Segment:
    """A closed piece of the utterance: [start, end) samples, its text once decoded."""

    start: int
    end: int
    text: str | None = None  # the segment decode's text
    preview: str = ""  # the newest partial that covered it, until `text` arrives

    @property
    def shown(self) -> str:
        """What a partial shows for this segment."""
        return self.text if self.text is not None else self.preview


@dataclass(frozen=True)
class Decode:
    """A decode to run over samples [start, end)."""

    kind: Literal["partial", "segment"]
    start: int
    end: int
    segment: int = -1  # index into `segments` for kind "segment"
    # A partial decoded because speech just ended (audio paused, or the lenient VAD heard
    # silence): it is likely to become the final, so it is not shed like periodic ones.
    endpoint: bool = False


@dataclass(frozen=True)
class FinalPlan:
    """How to produce the final: reuse a partial's text, or decode [start, end) (or nothing)."""

    reuse: str | None  # the tail's text from a covering partial
    start: int
    end: int

    @property
    def needs_decode(self) -> bool:
        """Whether the tail must still be decoded."""
        return self.reuse is None and self.end > self.start


@dataclass
class Scheduler:
    """Decisions for one utterance. All positions are samples from the stream's start."""

    p: StreamParams = field(default_factory=StreamParams)
    fed: int = 0
    last_feed: float = 0.0
    speech: list[bool] = field(default_factory=list)  # one lenient-VAD decision per FRAME
    seg_start: int = 0  # where the open (tail) segment begins
    segments: list[Segment] = field(default_factory=list)
    # Partials over the tail: the one running (its end), the newest finished one (end, text).
    inflight: int | None = None
    heard: tuple[int, str] | None = None
    next_due: float = 0.0
    decodes: int = 0

    # -- inputs -----------------------------------------------------------------------------

    def feed(self, n: int, now: float, frames: list[bool]) -> None:
        """`n` more samples arrived at `now`; `frames` are VAD decisions for new whole frames."""
        self.fed += n
        self.last_feed = now
        self.speech.extend(frames)

    def partial_done(self, d: Decode, text: str | None, now: float, has_words: bool) -> None:
        """A partial decode finished (text None: it was shed and did not run)."""
        self.inflight = None
        if text is None:
            self.next_due = now + self.p.retry_s
            return
        if d.start == self.seg_start:
            self.heard = (d.end, text)
        else:
            # The tail was cut meanwhile: this text previews the segment(s) it covered.
            for seg in self.segments:
                if seg.start == d.start and seg.text is None:
                    seg.preview = text
        self.next_due = now + (self.p.interval_s if has_words else self.p.retry_s)

    def segment_done(self, index: int, text: str) -> None:
        """A segment decode finished."""
        self.segments[index].text = text

    # -- decisions --------------------------------------------------------------------------

    @property
    def speech_end(self) -> int:
        """Sample just past the last voiced frame (0: no speech heard yet)."""
        for i in range(len(self.speech) - 1, -1, -1):
            if self.speech[i]:
                return (i + 1) * FRAME
        return 0

    def _cut(self) -> int | None:
        """Where to close the tail segment, if the speaker paused (and resumed) inside it."""
        if not self.p.segments:
            return None
        rate = PIPELINE_RATE
        first = self.seg_start // FRAME + (1 if self.seg_start % FRAME else 0)
        pause = max(1, round(self.p.pause_s * 1000 / 30))
        voiced_before = False
        run = 0
        for i in range(first, len(self.speech)):
            if self.speech[i]:
                if voiced_before and run >= pause:
                    cut = (i - run // 2) * FRAME  # the middle of the pause
                    if cut - self.seg_start >= self.p.min_segment_s * rate:
                        return cut
                voiced_before = True
                run = 0
            else:
                run += 1
        if self.fed - self.seg_start > self.p.max_segment_s * rate:
            return self.seg_start + int(self.p.max_segment_s * rate)
        return None

    def poll(self, now: float) -> list[Decode]:
        """What to decode now (call again at `wake_at()` or when audio arrives)."""
        out: list[Decode] = []
        cut = self._cut()
        if cut is not None:
            self.segments.append(Segment(self.seg_start, cut))
            out.append(Decode("segment", self.seg_start, cut, len(self.segments) - 1))
            self.seg_start = cut
            self.heard = None
            self.next_due = 0.0
        d = self._partial(now)
        if d is not None:
            self.inflight = d.end
            self.decodes += 1
            out.append(d)
        return out

    def _covered(self) -> int:
        """Samples of the tail that hold everything said: speech end + cover, or all of it."""
        cover = int(self.p.cover_s * PIPELINE_RATE)
        end = self.speech_end
        return self.fed if end == 0 else min(self.fed, end + cover)

    def _partial(self, now: float) -> Decode | None:
        if not self.p.partials or self.inflight is not None:
            return None
        tail = self.fed - self.seg_start
        if tail < self.p.min_audio_s * PIPELINE_RATE:
            return None
        done = self.heard[0] if self.heard else self.seg_start
        if done >= self.fed:
            return None
        due = now >= self.next_due
        # An endpoint: audio paused (daemon), or speech ended `margin` ago (client streams).
        paused = now - self.last_feed >= self.p.idle_s
        margin = int(self.p.margin_s * PIPELINE_RATE)
        end = self.speech_end
        ended = end > self.seg_start and self.fed - end >= margin and done < self._covered()
        if due or paused or ended:
            return Decode("partial", self.seg_start, self.fed, endpoint=paused or ended)
        return None

    def wake_at(self) -> float | None:
        """When a partial may next be due with no new audio (None: only new audio matters)."""
        if not self.p.partials or self.inflight is not None:
            return None
        done = self.heard[0] if self.heard else self.seg_start
        if done >= self.fed:
            return None
        return min(self.next_due, self.last_feed + self.p.idle_s)

    def plan_final(self) -> FinalPlan:
        """The final's tail: reuse the newest partial when it heard all the speech."""
        start, end = self.seg_start, self.fed
        if self.heard is not None and self.p.reuse:
            got, text = self.heard
            # A wordless partial ("" for "[BLANK_AUDIO]") proves nothing: decode for real.
            if got >= self._covered() and text:
                return FinalPlan(text, start, end)
        if self.segments and self.speech_end <= start:
            return FinalPlan("", start, start)  # nothing voiced since the last cut
        return FinalPlan(None, start, end)

    def reuse_if_inflight(self) -> int | None:
        """The end of a running partial whose text would be the final (wait for it)."""
        if self.inflight is not None and self.p.reuse and self.inflight >= self._covered():
            return self.inflight
        return None

    def text(self, tail: str) -> str:
        """Segments' texts and the tail's, joined."""
        return " ".join(t for t in [*(s.shown for s in self.segments), tail] if t)
