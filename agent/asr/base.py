"""The ASR engine interface: synchronous sessions, run by the analyser in worker threads."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transcript:
    """Text of one decode."""

    text: str
    language: str | None = None
    decode_s: float = 0.0  # time the decode that produced this text took
    reused: bool = False  # a final that is a partial decode over the same audio


class AsrSession(abc.ABC):
    """One utterance of a streaming engine: `feed` decodes as audio arrives, `finish` once."""

    @abc.abstractmethod
    def feed(self, samples: np.ndarray) -> str:
        """Accept float32 16 kHz mono samples; returns the running text."""

    @abc.abstractmethod
    def finish(self) -> Transcript:
        """Flush and return the final text."""

    @property
    @abc.abstractmethod
    def fed_samples(self) -> int:
        """Samples accepted so far."""


class AsrEngine:
    """A loaded model, thread-safe across decodes (the runner calls it from worker threads).

    Offline engines (`streaming` False) decode whole buffers with `decode`; streaming engines
    create a `session` per utterance.
    """

    model_id = ""
    language: str | None = None
    languages: tuple[str, ...] = ()  # what the model can recognise (for describe/info)
    streaming = False

    def decode(self, audio: np.ndarray) -> Transcript:
        """One decode of float32 16 kHz mono audio (blocking; offline engines)."""
        raise NotImplementedError

    def session(self) -> AsrSession:
        """A fresh streaming session (streaming engines)."""
        raise NotImplementedError

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Decode a whole recording in one go."""
        if not self.streaming:
            return self.decode(audio)
        s = self.session()
        s.feed(audio)
        return s.finish()


_ANNOTATION = re.compile(r"\[[^\]]*\]?|\([^)]*\)?")


def has_words(text: str) -> bool:
    """Whether a transcript says anything: not "", "[", "[BLANK_AUDIO]" or "(music)".

    Whisper emits such fragments on too little audio or on silence.
    """
    return any(ch.isalnum() for ch in _ANNOTATION.sub(" ", text))


def collapse_loops(text: str, max_repeats: int = 2, max_ngram: int = 4) -> str:
    """Cut greedy-decoding loops: an n-gram repeated back to back more than `max_repeats` times.

    Whisper's greedy search (sherpa-onnx has no repetition guard) can loop ("5 5 5 5 5 5");
    people rarely say the same phrase three times running, so we keep `max_repeats` copies.
    """
    words = text.split()
    norm = [w.strip(".,!?;:").lower() for w in words]
    kept: list[str] = []
    i = 0
    while i < len(words):
        step = 0
        for n in range(1, max_ngram + 1):
            gram = norm[i:i + n]
            if len(gram) < n:
                break
            reps = 1
            while norm[i + reps * n:i + (reps + 1) * n] == gram:
                reps += 1
            if reps > max_repeats:
                kept += words[i:i + n * max_repeats]
                step = n * reps
                break
        if step == 0:
            kept.append(words[i])
            step = 1
        i += step
    return " ".join(kept)
