"""Fixed audio facts every layer shares: the pipeline rate and the rates a capture may use."""

from __future__ import annotations

PIPELINE_RATE = 16000  # every stage after the source sees 16 kHz mono int16
CAPTURE_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
