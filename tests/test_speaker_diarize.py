"""Diarization on real speech: two shared speakers taking turns, named from the store."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent import models
from agent.errors import ModelError, SpeakerError
from agent.speaker.diarize import diarize, speech_regions
from agent.speaker.embedder import Ge2eEmbedder
from agent.speaker.store import VoiceprintStore

from .conftest import SHARED, need_shared

SPEAKERS_EN = SHARED / "data" / "speakers-en"
MODEL_ID = "ge2e-resemblyzer"
BOUNDARY_S = 0.5  # the bound on turn boundary error
GAP_S = 0.5  # a natural pause between turns


@pytest.fixture(scope="module")
def ge2e() -> Ge2eEmbedder:
    need_shared()
    try:
        return Ge2eEmbedder(models.path(MODEL_ID))
    except ModelError as e:
        pytest.skip(f"speaker model {MODEL_ID} not installed ({e.message})")


def speech_only(path: Path, max_s: float = 6.0) -> np.ndarray:
    """A clip without its leading/trailing silence, so that its turn has crisp edges."""
    x, sr = sf.read(path, dtype="float32")
    assert sr == 16000
    r = speech_regions(x)
    return x[int(r[0][0] * sr):int(r[-1][1] * sr)][:int(max_s * sr)]


def alternate(a: str, b: str, turns: int = 6) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """a1 b1 a2 b2 ... with GAP_S pauses; returns the audio and the true (start, end, speaker)."""
    files = {s: sorted((SPEAKERS_EN / s).glob("*.flac")) for s in (a, b)}
    parts: list[np.ndarray] = []
    truth = []
    t = 0.0
    for k in range(turns):
        s = (a, b)[k % 2]
        x = speech_only(files[s][k // 2])
        if parts:
            parts.append(np.zeros(int(GAP_S * 16000), np.float32))
            t += GAP_S
        truth.append((t, t + len(x) / 16000, s))
        parts.append(x)
        t += len(x) / 16000
    return np.concatenate(parts), truth


def check_turns(result, truth) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Each true turn is one label's, with both edges within BOUNDARY_S; labels map 1:1."""
    label_of: dict[str, str] = {}
    for start, end, spk in truth:
        inside = [s for s in result.segments if min(end, s.end) - max(start, s.start) > 0]
        by_label: dict[str, float] = {}
        for s in inside:
            by_label[s.label] = by_label.get(s.label, 0.0) + min(end, s.end) - max(start, s.start)
        label = max(by_label, key=lambda k: by_label[k])
        assert label_of.setdefault(spk, label) == label, (spk, label_of, label)
        # the other label covers (almost) none of this turn
        assert sum(v for k, v in by_label.items() if k != label) <= BOUNDARY_S
        mine = [s for s in inside if s.label == label]
        assert abs(min(s.start for s in mine) - start) <= BOUNDARY_S, (start, mine)
        assert abs(max(s.end for s in mine) - end) <= BOUNDARY_S, (end, mine)
    assert len(set(label_of.values())) == len(label_of)
    return label_of


@pytest.mark.parametrize("pair", [("1688", "1998"), ("2414", "2609"), ("3331", "533")])
def test_two_speakers_taking_turns(ge2e: Ge2eEmbedder, pair: tuple[str, str]) -> None:
    """Man/woman, two men, two women; with and without being told how many speak."""
    audio, truth = alternate(*pair)
    for n in (None, 2):
        res = diarize(audio, ge2e, num_speakers=n)
        assert len(res.speakers) == 2, (n, res.speakers)
        check_turns(res, truth)
        segs = res.segments
        assert all(0 <= s.start < s.end <= res.audio_s + 1e-6 for s in segs)
        assert all(a.end <= b.start + 1e-6 for a, b in itertools.pairwise(segs))
        assert all(0.0 <= s.confidence <= 1.0 for s in segs)
        assert np.mean([s.confidence for s in segs]) > 0.8
        assert all(s.name is None and s.speaker_id is None for s in segs)  # no store given


def test_enrolled_speakers_are_named(ge2e: Ge2eEmbedder, tmp_path: Path) -> None:
    a, b = "1688", "1998"
    audio, truth = alternate(a, b)
    store = VoiceprintStore(tmp_path, threshold=0.76)
    # enrol only speaker a, from clips that are not in the recording
    enrol = sorted((SPEAKERS_EN / a).glob("*.flac"))[5:8]
    store.register("Winam", [ge2e.extract(sf.read(p, dtype="float32")[0]) for p in enrol])
    res = diarize(audio, ge2e, store=store)
    label_of = check_turns(res, truth)
    by_label = {s["label"]: s for s in res.speakers}
    assert by_label[label_of[a]]["name"] == "Winam"
    assert by_label[label_of[b]]["name"] is None  # unknown voice, not forced onto Winam
    assert by_label[label_of[b]]["score"] < by_label[label_of[a]]["score"]
    for seg in res.segments:
        assert (seg.name == "Winam") == (seg.label == label_of[a])
    d = res.to_dict()
    assert d["num_speakers"] == 2 and len(d["segments"]) == len(res.segments)
    store.close()


def test_one_speaker_and_bad_input(ge2e: Ge2eEmbedder) -> None:
    x = np.concatenate([speech_only(p) for p in sorted((SPEAKERS_EN / "3005").glob("*.flac"))[:3]])
    res = diarize(x, ge2e)
    assert len(res.speakers) == 1 and {s.label for s in res.segments} == {"SPEAKER_00"}
    for bad, code in [(np.zeros(16000 * 3, np.float32), "silent"),
                      (np.zeros(100, np.float32), "too_short"),
                      (np.full(16000, np.nan, np.float32), "bad_audio")]:
        with pytest.raises(SpeakerError) as e:
            diarize(bad, ge2e)
        assert e.value.code == code
    with pytest.raises(SpeakerError) as e:
        diarize(x, ge2e, num_speakers=0)
    assert e.value.code == "bad_request"
