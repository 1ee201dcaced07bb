"""The audio source interface and `--source` parsing."""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

from agent.constants import PIPELINE_RATE
from agent.errors import AgentError

log = logging.getLogger(__name__)

ErrorCallback = Callable[[AgentError], None]


class AudioSource(abc.ABC):
    """Yields fixed-size 16 kHz mono int16 chunks until exhausted or stopped."""

    name = "source"

    def __init__(self, block_ms: int, on_error: ErrorCallback | None = None) -> None:
        self.block_samples = PIPELINE_RATE * block_ms // 1000
        self.on_error: ErrorCallback = on_error or (lambda e: log.error("%s", e))
        self.stopping = asyncio.Event()
        self.dropped_chunks = 0
        # What status reports: starting, ok, unavailable or stalled (with why), ended.
        self.state = "starting"
        self.reason: str | None = None
        self.retry_at: float | None = None  # monotonic time of the next attempt to open
        self.device: str | None = None

    def mark(self, state: str, reason: str | None = None, retry_in: float | None = None) -> None:
        """Record the input's state for health and status."""
        self.state, self.reason = state, reason
        self.retry_at = None if retry_in is None else time.monotonic() + retry_in

    @abc.abstractmethod
    def chunks(self) -> AsyncIterator[np.ndarray]:
        """Async iterator of int16 arrays of `block_samples` each."""

    def stop(self) -> None:
        """Ask the source to end its iteration and release the device."""
        self.stopping.set()

    async def _sleep_or_stop(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True when stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True
