"""Audio sources for tests and benches that need a daemon running with no real microphone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from agent.audio.base import AudioSource
from agent.constants import PIPELINE_RATE


class SilentSource(AudioSource):
    """Silence in real time until stopped: the pipeline idles, commands and APIs work."""

    name = "silent"

    def __init__(self, block_ms: int = 30) -> None:
        super().__init__(block_ms)

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Zero chunks, one per block period."""
        while not self.stopping.is_set():
            yield np.zeros(self.block_samples, np.int16)
            if await self._sleep_or_stop(self.block_samples / PIPELINE_RATE):
                return
