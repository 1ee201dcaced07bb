"""Voice activity detection backends and the utterance segmenter."""

from agent.vad.base import Vad, make_vad
from agent.vad.segmenter import Segmenter, SegmenterParams

__all__ = ["Segmenter", "SegmenterParams", "Vad", "make_vad"]
