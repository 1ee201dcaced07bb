"""Shared fixtures: paths into ../shared and a joined multi-utterance recording."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ASR_EN = SHARED / "data" / "asr-en"
GAP_S = 1.5


def asr_en_rows() -> list[dict[str, str]]:
    """`transcripts.tsv` rows: file, reference."""
    with (ASR_EN / "transcripts.tsv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def need_shared() -> None:
    """Skip with a reason when ../shared is not beside the repo."""
    if not (ASR_EN / "transcripts.tsv").exists():
        pytest.skip(f"shared test data not found at {SHARED} (clone the repo beside shared/)")


@pytest.fixture(scope="session")
def joined_recording(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[tuple[float, float]]]:
    """The ten asr-en utterances joined with 1.5 s of silence, and each clip's true span."""
    need_shared()
    parts: list[np.ndarray] = []
    spans: list[tuple[float, float]] = []
    t = 0.0
    for i, row in enumerate(asr_en_rows()):
        x, sr = sf.read(ASR_EN / row["file"], dtype="float32")
        assert sr == 16000
        if i:
            parts.append(np.zeros(int(GAP_S * sr), dtype=np.float32))
            t += GAP_S
        spans.append((t, t + len(x) / sr))
        parts.append(x)
        t += len(x) / sr
    path = tmp_path_factory.mktemp("joined") / "joined.wav"
    sf.write(path, np.concatenate(parts), 16000, subtype="PCM_16")
    return path, spans
