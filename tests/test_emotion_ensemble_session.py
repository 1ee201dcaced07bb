"""Pure parts of speech emotion: labels, the SenseVoice mapping, ensembles, session summaries."""

from __future__ import annotations

import numpy as np
import pytest

from agent.emotion.classifier import EmotionResult, result_from_probabilities
from agent.emotion.ensemble import combine
from agent.emotion.labels import LABELS, VALENCE, canonical, expected_valence
from agent.emotion.sense_voice import (
    SENSE_VOICE_EMOTIONS,
    emotion_from_sense_voice,
    map_sense_voice_emotion,
)
from agent.emotion.session import SessionTracker, summarize
from agent.errors import EmotionError
from agent.events import EmotionDetected, EmotionSession


def res(model: str, **probs: float) -> EmotionResult:
    """A result from (unnormalised) probabilities."""
    return result_from_probabilities(probs, model)


def test_label_set_is_documented_and_complete() -> None:
    """Eight labels, each with a valence in [-1, 1]; happy is the most positive."""
    assert len(LABELS) == 8 and set(VALENCE) == set(LABELS)
    assert all(-1.0 <= v <= 1.0 for v in VALENCE.values())
    assert max(VALENCE, key=lambda k: VALENCE[k]) == "happy"
    assert canonical("Anger") == "angry" and canonical("DISGUSTED") == "disgust"
    assert canonical("other") is None
    assert canonical("x", {"x": "sad"}) == "sad" and canonical("x", {"x": "bored"}) is None


def test_sense_voice_tags_map_onto_the_label_set() -> None:
    """Every SenseVoice emotion tag has a label; unknown or missing tags give none."""
    assert set(SENSE_VOICE_EMOTIONS.values()) <= set(LABELS)
    assert map_sense_voice_emotion("<|HAPPY|>") == "happy"
    assert map_sense_voice_emotion("<|DISGUSTED|>") == "disgust"
    assert map_sense_voice_emotion(" <|neutral|> ") == "neutral"
    for tag in ("<|EMO_UNKNOWN|>", "<|EMO1|>", "", None, "<|en|>", "hello"):
        assert map_sense_voice_emotion(tag) is None, tag
    r = emotion_from_sense_voice("<|SAD|>", "sense-voice-int8", event="<|Speech|>",
                                 lang="<|en|>")
    assert r is not None and r.label == "sad" and r.confidence == 1.0 and not r.calibrated
    assert r.probabilities["sad"] == 1.0 and sum(r.probabilities.values()) == 1.0
    assert r.extra == {"tag": "SAD", "event": "Speech", "language": "en"}
    assert emotion_from_sense_voice("<|EMO_UNKNOWN|>", "sv") is None


def test_ensemble_averages_probabilities() -> None:
    """Final = mean distribution's argmax; best = most confident; consensus = all agree."""
    a = res("a", happy=0.6, neutral=0.4)
    b = res("b", neutral=0.55, happy=0.45)
    e = combine([a, b])
    assert e.final.label == "happy"
    assert e.final.probabilities["happy"] == pytest.approx(0.525)
    assert e.final.confidence == pytest.approx(0.525)
    assert e.best_model == "a" and e.models_consensus is False
    assert e.final.model_id == "a+b"
    same = combine([a, res("c", happy=0.9, sad=0.1)])
    assert same.models_consensus is True and same.best_model == "c"
    # every label averaged, not only the winners: mass sums to one
    assert sum(e.final.probabilities.values()) == pytest.approx(1.0)


def test_ensemble_prefers_calibrated_models_as_best() -> None:
    """A one-hot SenseVoice tag (always 100 %) is the best model only if no other is calibrated."""
    tag = emotion_from_sense_voice("<|ANGRY|>", "sv")
    assert tag is not None
    e = combine([tag, res("cnn", angry=0.7, sad=0.3)])
    assert e.best_model == "cnn" and e.models_consensus and e.final.label == "angry"
    assert not e.final.calibrated


def test_ensemble_edge_cases_and_event_fields() -> None:
    """One model passes through; none is an error; the fields make a valid event."""
    a = res("a", calm=3.0, sad=1.0)
    single = combine([a])
    assert single.final is a and single.models_consensus
    assert single.event_fields()["models"] == [] and single.event_fields()["best_model"] is None
    with pytest.raises(EmotionError) as e:
        combine([])
    assert e.value.code == "no_result"
    fields = combine([a, res("b", sad=1.0)]).event_fields()
    ev = EmotionDetected(device_id="t", utterance_id="u", **fields)
    assert ev.label == fields["label"] and len(ev.models) == 2 and ev.models_consensus is False


def test_session_summary() -> None:
    """Distribution, stability (label changes), valence 0-100 and the dominant emotion."""
    seq = [res("m", happy=1.0), res("m", happy=1.0), res("m", sad=1.0), res("m", happy=1.0)]
    s = summarize(seq)
    assert s.utterances == 4
    assert s.distribution["happy"] == 0.75 and s.distribution["sad"] == 0.25
    assert sum(s.distribution.values()) == pytest.approx(1.0)
    assert s.stability == pytest.approx(1 - 2 / 3)  # two changes over three transitions
    want = 50 * (1 + (3 * VALENCE["happy"] + VALENCE["sad"]) / 4)
    assert s.valence == pytest.approx(want)
    assert s.dominant == "happy"
    EmotionSession(device_id="t", session_id="s", **s.to_dict())  # valid event fields


def test_session_summary_bounds_and_ties() -> None:
    """Valence spans 0..100; ties go to the larger summed confidence; empty is neutral."""
    assert summarize([res("m", happy=1.0)]).valence == pytest.approx(90.0)
    assert summarize([res("m", angry=1.0)]).valence == pytest.approx(10.0)
    assert 0 <= summarize([res("m", **{k: 1.0 for k in LABELS})]).valence <= 100
    tie = summarize([res("m", sad=0.9, happy=0.1), res("m", happy=0.6, sad=0.4)])
    assert tie.dominant == "sad" and tie.stability == 0.0
    empty = summarize([])
    assert (empty.utterances, empty.dominant, empty.stability, empty.valence) == (0, None, 1.0,
                                                                                  50.0)
    assert expected_valence({"happy": 0.5, "sad": 0.5}) == pytest.approx(
        (VALENCE["happy"] + VALENCE["sad"]) / 2)


def test_session_tracker() -> None:
    """Per-session accumulation, close forgets, and a bounded number of open sessions."""
    t = SessionTracker(max_sessions=2)
    t.add("s1", res("m", calm=1.0))
    t.add("s1", res("m", calm=1.0))
    t.add("s2", res("m", angry=1.0))
    s1 = t.summary("s1")
    assert s1 is not None and s1.utterances == 2 and s1.stability == 1.0
    assert t.summary("nope") is None
    t.add("s3", res("m", sad=1.0))  # over the bound: s1, the oldest, goes
    assert set(t.sessions()) == {"s2", "s3"}
    closed = t.close("s2")
    assert closed is not None and closed.dominant == "angry"
    assert t.close("s2") is None and t.sessions() == ["s3"]


def test_results_normalise_and_refuse_empty_mass() -> None:
    """Probabilities are renormalised over the label set; no mass at all is an error."""
    r = res("m", happy=2.0, sad=2.0)
    assert r.probabilities["happy"] == 0.5 and r.label == "happy"  # tie: label order
    with pytest.raises(EmotionError):
        res("m", happy=0.0)
    assert np.isclose(sum(res("m", fearful=0.2).probabilities.values()), 1.0)
