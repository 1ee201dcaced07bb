"""The audio source interface and `--source` parsing."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np

from agent.config import AudioConfig
from agent.constants import PIPELINE_RATE
from agent.errors import AgentError, AudioSourceError

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


def parse_source_spec(spec: str | None, cfg: AudioConfig) -> AudioConfig:
    """`mic`, `mic:NAME_OR_INDEX`, `file:PATH`, `stdin`, `-` -> updated audio config."""
    if spec is None:
        return cfg
    kind, _, arg = spec.partition(":")
    if spec == "-" or kind == "stdin":
        return cfg.model_copy(update={"source": "stdin"})
    if kind == "mic":
        dev: int | str | None = cfg.device
        if arg:
            dev = int(arg) if arg.isdigit() else arg
        return cfg.model_copy(update={"source": "mic", "device": dev})
    if kind == "file" and arg:
        return cfg.model_copy(update={"source": "file", "file": Path(arg)})
    raise AudioSourceError(
        "bad_source", f"--source {spec!r}: expected mic, mic:DEVICE, file:PATH or stdin"
    )


def make_source(cfg: AudioConfig, on_error: ErrorCallback | None = None) -> AudioSource:
    """Build the configured source (imports device libraries only when needed)."""
    if cfg.source == "file":
        from agent.audio.file import FileSource

        if cfg.file is None:
            raise AudioSourceError("bad_source", "audio.source is file but audio.file is unset")
        return FileSource(cfg.file, cfg.block_ms, realtime=cfg.realtime, on_error=on_error)
    if cfg.source == "stdin":
        from agent.audio.stdin import StdinSource

        return StdinSource(cfg.block_ms, rate=cfg.stdin_rate, on_error=on_error)
    from agent.audio.mic import MicSource

    return MicSource(cfg, on_error=on_error)
