"""WebRTC VAD (webrtcvad-wheels)."""

from __future__ import annotations

import numpy as np
import webrtcvad

from agent.config import WebrtcVadConfig
from agent.constants import PIPELINE_RATE
from agent.vad.base import Vad


class WebrtcVad(Vad):
    """Google's GMM VAD: microseconds per frame, aggressiveness 0 (lenient) to 3 (strict)."""

    name = "webrtc"

    def __init__(self, cfg: WebrtcVadConfig) -> None:
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        self.frame_samples = PIPELINE_RATE * cfg.frame_ms // 1000

    def update(self, cfg: object) -> bool:
        """A new aggressiveness applies at once; a new frame size needs a restart."""
        if not isinstance(cfg, WebrtcVadConfig):
            return False
        if PIPELINE_RATE * cfg.frame_ms // 1000 != self.frame_samples:
            return False
        self._vad.set_mode(cfg.aggressiveness)
        return True

    def is_speech(self, frame: np.ndarray) -> bool:
        """One 10/20/30 ms frame."""
        return bool(self._vad.is_speech(frame.tobytes(), PIPELINE_RATE))
