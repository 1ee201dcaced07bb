"""Scoring voices: cosine, centroid voiceprints, s-norm, operating points, enrolment quality.

Measured on the shared speakers with GE2E (`python bench/speaker.py` re-measures all of it):

* **Centroid, not best-of.** A speaker's voiceprint is the L2-normalised mean of its samples'
  embeddings. With 3 enrolment clips per speaker (20 random draws on speakers-en) the
  centroid separates targets from impostors by d' = 6.50, best-of (max over the samples) by
  6.22; EER 0 % and top-1 100 % for both. A centroid is also one vector per speaker, so
  identify is one matrix-vector product however many samples a speaker has.
* **No score normalisation.** Adaptive s-norm (`asnorm`, cohort = the other half of the
  speakers) made every figure worse on held-out speakers: EER 0 % -> 3.9 %, and at a
  threshold calibrated the same way FAR 0.18 % -> 2.2 %, FRR 0 % -> 16 %. Five cohort voices
  (a home store has fewer still) give noisy top-k statistics. It stays for the bench; the
  store does not use it.
* **Operating point.** `DEFAULT_THRESHOLD` (cosine 0.76) is where the shared impostor scores
  give FAR 0.1 % under a Gaussian fit (`threshold_for_far`), ten times under the 1 % target,
  because 10 calibration speakers underestimate false accepts on unseen voices (issue 11).
  Speaker-disjoint halves: calibrated on 5 speakers (mean threshold 0.752), the other 5 saw
  FAR 0.18 % (already above the 0.1 % aimed for, as predicted) and FRR 0 %. At 0.76: FAR 0 %,
  FRR 0 % on the held-out halves; on speakers-zh (never used for calibration) FAR 0 %, FRR
  0 % against 2-3-clip voiceprints, and both unknown voices rejected. The EER point of the
  raw pairs (0.718) would be too low.
* **Enrolment quality.** FRR at 0.76 by seconds of voiced enrolment speech (full-length
  tests): 2 s 11 %, 4 s 1 %, 6 s 1 %, 8 s and more 0 %. Below `MIN_ENROL_SPEECH_S` the store
  warns. Test utterances need length too: FRR 36 % at 1 s of speech, 4 % at 1.5 s, 2 % at
  2 s, 0 % at 3 s (against 8 s voiceprints); FAR stayed 0 at every length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

log = logging.getLogger(__name__)

#: cosine threshold of the default GE2E model (centroid voiceprints, no normalisation)
DEFAULT_THRESHOLD = 0.76
#: per-model defaults; other models need `speaker.threshold` set after measuring them
MODEL_THRESHOLDS: dict[str, float] = {"ge2e-resemblyzer": DEFAULT_THRESHOLD}
#: seconds of speech a voiceprint needs before it is reliable (warned below)
MIN_ENROL_SPEECH_S = 8.0
#: target FAR used when calibrating on the shared speakers (10x under the 1 % product target)
CALIBRATION_FAR = 0.001


def normalize(v: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis (zero vectors stay zero)."""
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.where(n > 0, n, 1.0)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def centroid(vectors: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """A speaker's voiceprint: the normalised mean of its normalised sample embeddings."""
    m = normalize(np.asarray(vectors, dtype=np.float32))
    return normalize(m.mean(axis=0))


def best_of(samples: np.ndarray, test: np.ndarray) -> float:
    """The alternative voiceprint rule (measured, not used): max cosine over the samples."""
    return float((normalize(samples) @ normalize(test)).max())


def model_threshold(model_id: str | None, configured: float | None = None) -> float:
    """The threshold to use for a model: the configured one, else the measured default."""
    if configured is not None:
        return configured
    if model_id in MODEL_THRESHOLDS:
        return MODEL_THRESHOLDS[model_id]
    log.warning("no measured threshold for speaker model %s; using %.2f (set "
                "speaker.threshold)", model_id, DEFAULT_THRESHOLD)
    return DEFAULT_THRESHOLD


@dataclass(frozen=True)
class Cohort:
    """Impostor voiceprints for adaptive s-norm (top-k cohort statistics per side)."""

    vectors: np.ndarray  # (n, dim), normalised
    top_k: int = 20

    def stats(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of each row's top-k cohort cosines."""
        s = normalize(np.atleast_2d(x)) @ self.vectors.T
        k = min(self.top_k, s.shape[1])
        top = -np.sort(-s, axis=1)[:, :k]
        return top.mean(axis=1), np.maximum(top.std(axis=1), 1e-6)


def asnorm(raw: np.ndarray, enrol: np.ndarray, test: np.ndarray, cohort: Cohort) -> np.ndarray:
    """Adaptive symmetric score normalisation of raw (E, T) cosines (measured, off by default)."""
    me, se = cohort.stats(enrol)
    mt, st = cohort.stats(test)
    raw = np.asarray(raw, dtype=np.float64).reshape(len(me), len(mt))
    return 0.5 * ((raw - me[:, None]) / se[:, None] + (raw - mt[None, :]) / st[None, :])


def threshold_for_far(impostor: np.ndarray, far: float) -> float:
    """Threshold whose false-accept rate is `far` under a Gaussian fit of impostor scores.

    The fit extrapolates past the few hundred impostor trials a small set has, where the
    empirical quantile would just be its largest score.
    """
    im = np.asarray(impostor, dtype=np.float64)
    if len(im) < 2:
        raise ValueError("need at least two impostor scores")
    return float(im.mean() + im.std() * NormalDist().inv_cdf(1.0 - far))


def far_frr(target: np.ndarray, impostor: np.ndarray, threshold: float) -> tuple[float, float]:
    """(false-accept rate, false-reject rate) at `threshold` (accept: score >= threshold)."""
    tg, im = np.asarray(target), np.asarray(impostor)
    far = float(np.mean(im >= threshold)) if len(im) else 0.0
    frr = float(np.mean(tg < threshold)) if len(tg) else 0.0
    return far, frr


def eer(target: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(equal error rate, threshold there) from target and impostor scores."""
    tg, im = np.asarray(target, dtype=np.float64), np.asarray(impostor, dtype=np.float64)
    if not len(tg) or not len(im):
        raise ValueError("need target and impostor scores")
    s = np.concatenate([tg, im])
    y = np.concatenate([np.ones(len(tg)), np.zeros(len(im))])
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    frr = 1.0 - np.cumsum(y) / len(tg)
    far = np.cumsum(1.0 - y) / len(im)
    i = int(np.argmin(np.abs(frr - far)))
    return float((frr[i] + far[i]) / 2), float(s[i])


def d_prime(target: np.ndarray, impostor: np.ndarray) -> float:
    """Separation of the two score distributions in pooled standard deviations."""
    tg, im = np.asarray(target), np.asarray(impostor)
    return float((tg.mean() - im.mean()) / np.sqrt((tg.var() + im.var()) / 2))


@dataclass(frozen=True)
class EnrolmentQuality:
    """Whether a voiceprint has enough speech behind it."""

    speech_s: float
    samples: int
    min_speech_s: float = MIN_ENROL_SPEECH_S

    @property
    def ok(self) -> bool:
        """True when the voiceprint has at least `min_speech_s` of speech."""
        return self.speech_s >= self.min_speech_s

    @property
    def warning(self) -> str | None:
        """A message for the user when the voiceprint is thin, else None."""
        if self.ok:
            return None
        return (f"voiceprint has {self.speech_s:.1f} s of speech; {self.min_speech_s:g} s or "
                f"more recognises reliably (add samples)")

    def to_dict(self) -> dict[str, object]:
        """JSON-able form for replies."""
        return {"speech_s": round(self.speech_s, 2), "samples": self.samples, "ok": self.ok,
                "min_speech_s": self.min_speech_s, "warning": self.warning}
