"""Building the configured VAD backend."""

from __future__ import annotations

from agent.config import RuntimeConfig, SileroVadConfig, VadConfig, WebrtcVadConfig
from agent.vad.base import Vad


def make_vad(cfg: VadConfig, runtime: RuntimeConfig | None = None) -> Vad:
    """Build the configured backend (Silero on the configured execution provider)."""
    if isinstance(cfg, WebrtcVadConfig):
        from agent.vad.webrtc import WebrtcVad

        return WebrtcVad(cfg)
    assert isinstance(cfg, SileroVadConfig)
    from agent.vad.silero import SileroVad

    return SileroVad(cfg, runtime=runtime)
