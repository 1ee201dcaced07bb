"""Raw s16le mono PCM from standard input (e.g. `arecord ... | voice-agent run --source -`)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import BinaryIO

import numpy as np

from agent.audio.base import AudioSource, ErrorCallback
from agent.audio.convert import Rechunker, Resampler, float_to_int16
from agent.constants import PIPELINE_RATE


class StdinSource(AudioSource):
    """Reads raw little-endian int16 mono PCM at `rate` from a pipe."""

    name = "stdin"

    def __init__(self, block_ms: int, rate: int = PIPELINE_RATE,
                 on_error: ErrorCallback | None = None, stream: BinaryIO | None = None) -> None:
        super().__init__(block_ms, on_error)
        self.rate = rate
        self.stream = stream if stream is not None else sys.stdin.buffer

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Fixed-size chunks until end of input."""
        rechunk = Rechunker(self.block_samples)
        res = Resampler(self.rate)
        carry = b""
        read = getattr(self.stream, "read1", self.stream.read)
        self.mark("ok")
        while not self.stopping.is_set():
            # A blocking read in a thread: works for pipes, files and ttys alike.
            data = await asyncio.to_thread(read, 8192)
            if not data:
                break
            data = carry + data
            cut = len(data) - len(data) % 2  # an odd byte waits for its partner
            carry = data[cut:]
            pcm = np.frombuffer(data[:cut], dtype=np.int16)
            for chunk in rechunk.push(float_to_int16(res.process(pcm))):
                yield chunk
        # The resampler holds back a few samples of look-ahead until told the input ended.
        for chunk in rechunk.push(float_to_int16(res.process(np.zeros(0, np.int16), last=True))):
            yield chunk
        tail = rechunk.flush()
        if tail is not None:
            yield tail
        self.mark("ended", "end of input")
