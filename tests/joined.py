"""Test recordings with known speech boundaries: clips joined over real-sounding room tone.

Speech is labelled from each clip's own audio (frame energy against the clip's noise floor),
never from the file edges, and independently of any VAD. The gaps are not digital silence:
noise with the spectrum and level of the clips' own room tone (measured from their quietest
windows) runs under the whole recording, so a "VAD" that calls every non-zero sample speech
sees one endless utterance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from agent.constants import PIPELINE_RATE

HOP = PIPELINE_RATE // 100  # 10 ms labelling frames
# A frame is speech when it is CORE_DB over the clip's floor; a speech region extends to its
# neighbours while they stay EDGE_DB over it (soft onsets, decaying ends). Bursts shorter
# than MIN_CORE frames (clicks) are not speech.
CORE_DB = 20.0
EDGE_DB = 10.0
MIN_CORE = 3
NOISE_WINDOW = 512
NOISE_SEED = 17


@dataclass(frozen=True)
class Span:
    """Where speech is in a recording, seconds."""

    onset: float
    offset: float


def frame_db(x: np.ndarray) -> np.ndarray:
    """Energy of each 10 ms frame, dBFS."""
    n = len(x) // HOP * HOP
    f = x[:n].astype(np.float64).reshape(-1, HOP)
    return 10 * np.log10((f ** 2).mean(axis=1) + 1e-12)


def noise_floor_db(db: np.ndarray) -> float:
    """The clip's noise floor: the median of its quietest 10 % of frames."""
    quiet = np.sort(db)[:max(1, len(db) // 10)]
    return float(np.median(quiet))


def label_speech(x: np.ndarray) -> Span:
    """The first speech onset and the last speech offset of a clip, from its energy alone."""
    db = frame_db(x)
    floor = noise_floor_db(db)
    core = db > floor + CORE_DB
    runs = np.convolve(core.astype(int), np.ones(MIN_CORE, int), "valid") == MIN_CORE
    hits = np.flatnonzero(runs)
    if not len(hits):
        raise ValueError("no speech found in clip")
    a, b = int(hits[0]), int(hits[-1]) + MIN_CORE - 1
    while a > 0 and db[a - 1] > floor + EDGE_DB:
        a -= 1
    while b < len(db) - 1 and db[b + 1] > floor + EDGE_DB:
        b += 1
    return Span(a * HOP / PIPELINE_RATE, (b + 1) * HOP / PIPELINE_RATE)


def room_tone_profile(clips: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Power spectrum (per rfft bin of NOISE_WINDOW) and RMS of the clips' quietest windows."""
    w = NOISE_WINDOW
    win = np.hanning(w)
    spectra, levels = [], []
    for x in clips:
        frames = x[:len(x) // w * w].astype(np.float64).reshape(-1, w)
        db = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-12)
        quiet = frames[db <= np.percentile(db, 10) + 3]
        spectra.append((np.abs(np.fft.rfft(quiet * win, axis=1)) ** 2).mean(axis=0))
        levels.append(float(np.sqrt((quiet ** 2).mean())))
    return np.mean(spectra, axis=0), float(np.median(levels))


def room_tone(n: int, psd: np.ndarray, rms: float, seed: int = NOISE_SEED) -> np.ndarray:
    """`n` samples of Gaussian noise shaped to `psd`, at `rms` (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(n))
    spec *= np.sqrt(np.interp(np.fft.rfftfreq(n), np.fft.rfftfreq(NOISE_WINDOW), psd))
    noise = np.fft.irfft(spec, n)
    return noise * (rms / np.sqrt((noise ** 2).mean()))


def join_clips(paths: list[Path], gap_s: float, lead_s: float = 0.0, tail_s: float = 0.0
               ) -> tuple[np.ndarray, list[Span], float]:
    """The clips joined with `gap_s` between them (and `lead_s` before, `tail_s` after) over
    room tone; the speech spans; the tone's level in dBFS."""
    clips = []
    for p in paths:
        x, sr = sf.read(p, dtype="float64")
        assert sr == PIPELINE_RATE, (p, sr)
        clips.append(x)
    gap = int(gap_s * PIPELINE_RATE)
    lead = int(lead_s * PIPELINE_RATE)
    parts, spans, at = [np.zeros(lead)], [], lead
    for i, x in enumerate(clips):
        if i:
            parts.append(np.zeros(gap))
            at += gap
        s = label_speech(x)
        spans.append(Span(at / PIPELINE_RATE + s.onset, at / PIPELINE_RATE + s.offset))
        parts.append(x)
        at += len(x)
    parts.append(np.zeros(int(tail_s * PIPELINE_RATE)))
    at += len(parts[-1])
    psd, rms = room_tone_profile(clips)
    mix = np.concatenate(parts) + room_tone(at, psd, rms)
    return np.clip(mix, -1, 1).astype(np.float32), spans, float(20 * np.log10(rms))
