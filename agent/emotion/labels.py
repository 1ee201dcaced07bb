"""The one emotion label set every backend maps onto, with a valence per label.

Labels are the eight RAVDESS categories, in RAVDESS code order (01 neutral ... 08 surprised):

| label     | valence | notes                                                         |
|-----------|---------|---------------------------------------------------------------|
| neutral   |  0.0    | SenseVoice NEUTRAL                                            |
| calm      | +0.3    | RAVDESS only: low arousal, mildly pleasant                     |
| happy     | +0.8    | SenseVoice HAPPY                                              |
| sad       | -0.7    | SenseVoice SAD                                                |
| angry     | -0.8    | SenseVoice ANGRY                                              |
| fearful   | -0.7    | SenseVoice FEARFUL                                            |
| disgust   | -0.6    | SenseVoice DISGUSTED                                          |
| surprised | +0.2    | SenseVoice SURPRISED; ambiguous in valence, slightly positive |

Valence is in [-1, 1] (placements on Russell's circumplex as commonly cited; coarse on
purpose). A session's 0-100 valence score is 50 * (1 + mean expected valence).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = (
    "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised",
)

VALENCE: dict[str, float] = {
    "neutral": 0.0,
    "calm": 0.3,
    "happy": 0.8,
    "sad": -0.7,
    "angry": -0.8,
    "fearful": -0.7,
    "disgust": -0.6,
    "surprised": 0.2,
}

# RAVDESS file names: modality-channel-EMOTION-intensity-statement-repetition-actor.wav
RAVDESS_CODES: dict[int, str] = {i + 1: label for i, label in enumerate(LABELS)}

# Other spellings backends use, lower-cased -> canonical label.
SYNONYMS: dict[str, str] = {
    "neu": "neutral",
    "hap": "happy",
    "happiness": "happy",
    "joy": "happy",
    "sadness": "sad",
    "ang": "angry",
    "anger": "angry",
    "fear": "fearful",
    "disgusted": "disgust",
    "sur": "surprised",
    "surprise": "surprised",
}


def canonical(label: str, label_map: Mapping[str, str] | None = None) -> str | None:
    """A backend's label -> the canonical one (None when it has no equivalent)."""
    if label_map is not None and label in label_map:
        mapped = label_map[label]
        return mapped if mapped in VALENCE else None
    key = label.strip().lower()
    if key in VALENCE:
        return key
    return SYNONYMS.get(key)


def expected_valence(probabilities: Mapping[str, float]) -> float:
    """Probability-weighted valence in [-1, 1] (unknown labels ignored, mass renormalised)."""
    total = sum(p for label, p in probabilities.items() if label in VALENCE)
    if total <= 0:
        return 0.0
    return sum(VALENCE[label] * p for label, p in probabilities.items() if label in VALENCE) / total
