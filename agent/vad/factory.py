"""Building the configured VAD backend."""

from __future__ import annotations

from agent.config import SileroVadConfig, VadConfig, WebrtcVadConfig
from agent.vad.base import Vad


def make_vad(cfg: VadConfig) -> Vad:
    """Build the configured backend."""
    if isinstance(cfg, WebrtcVadConfig):
        from agent.vad.webrtc import WebrtcVad

        return WebrtcVad(cfg)
    assert isinstance(cfg, SileroVadConfig)
    from agent.vad.silero import SileroVad

    return SileroVad(cfg)
