"""Audio sources: every one yields fixed-size 16 kHz mono int16 chunks."""

from agent.audio.base import AudioSource, ErrorCallback, parse_source_spec

__all__ = ["AudioSource", "ErrorCallback", "parse_source_spec"]
