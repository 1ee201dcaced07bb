#!/usr/bin/env python3
"""Fit the RAVDESS CNN's feature scaler on RAVDESS clips; the clip and fold helpers for it.

The checkpoint's training scaler was never published, so we fit per-element statistics
(sklearn StandardScaler on the flattened 40 x 282 MFCCs, as in training) ourselves. For an
honest accuracy, statistics are fitted on clips disjoint from those evaluated: folds hold out
one (statement, repetition) pair of the RAVDESS file name, so a held-out clip's sentence and
take were never seen by its scaler. The statistics shipped with the model are fitted on all
clips given.

Usage::

    python -m conversion.ser_scaler --clips ../shared/data/emotion-en \
        --out conversion/data/ser_ravdess_scaler.npz

Needs numpy, soundfile and soxr only (no librosa, no torch); the conversion imports this
module for DEFAULT_STATS without needing the audio libraries.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.constants import PIPELINE_RATE
from agent.emotion.frontend import FrontendSpec, MfccFrontend
from agent.emotion.labels import RAVDESS_CODES
from agent.emotion.scaler import Scaler

log = logging.getLogger(__name__)

DEFAULT_STATS = Path(__file__).resolve().parent / "data" / "ser_ravdess_scaler.npz"


@dataclass(frozen=True)
class RavdessClip:
    """One RAVDESS file and what its name encodes."""

    path: Path
    label: str
    intensity: int
    statement: int
    repetition: int
    actor: int

    @property
    def group(self) -> tuple[int, int]:
        """The fold key: (statement, repetition)."""
        return self.statement, self.repetition


def parse_ravdess_name(path: Path) -> RavdessClip:
    """Parse `03-01-EE-II-SS-RR-AA.wav`; ValueError for any other name."""
    parts = path.stem.split("-")
    if len(parts) != 7 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a RAVDESS file name: {path.name}")
    code = int(parts[2])
    if code not in RAVDESS_CODES:
        raise ValueError(f"unknown RAVDESS emotion code {code} in {path.name}")
    return RavdessClip(path, RAVDESS_CODES[code], int(parts[3]), int(parts[4]), int(parts[5]),
                       int(parts[6]))


def find_clips(directory: Path) -> list[RavdessClip]:
    """Every RAVDESS-named .wav under `directory`, sorted by name."""
    clips = [parse_ravdess_name(p) for p in sorted(directory.glob("*.wav"))]
    if not clips:
        raise FileNotFoundError(f"no RAVDESS .wav files in {directory}")
    return clips


def load_pipeline_audio(path: Path) -> np.ndarray:
    """A clip as the live pipeline delivers it: 16 kHz mono int16 -> float32 in [-1, 1]."""
    import soundfile as sf
    import soxr

    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != PIPELINE_RATE:
        x = soxr.resample(x, sr, PIPELINE_RATE)
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
    return pcm.astype(np.float32) / 32768.0


def features(clips: Sequence[RavdessClip], spec: FrontendSpec | None = None) -> np.ndarray:
    """MFCC matrices (clips x n_mfcc x frames) through the 16 kHz pipeline path."""
    fe = MfccFrontend(spec)
    return np.stack([fe(load_pipeline_audio(c.path), PIPELINE_RATE) for c in clips])


def group_folds(clips: Sequence[RavdessClip]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train_mask, test_mask) per held-out (statement, repetition) group."""
    for g in sorted({c.group for c in clips}):
        test = np.array([c.group == g for c in clips])
        yield ~test, test


def main(argv: Sequence[str] | None = None) -> int:
    """Fit on every clip in --clips and write the statistics to --out."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clips", type=Path, required=True, help="folder of RAVDESS .wav files")
    p.add_argument("--out", type=Path, default=DEFAULT_STATS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    clips = find_clips(args.clips)
    scaler = Scaler.fit(features(clips))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scaler.save(args.out)
    log.info("fitted %s scaler on %d clips -> %s", scaler.kind, len(clips), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
