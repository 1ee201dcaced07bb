"""SenseVoice (sherpa-onnx) as an emotion backend: its emotion tag mapped onto our labels.

`OfflineRecognizer.from_sense_voice` decodes four leading tags before the text: language,
emotion, audio event, text-normalisation. sherpa-onnx puts the first three on the result as
`result.lang` ("<|en|>"), `result.emotion` ("<|HAPPY|>") and `result.event` ("<|Speech|>").
SenseVoice gives a tag, not probabilities, so its results are one-hot and `calibrated=False`
(the ensemble then prefers calibrated models as the best model).

The ASR analyser already decodes every utterance with SenseVoice when it is the ASR model:
`emotion_from_sense_voice(result.emotion, ...)` turns that result into an EmotionResult
without a second decode. `SenseVoiceEmotionClassifier` decodes by itself when it is not.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from agent.constants import PIPELINE_RATE
from agent.emotion.classifier import (
    MIN_AUDIO_S,
    EmotionClassifier,
    EmotionResult,
    check_audio,
    result_from_probabilities,
)
from agent.errors import EmotionError

log = logging.getLogger(__name__)

#: SenseVoice emotion tokens -> canonical labels. EMO_UNKNOWN (and the reserved EMO1..) map
#: to nothing: SenseVoice had no opinion.
SENSE_VOICE_EMOTIONS: dict[str, str] = {
    "NEUTRAL": "neutral",
    "HAPPY": "happy",
    "SAD": "sad",
    "ANGRY": "angry",
    "FEARFUL": "fearful",
    "DISGUSTED": "disgust",
    "SURPRISED": "surprised",
}


def strip_tag(tag: str | None) -> str:
    """"<|HAPPY|>" -> "HAPPY" (and "" for None or an empty tag)."""
    t = (tag or "").strip()
    if t.startswith("<|") and t.endswith("|>"):
        t = t[2:-2]
    return t.strip()


def map_sense_voice_emotion(tag: str | None) -> str | None:
    """A SenseVoice emotion tag -> canonical label, or None (unknown, absent, not a tag)."""
    return SENSE_VOICE_EMOTIONS.get(strip_tag(tag).upper())


def emotion_from_sense_voice(emotion: str | None, model_id: str, *, event: str | None = None,
                             lang: str | None = None,
                             compute_ms: float = 0.0) -> EmotionResult | None:
    """EmotionResult from a SenseVoice result's tags; None when it tagged no known emotion."""
    label = map_sense_voice_emotion(emotion)
    if label is None:
        return None
    extra = {"tag": strip_tag(emotion), "event": strip_tag(event) or None,
             "language": strip_tag(lang) or None}
    return result_from_probabilities({label: 1.0}, model_id, compute_ms, calibrated=False,
                                     extra=extra)


class SenseVoiceEmotionClassifier(EmotionClassifier):
    """Decodes each clip with a sherpa-onnx SenseVoice recognizer and reads its emotion tag."""

    def __init__(self, recognizer: Any, model_id: str = "sense-voice-int8",
                 min_audio_s: float = MIN_AUDIO_S) -> None:
        self.recognizer = recognizer
        self.model_id = model_id
        self.min_audio_s = min_audio_s
        self.labels = tuple(dict.fromkeys(SENSE_VOICE_EMOTIONS.values()))

    @classmethod
    def from_files(cls, model: str, tokens: str, model_id: str = "sense-voice-int8",
                   threads: int = 1) -> SenseVoiceEmotionClassifier:
        """Build the recognizer from SenseVoice model.onnx + tokens.txt."""
        import sherpa_onnx

        rec = sherpa_onnx.OfflineRecognizer.from_sense_voice(
            model=model, tokens=tokens, num_threads=threads, use_itn=False)
        return cls(rec, model_id)

    def classify(self, audio: np.ndarray) -> EmotionResult:
        """Decode and map the tag; EmotionError `undetermined` when SenseVoice has none."""
        t0 = time.perf_counter()
        x = check_audio(audio, PIPELINE_RATE, self.min_audio_s)
        stream = self.recognizer.create_stream()
        stream.accept_waveform(PIPELINE_RATE, x)
        self.recognizer.decode_stream(stream)
        r = stream.result
        ms = (time.perf_counter() - t0) * 1000.0
        result = emotion_from_sense_voice(r.emotion, self.model_id, event=r.event, lang=r.lang,
                                          compute_ms=ms)
        if result is None:
            raise EmotionError("undetermined", f"{self.model_id} tagged no emotion "
                               f"({strip_tag(r.emotion) or 'no tag'})", status=422)
        return result
