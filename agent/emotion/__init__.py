"""Speech emotion: the MFCC front end, classifiers (ONNX, SenseVoice), ensembles, sessions."""

from agent.emotion.classifier import (
    EmotionClassifier,
    EmotionResult,
    OnnxEmotionClassifier,
    check_audio,
)
from agent.emotion.ensemble import EnsembleClassifier, EnsembleResult, combine
from agent.emotion.labels import LABELS, VALENCE
from agent.emotion.sense_voice import SenseVoiceEmotionClassifier, emotion_from_sense_voice
from agent.emotion.session import SessionSummary, SessionTracker, summarize

__all__ = [
    "LABELS",
    "VALENCE",
    "EmotionClassifier",
    "EmotionResult",
    "EnsembleClassifier",
    "EnsembleResult",
    "OnnxEmotionClassifier",
    "SenseVoiceEmotionClassifier",
    "SessionSummary",
    "SessionTracker",
    "check_audio",
    "combine",
    "emotion_from_sense_voice",
    "summarize",
]
