"""The segmenter state machine, driven by durations only (no audio)."""

from __future__ import annotations

from agent.vad.segmenter import Segmenter, SegmenterParams, SegmentEvent

FRAME = 10.0  # ms: one frame = 10 ms keeps the arithmetic readable


def run(seg: Segmenter, pattern: list[tuple[bool, int]]) -> list[SegmentEvent]:
    """Feed (is_speech, duration_ms) runs; collect every boundary."""
    out: list[SegmentEvent] = []
    for speech, ms in pattern:
        for _ in range(int(ms / FRAME)):
            out += seg.feed(speech)
    return out


def params(**kw: float) -> SegmenterParams:
    base = dict(min_speech_ms=100, min_silence_ms=300, max_utterance_ms=10_000,
                pre_roll_ms=50, post_roll_ms=40)
    base.update(kw)
    return SegmenterParams(frame_ms=FRAME, **base)


def kinds(events: list[SegmentEvent]) -> list[tuple[str, int]]:
    return [(e.kind, e.frame) for e in events]


def test_one_utterance_with_pre_and_post_roll() -> None:
    seg = Segmenter(params())
    ev = run(seg, [(False, 500), (True, 1000), (False, 500)])
    assert kinds(ev) == [
        ("speech_start", 50), ("utterance_start", 45),  # 50 ms pre-roll
        ("speech_end", 150), ("utterance_end", 154),  # 40 ms post-roll
    ]
    assert ev[-1].reason == "silence"


def test_speech_shorter_than_min_speech_is_ignored() -> None:
    seg = Segmenter(params())
    assert run(seg, [(False, 200), (True, 90), (False, 500), (True, 50), (False, 300)]) == []


def test_pause_shorter_than_min_silence_keeps_one_utterance() -> None:
    seg = Segmenter(params())
    ev = run(seg, [(True, 400), (False, 290), (True, 400), (False, 400)])
    assert [e.kind for e in ev] == ["speech_start", "utterance_start", "speech_end",
                                    "utterance_end"]
    assert ev[2].frame == 109  # end of the second speech run, not the first


def test_pause_of_min_silence_splits() -> None:
    seg = Segmenter(params())
    ev = run(seg, [(True, 400), (False, 300), (True, 400), (False, 400)])
    assert [e.kind for e in ev].count("utterance_start") == 2
    # The second utterance's pre-roll may not reach back into the first one.
    ends = [e.frame for e in ev if e.kind == "utterance_end"]
    starts = [e.frame for e in ev if e.kind == "utterance_start"]
    assert starts[1] >= ends[0]


def test_pre_roll_clamped_at_gate_opening() -> None:
    seg = Segmenter(params(pre_roll_ms=500))
    seg.open_at(1000)
    ev = run(seg, [(True, 200)])
    assert kinds(ev) == [("speech_start", 1000), ("utterance_start", 1000)]


def test_max_length_splits_continuous_speech() -> None:
    seg = Segmenter(params(max_utterance_ms=1000))
    ev = run(seg, [(True, 2500), (False, 400)])
    assert [(e.kind, e.frame, e.reason) for e in ev if e.kind.startswith("utterance")] == [
        ("utterance_start", 0, ""),
        ("utterance_end", 100, "max_length"), ("utterance_start", 100, ""),
        ("utterance_end", 200, "max_length"), ("utterance_start", 200, ""),
        ("utterance_end", 254, "silence"),
    ]
    # Speech itself started and ended once.
    assert [e.kind for e in ev].count("speech_start") == 1
    assert [e.kind for e in ev].count("speech_end") == 1


def test_max_length_during_a_pause_ends_at_the_speech() -> None:
    seg = Segmenter(params(max_utterance_ms=1000, min_silence_ms=500))
    ev = run(seg, [(True, 900), (False, 200)])
    assert kinds(ev)[-2:] == [("speech_end", 90), ("utterance_end", 94)]
    assert ev[-1].reason == "max_length"
    assert not seg.in_utterance


def test_flush_ends_open_utterance_with_reason() -> None:
    seg = Segmenter(params())
    run(seg, [(True, 500), (False, 100)])
    ev = seg.flush("ptt_stop")
    assert kinds(ev) == [("speech_end", 50), ("utterance_end", 54)]
    assert ev[-1].reason == "ptt_stop"
    assert seg.flush("ptt_stop") == []


def test_commit_frame_holds_back_trailing_silence() -> None:
    seg = Segmenter(params())
    run(seg, [(True, 500)])
    assert seg.commit_frame == 50
    run(seg, [(False, 200)])
    # Only post-roll worth of the pause is committed until we know speech is over.
    assert seg.commit_frame == 54
    run(seg, [(True, 10)])
    assert seg.commit_frame == 71


def test_post_roll_never_exceeds_min_silence() -> None:
    seg = Segmenter(params(min_silence_ms=100, post_roll_ms=500))
    ev = run(seg, [(True, 300), (False, 200)])
    assert kinds(ev)[-1] == ("utterance_end", 40)


def test_params_from_config_map_every_field() -> None:
    from agent.config import SegmenterConfig

    cfg = SegmenterConfig(min_speech_ms=90, min_silence_ms=450, max_utterance_s=7.5,
                          pre_roll_ms=60, post_roll_ms=30)
    p = SegmenterParams.from_config(cfg, 30.0)
    assert p == SegmenterParams(frame_ms=30.0, min_speech_ms=90, min_silence_ms=450,
                                max_utterance_ms=7500, pre_roll_ms=60, post_roll_ms=30)
    seg = Segmenter(p)
    assert seg.p is p  # kept: the pipeline re-derives frame timing from it on reload
    assert (seg.min_speech, seg.min_silence, seg.max_frames, seg.pre_roll, seg.post_roll) == \
        (3, 15, 250, 2, 1)


def test_exactly_min_speech_starts_one_frame_less_does_not() -> None:
    # From the very first frame: no speech may be counted before any was fed.
    seg = Segmenter(params())
    assert run(seg, [(True, 90), (False, 10)]) == []
    ev = run(seg, [(True, 100)])
    assert kinds(ev) == [("speech_start", 10), ("utterance_start", 5)]


def test_a_blip_of_min_speech_then_silence_ends_min_silence_later() -> None:
    seg = Segmenter(params())
    ev = run(seg, [(True, 100), (False, 300)])
    assert kinds(ev) == [("speech_start", 0), ("utterance_start", 0),
                         ("speech_end", 10), ("utterance_end", 14)]
    assert ev[-1].reason == "silence"


def test_the_next_utterance_needs_min_speech_again() -> None:
    seg = Segmenter(params())
    run(seg, [(True, 200), (False, 300)])  # one utterance, ended by silence at frame 50
    assert run(seg, [(True, 90), (False, 10)]) == []
    ev = run(seg, [(True, 100)])
    assert [e.kind for e in ev] == ["speech_start", "utterance_start"]
    assert ev[0].frame == 60


def test_zero_durations_mean_one_frame() -> None:
    seg = Segmenter(params(min_speech_ms=0, min_silence_ms=0, pre_roll_ms=0, post_roll_ms=0))
    ev = run(seg, [(False, 10), (True, 10), (False, 10)])
    assert kinds(ev) == [("speech_start", 1), ("utterance_start", 1),
                         ("speech_end", 2), ("utterance_end", 2)]


def test_max_length_shorter_than_the_start_keeps_every_boundary() -> None:
    # Pre-roll plus min speech already exceed the maximum: the utterance is cut at once,
    # and its start is still reported.
    seg = Segmenter(params(max_utterance_ms=20, pre_roll_ms=50))
    ev = run(seg, [(False, 100), (True, 100)])
    assert kinds(ev)[:4] == [("speech_start", 10), ("utterance_start", 5),
                             ("utterance_end", 20), ("utterance_start", 20)]
    assert seg.max_frames == 2


def test_after_a_flush_the_stream_goes_on() -> None:
    # A reset in vad mode flushes mid-speech and feeding continues (no open_at): speech
    # counted before the flush does not count towards the next utterance.
    seg = Segmenter(params())
    run(seg, [(True, 200)])
    seg.flush("reset")
    run(seg, [(False, 10)])
    assert run(seg, [(True, 90), (False, 10)]) == []
    ev = run(seg, [(True, 100)])
    assert kinds(ev)[0] == ("speech_start", 31)
    seg2 = Segmenter(params())
    run(seg2, [(True, 50)])  # shorter than min speech: not an utterance yet
    assert seg2.flush("ptt_stop") == []
    assert kinds(run(seg2, [(True, 100)]))[0] == ("speech_start", 5)
