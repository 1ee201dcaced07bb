"""The status tracker: "last" results are the newest utterance's, in whatever order they come."""

from __future__ import annotations

from agent.app.status import ORDER_KEPT, StatusTracker
from agent.events import AsrFinal, EmotionDetected, SpeakerIdentified, UtteranceStarted

DEV = "dev"


def started(u: str) -> UtteranceStarted:
    return UtteranceStarted(device_id=DEV, utterance_id=u, audio_start_s=0.0)


def speaker(u: str, name: str) -> SpeakerIdentified:
    return SpeakerIdentified(device_id=DEV, utterance_id=u, speaker_id=None, name=name,
                             score=0.5, is_match=False, model="m")


def final(u: str, text: str) -> AsrFinal:
    return AsrFinal(device_id=DEV, utterance_id=u, text=text, language="en", model="m",
                    audio_s=1.0, decode_ms=1.0, eos_to_final_ms=1.0, partials=0)


def emotion(u: str, label: str) -> EmotionDetected:
    return EmotionDetected(device_id=DEV, utterance_id=u, label=label, confidence=0.9,
                           probabilities={label: 0.9}, model="m")


def test_a_late_result_of_an_older_utterance_does_not_replace_the_newest() -> None:
    t = StatusTracker()
    for ev in (started("u1"), started("u2"), speaker("u2", "bea"), final("u2", "two"),
               emotion("u2", "happy"),
               # u1's results come last (its final decoded longer; the speaker waited for it)
               speaker("u1", "ann"), final("u1", "one"), emotion("u1", "sad")):
        t.apply(ev)
    assert t.last_speaker is not None and t.last_speaker.name == "bea"
    assert t.last_final is not None and t.last_final.text == "two"
    assert t.last_emotion is not None and t.last_emotion.label == "happy"
    t.apply(started("u3"))
    t.apply(speaker("u3", "cid"))
    assert t.last_speaker.name == "cid"


def test_results_of_utterances_it_never_saw_start_count_as_newest() -> None:
    # /ws/asr and uploads have no utterance.started on the bus: never held back.
    t = StatusTracker()
    t.apply(started("u1"))
    t.apply(final("u1", "one"))
    t.apply(final("ws-7", "from a kiosk"))
    assert t.last_final is not None and t.last_final.text == "from a kiosk"
    t.apply(final("u1", "one again"))
    assert t.last_final.text == "one again"


def test_it_remembers_a_bounded_number_of_utterances() -> None:
    t = StatusTracker()
    for i in range(ORDER_KEPT + 10):
        t.apply(started(f"u{i}"))
    assert len(t._order) == ORDER_KEPT
