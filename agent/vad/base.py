"""The VAD interface: fixed-size int16 frames in, one speech decision per frame out."""

from __future__ import annotations

import abc

import numpy as np

from agent.constants import PIPELINE_RATE


class Vad(abc.ABC):
    """Synchronous and stateful; the pipeline runs it in its own executor thread."""

    name = "vad"
    frame_samples: int

    @property
    def frame_ms(self) -> float:
        """Frame length in milliseconds."""
        return 1000.0 * self.frame_samples / PIPELINE_RATE

    @abc.abstractmethod
    def is_speech(self, frame: np.ndarray) -> bool:
        """Decide one frame of exactly `frame_samples` int16 samples."""

    def process(self, frames: list[np.ndarray]) -> list[bool]:
        """Decide a batch of frames (one executor hop for many frames)."""
        return [self.is_speech(f) for f in frames]

    def reset(self) -> None:  # noqa: B027 - stateless backends need nothing
        """Forget recurrent state (new gate session)."""

    def update(self, cfg: object) -> bool:
        """Apply a reloaded config of the same backend live; False: needs a restart."""
        return False
