"""The recognition stream's pure scheduler (`agent/asr/schedule.py`), driven by durations.

No audio, no model, no asyncio: samples and lenient-VAD frame decisions go in with a time,
decodes to run come out. Every number below is derived from `StreamParams`, so a changed
default moves the expectation with it.
"""

from __future__ import annotations

import pytest

from agent.asr.schedule import FRAME, Decode, FinalPlan, Scheduler, Segment, StreamParams
from agent.constants import PIPELINE_RATE

SR = PIPELINE_RATE
FRAME_S = FRAME / SR  # 30 ms


def n(seconds: float) -> int:
    """Whole frames' worth of samples in `seconds`."""
    return round(seconds / FRAME_S) * FRAME


class Clock:
    """A scheduler plus the time it lives in."""

    def __init__(self, **params: object) -> None:
        self.s = Scheduler(StreamParams(**params))  # type: ignore[arg-type]
        self.t = 0.0

    def feed(self, seconds: float, speech: bool, step_s: float = FRAME_S) -> None:
        """Audio arriving in real time, one frame every `step_s` (0: all at once)."""
        for _ in range(round(seconds / FRAME_S)):
            self.t += step_s
            self.s.feed(FRAME, self.t, [speech])

    def poll(self, after_s: float = 0.0) -> list[Decode]:
        """Poll `after_s` later."""
        self.t += after_s
        return self.s.poll(self.t)

    def partial(self) -> Decode:
        """Poll once; exactly one partial must come out."""
        out = self.poll()
        assert [d.kind for d in out] == ["partial"], out
        return out[0]


def test_no_partial_before_min_audio_then_one_at_once() -> None:
    c = Clock()
    p = c.s.p
    c.feed(p.min_audio_s - FRAME_S, True)
    assert c.poll() == []
    c.feed(FRAME_S, True)
    d = c.partial()
    assert (d.start, d.end) == (0, c.s.fed) and c.s.decodes == 1


def test_one_partial_in_flight_at_a_time() -> None:
    c = Clock()
    c.feed(0.5, True)
    d = c.partial()
    c.feed(1.0, True)  # long past every interval, but a partial is still decoding
    assert c.poll(10.0) == [] and c.s.wake_at() is None
    c.s.partial_done(d, "words", c.t, True)
    assert c.partial().end == c.s.fed


@pytest.mark.parametrize("text,has_words,wait", [
    ("eight of", True, "interval_s"),  # words: the next one after the interval
    ("", False, "retry_s"),  # wordless ("[BLANK_AUDIO]"): retried sooner
    (None, False, "retry_s"),  # shed by the runner: retried sooner
])
def test_next_partial_timing(text: str | None, has_words: bool, wait: str) -> None:
    c = Clock()
    c.feed(0.5, True)
    d = c.partial()
    c.s.partial_done(d, text, c.t, has_words)
    gap = getattr(c.s.p, wait)
    assert c.s.next_due == pytest.approx(c.t + gap)
    # Audio keeps arriving in real time: nothing before the gap is over, one partial after.
    c.feed(gap - 2 * FRAME_S, True)
    assert c.poll() == []
    c.feed(3 * FRAME_S, True)
    d = c.partial()
    assert d.end == c.s.fed and not d.endpoint  # periodic: best effort


def test_pause_trigger_fires_exactly_at_idle() -> None:
    c = Clock(interval_s=5.0)
    c.feed(0.6, True)
    c.s.partial_done(c.partial(), "eight", c.t, True)
    c.feed(0.6, True)
    assert c.poll(c.s.p.idle_s * 0.9) == []
    out = c.poll(c.s.p.idle_s * 0.2)
    assert [(d.kind, d.start, d.end) for d in out] == [("partial", 0, c.s.fed)]
    assert out[0].endpoint  # likely the final: the stream does not let it be shed


def test_speech_end_triggers_a_partial_without_a_pause() -> None:
    # A client streams faster than real time: audio never pauses, but speech ended.
    c = Clock(interval_s=5.0, segments=False)
    c.feed(0.6, True, step_s=0.001)
    c.s.partial_done(c.partial(), "eight", c.t, True)
    c.feed(c.s.p.margin_s - FRAME_S, False, step_s=0.001)
    assert c.poll() == []  # speech may go on
    c.feed(FRAME_S, False, step_s=0.001)
    d = c.partial()  # `margin` of silence after the speech: decode now
    assert d.end == c.s.fed and d.endpoint
    c.s.partial_done(d, "eight of spades", c.t, True)
    c.feed(0.3, False, step_s=0.001)
    assert c.poll() == []  # that partial heard everything said: no other is needed


def test_nothing_new_nothing_decoded() -> None:
    c = Clock()
    c.feed(0.5, True)
    d = c.partial()
    c.s.partial_done(d, "eight", c.t, True)
    assert c.poll(10.0) == [] and c.s.wake_at() is None  # every sample already heard


def test_wake_at_is_the_sooner_of_due_and_pause() -> None:
    c = Clock(interval_s=0.05, idle_s=1.0)
    c.feed(0.5, True)
    c.s.partial_done(c.partial(), "x", c.t, True)
    c.feed(0.03, True)
    assert c.s.wake_at() == pytest.approx(c.s.next_due)
    assert Clock(partials=False).s.wake_at() is None


def test_partials_off_decodes_nothing_but_segments() -> None:
    c = Clock(partials=False)
    c.feed(2.5, True)
    c.feed(0.4, False)
    c.feed(0.3, True)
    out = c.poll(5.0)
    assert [d.kind for d in out] == ["segment"]


# ---- sub-segments ----------------------------------------------------------------------------


def test_a_pause_cuts_a_segment_in_its_middle() -> None:
    c = Clock()
    p = c.s.p
    c.feed(p.min_segment_s, True)
    c.feed(p.pause_s + FRAME_S, False)
    c.feed(3 * FRAME_S, True)  # speech again: the pause was inside the utterance
    out = c.poll()
    seg = [d for d in out if d.kind == "segment"]
    pause_frames = round((p.pause_s + FRAME_S) / FRAME_S)
    cut = (n(p.min_segment_s) // FRAME + pause_frames - pause_frames // 2) * FRAME
    assert [(d.start, d.end, d.segment) for d in seg] == [(0, cut, 0)]
    assert c.s.seg_start == cut and c.s.segments == [Segment(0, cut)]
    # The tail (half the pause and 3 frames) is too short for a partial yet; once it is not,
    # partials cover the tail alone, and the cut is not made again.
    assert (c.s.fed - cut) / SR < p.min_audio_s
    assert [d.kind for d in out] == ["segment"]
    c.feed(p.min_audio_s, True)
    d = c.partial()
    assert (d.start, d.end) == (cut, c.s.fed) and len(c.s.segments) == 1


P = StreamParams()


@pytest.mark.parametrize("speech_s,pause_s,after_s", [
    # the segment (up to the middle of the pause) would be shorter than min_segment_s
    (P.min_segment_s / 2, 2 * P.pause_s, 0.2),
    (P.min_segment_s + 0.5, P.pause_s - 2 * FRAME_S, 0.2),  # the pause is shorter than pause_s
    (P.min_segment_s + 0.5, 2 * P.pause_s, 0.0),  # no speech after the pause (yet): the end?
])
def test_no_cut(speech_s: float, pause_s: float, after_s: float) -> None:
    c = Clock()
    assert speech_s + pause_s / 2 < P.min_segment_s or pause_s < P.pause_s or after_s == 0
    c.feed(speech_s, True)
    c.feed(pause_s, False)
    c.feed(after_s, True)
    assert [d for d in c.poll() if d.kind == "segment"] == []


def test_segments_off_never_cut() -> None:
    c = Clock(segments=False)
    c.feed(2.5, True)
    c.feed(0.5, False)
    c.feed(0.5, True)
    assert [d for d in c.poll() if d.kind == "segment"] == []


def test_long_speech_is_cut_at_max_segment() -> None:
    c = Clock(max_segment_s=3.0, partials=False)
    c.feed(3.0, True)
    assert c.poll() == []
    c.feed(FRAME_S, True)
    out = c.poll()
    assert [(d.kind, d.start, d.end) for d in out] == [("segment", 0, int(3.0 * SR))]


def test_partial_over_a_cut_previews_its_segment_and_texts_join() -> None:
    c = Clock()
    c.feed(2.1, True)
    d = c.partial()  # covers [0, 2.1 s) while speech goes on
    c.feed(0.4, False)
    c.feed(0.3, True)
    out = c.poll()
    assert [x.kind for x in out] == ["segment"]  # the cut; the partial is still in flight
    c.s.partial_done(d, "eight of spades", c.t, True)
    assert c.s.segments[0].preview == "eight of spades" and c.s.heard is None
    assert c.s.text("four") == "eight of spades four"
    c.s.segment_done(0, "Eight of spades,")
    assert c.s.text("four of clubs") == "Eight of spades, four of clubs"


# ---- the final -------------------------------------------------------------------------------


def heard_all(c: Clock, text: str = "eight of spades") -> None:
    """Speech, then a partial over all of it, then the silence of the release."""
    c.feed(1.0, True)
    c.feed(c.s.p.margin_s, False)
    d = c.partial()
    c.s.partial_done(d, text, c.t, bool(text))


def test_final_reuses_a_partial_that_heard_all_the_speech() -> None:
    c = Clock()
    heard_all(c)
    c.feed(0.25, False)  # the silence while the user lets go: nothing more was said
    plan = c.s.plan_final()
    assert plan == FinalPlan("eight of spades", 0, c.s.fed) and not plan.needs_decode


def test_final_decodes_when_speech_came_after_the_partial() -> None:
    c = Clock()
    heard_all(c)
    c.feed(0.2, True)
    plan = c.s.plan_final()
    assert plan.reuse is None and (plan.start, plan.end) == (0, c.s.fed) and plan.needs_decode


def test_a_wordless_partial_is_not_reused() -> None:
    c = Clock()
    heard_all(c, text="")
    assert c.s.plan_final().reuse is None


def test_reuse_off_always_decodes() -> None:
    c = Clock(reuse=False)
    heard_all(c)
    assert c.s.plan_final().needs_decode and c.s.reuse_if_inflight() is None


def test_a_running_partial_over_all_speech_is_worth_waiting_for() -> None:
    c = Clock()
    c.feed(1.0, True)
    c.feed(c.s.p.margin_s, False)
    d = c.partial()
    assert c.s.reuse_if_inflight() == d.end
    c.feed(0.2, True)  # more speech: that partial no longer covers it
    assert c.s.reuse_if_inflight() is None


@pytest.mark.parametrize("after_s,waits", [(P.cover_s, True), (P.cover_s - FRAME_S, False)])
def test_a_running_partial_is_waited_for_from_exactly_the_cover(after_s: float,
                                                                 waits: bool) -> None:
    c = Clock()
    c.feed(1.0, True)
    c.feed(after_s, False)
    d = c.partial()
    assert d.end == c.s.speech_end + n(after_s)
    c.feed(0.3, False)  # the release flushes silence: the partial heard all the speech or not
    assert c.s.reuse_if_inflight() == (d.end if waits else None)


def test_nothing_said_since_the_last_cut_needs_no_tail_decode() -> None:
    c = Clock(partials=False)
    c.feed(2.1, True)
    c.feed(0.4, False)
    c.feed(0.1, True)
    c.poll()
    c.s.segments[0].text = "eight of spades"
    c.s.speech = c.s.speech[: c.s.seg_start // FRAME]  # no voiced frame after the cut
    plan = c.s.plan_final()
    assert plan == FinalPlan("", c.s.seg_start, c.s.seg_start) and not plan.needs_decode


def test_speech_end_is_the_last_voiced_frame() -> None:
    c = Clock()
    assert c.s.speech_end == 0
    c.feed(0.3, True)
    c.feed(0.3, False)
    assert c.s.speech_end == n(0.3)


# ---- edges (each pins a decision mutation testing found unguarded) ---------------------------


def test_two_pauses_two_cuts_each_in_its_pause() -> None:
    c = Clock(partials=False)
    c.feed(2.1, True)
    c.feed(0.4, False)
    c.feed(2.1, True)
    c.feed(0.4, False)
    c.feed(0.3, True)
    segs = [(d.start, d.end) for d in c.poll() + c.poll() if d.kind == "segment"]
    pause = round(0.4 / FRAME_S)
    first = (70 + pause - pause // 2) * FRAME
    second = (70 + pause + 70 + pause - pause // 2) * FRAME
    assert segs == [(0, first), (first, second)]


def test_a_second_segment_needs_min_segment_of_its_own() -> None:
    c = Clock(partials=False)
    c.feed(2.1, True)
    c.feed(0.4, False)
    c.feed(0.3, True)
    assert len([d for d in c.poll() if d.kind == "segment"]) == 1
    c.feed(0.4, False)  # a pause 0.5 s into the new segment: too short a segment to cut
    c.feed(0.3, True)
    assert c.poll() == [] and len(c.s.segments) == 1


def test_speech_before_the_segment_start_does_not_count() -> None:
    # The new segment starts in the middle of a pause: no voice has been heard in it yet, so
    # the rest of that pause is not a pause "between speech" inside it.
    c = Clock(partials=False, min_segment_s=0.1)
    c.feed(2.1, True)
    c.feed(0.4, False)
    c.feed(0.3, True)
    c.poll()
    assert len(c.s.segments) == 1
    c.feed(0.1, True)
    assert c.poll() == []  # not cut again at the tail of the same pause


def test_leading_silence_is_not_a_pause_between_speech() -> None:
    c = Clock(partials=False, min_segment_s=0.1)
    c.feed(0.4, False)
    c.feed(0.5, True)
    assert c.poll() == []


@pytest.mark.parametrize("pause_s,frames", [(0.01, 1), (0.3149, 10), (0.345, 12)])
def test_pause_length_in_frames(pause_s: float, frames: int) -> None:
    # A pause of exactly `frames` 30 ms frames cuts; one frame less does not.
    for run, cuts in ((frames - 1, False), (frames, True)):
        c = Clock(partials=False, pause_s=pause_s, min_segment_s=0.5)
        c.feed(1.2, True)
        c.feed(run * FRAME_S, False)
        c.feed(FRAME_S, True)
        assert bool([d for d in c.poll() if d.kind == "segment"]) is cuts, (pause_s, run)


def test_a_segment_of_exactly_min_segment_is_cut() -> None:
    c = Clock(partials=False, min_segment_s=1.2)  # 40 frames
    c.feed(35 * FRAME_S, True)
    c.feed(10 * FRAME_S, False)  # the pause's middle is frame 40
    c.feed(FRAME_S, True)
    assert [(d.start, d.end) for d in c.poll()] == [(0, 40 * FRAME)]


def test_max_segment_cuts_again_a_whole_segment_later() -> None:
    c = Clock(max_segment_s=1.0, partials=False)
    c.feed(1.02, True)
    assert [(d.start, d.end) for d in c.poll()] == [(0, SR)]
    c.feed(0.9, True)
    assert c.poll() == []  # 0.92 s into the second segment
    c.feed(0.12, True)
    assert [(d.start, d.end) for d in c.poll()] == [(SR, 2 * SR)]


def test_a_cut_off_the_frame_grid_then_a_pause() -> None:
    c = Clock(max_segment_s=1.01, partials=False, min_segment_s=0.5)  # 16160: not a frame
    c.feed(1.05, True)
    assert [(d.start, d.end) for d in c.poll()] == [(0, 16160)]
    c.feed(0.6, True)
    c.feed(0.4, False)
    c.feed(FRAME_S, True)
    seg = [(d.start, d.end) for d in c.poll()]
    # The pause's frames are counted from the first whole frame of the segment.
    pause = round(0.4 / FRAME_S)
    assert seg == [(16160, (round(1.65 / FRAME_S) + pause - pause // 2) * FRAME)]


def test_decodes_are_counted() -> None:
    c = Clock()
    c.feed(0.5, True)
    c.s.partial_done(c.partial(), "a", c.t, True)
    c.feed(0.5, True)
    c.partial()
    assert c.s.decodes == 2


def test_due_exactly_at_next_due_and_paused_exactly_at_idle() -> None:
    s = Scheduler(StreamParams(interval_s=0.5, idle_s=0.125, segments=False))
    s.feed(n(0.6), 1.0, [True] * 20)
    d = s.poll(1.0)[0]
    s.partial_done(d, "a", 1.0, True)
    s.feed(FRAME, 1.25, [True])
    assert s.poll(1.25) == []
    s.feed(FRAME, 1.5, [True])  # audio still flowing: not a pause
    assert s.next_due == 1.5 and s.poll(1.5) != []  # due at exactly next_due
    s2 = Scheduler(StreamParams(interval_s=60.0, idle_s=0.125, segments=False))
    s2.feed(n(0.6), 1.0, [True] * 20)
    s2.partial_done(s2.poll(1.0)[0], "a", 1.0, True)
    s2.feed(FRAME, 2.0, [True])
    assert s2.poll(2.0) == []
    assert s2.poll(2.125) != []  # paused at exactly idle_s


def test_no_speech_heard_a_shed_partial_waits_its_retry() -> None:
    c = Clock()
    c.feed(0.5, False)  # the lenient VAD heard nothing voiced
    d = c.partial()
    c.s.partial_done(d, None, c.t, False)  # shed
    assert c.poll() == []
    assert c.poll(c.s.p.retry_s) != []


def test_wake_at_before_any_partial() -> None:
    c = Clock(interval_s=0.4)
    c.feed(0.1, True)
    assert c.s.wake_at() == pytest.approx(min(0.0, c.t + c.s.p.idle_s))


def test_reuse_needs_the_cover_after_the_speech() -> None:
    c = Clock()
    c.feed(1.0, True)
    c.feed(c.s.p.cover_s / 2, False)
    d = c.partial()  # heard the speech and only half the cover after it
    c.s.partial_done(d, "eight of spades", c.t, True)
    c.feed(0.3, False)
    assert c.s.plan_final().needs_decode  # the end of the last word may be cut off


def test_a_periodic_partial_that_heard_the_cover_is_the_final() -> None:
    """Less silence than `margin_s` (no endpoint yet) but the cover: reused, not redone."""
    c = Clock()
    assert c.s.p.cover_s < c.s.p.margin_s
    c.feed(1.0, True)
    c.feed(c.s.p.cover_s, False)
    d = c.partial()
    assert not d.endpoint
    c.s.partial_done(d, "eight of spades", c.t, True)
    c.feed(0.3, False)
    assert c.s.plan_final() == FinalPlan("eight of spades", 0, c.s.fed)
    # ... and the silence that follows does not ask for an endpoint partial: it heard it all.
    assert not any(d.endpoint for d in c.poll())


def test_no_voice_at_all_the_partial_must_cover_everything() -> None:
    c = Clock()
    c.feed(0.6, False)
    d = c.partial()
    c.s.partial_done(d, "mumble", c.t, True)
    c.feed(0.3, False)
    plan = c.s.plan_final()
    assert plan.reuse is None and (plan.start, plan.end) == (0, c.s.fed)


def test_no_voice_and_no_segments_still_decodes() -> None:
    # The lenient VAD may miss soft speech: without segments the model decides, not the VAD.
    c = Clock(partials=False)
    c.feed(1.0, False)
    assert c.s.plan_final() == FinalPlan(None, 0, c.s.fed)


def test_speech_ending_exactly_at_a_cut_needs_no_tail_decode() -> None:
    c = Clock(max_segment_s=3.0, partials=False)
    c.feed(3.0, True)
    c.feed(0.5, False)
    c.poll()
    assert c.s.seg_start == 3 * SR == c.s.speech_end
    assert c.s.plan_final() == FinalPlan("", 3 * SR, 3 * SR)


def test_a_preview_goes_to_the_segment_it_started_on() -> None:
    c = Clock(max_segment_s=1.0)
    c.feed(0.5, True)
    d = c.partial()  # from 0, still running while two cuts are made
    c.feed(1.6, True)
    c.poll()
    c.poll()
    assert [s.start for s in c.s.segments] == [0, SR]
    c.s.partial_done(d, "early words", c.t, True)
    assert [s.preview for s in c.s.segments] == ["early words", ""]
    c.s.segment_done(0, "Eight of spades")
    d2 = Decode("partial", 0, SR)
    c.s.partial_done(d2, "stale", c.t, True)  # decoded already: its text stands
    assert c.s.text("") == "Eight of spades"
