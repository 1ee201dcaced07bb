"""Raw s16le mono PCM from standard input (e.g. `arecord ... | voice-agent run --source -`)."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from typing import BinaryIO

import numpy as np

from agent.audio.base import AudioSource, ErrorCallback
from agent.audio.convert import Rechunker, Resampler, float_to_int16
from agent.constants import PIPELINE_RATE

READ_BYTES = 8192
QUEUE_READS = 64  # reads buffered ahead of the pipeline (~16 s at 16 kHz): the reader waits


class StdinSource(AudioSource):
    """Reads raw little-endian int16 mono PCM at `rate` from a pipe."""

    name = "stdin"

    def __init__(self, block_ms: int, rate: int = PIPELINE_RATE,
                 on_error: ErrorCallback | None = None, stream: BinaryIO | None = None) -> None:
        super().__init__(block_ms, on_error)
        self.rate = rate
        self.stream = stream if stream is not None else sys.stdin.buffer

    def _reader(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[bytes],
                room: threading.Semaphore) -> None:
        # A daemon thread, not the loop's executor: a read blocked on a pipe that stays open
        # must not keep the process from exiting at SIGTERM (executor threads are joined).
        read = getattr(self.stream, "read1", self.stream.read)
        while not self.stopping.is_set():
            room.acquire()
            try:
                data = read(READ_BYTES)
            except (OSError, ValueError):
                data = b""
            try:
                loop.call_soon_threadsafe(q.put_nowait, data)
            except RuntimeError:  # the loop is gone
                return
            if not data:
                return

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Fixed-size chunks until end of input (or stop, even with the pipe held open)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[bytes] = asyncio.Queue()
        room = threading.Semaphore(QUEUE_READS)
        threading.Thread(target=self._reader, args=(loop, q, room), name="stdin-reader",
                         daemon=True).start()
        rechunk = Rechunker(self.block_samples)
        res = Resampler(self.rate)
        carry = b""
        self.mark("ok")
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                get = asyncio.ensure_future(q.get())
                await asyncio.wait([get, stop], return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                data = get.result()
                room.release()
                if not data:
                    break
                data = carry + data
                cut = len(data) - len(data) % 2  # an odd byte waits for its partner
                carry = data[cut:]
                pcm = np.frombuffer(data[:cut], dtype=np.int16)
                for chunk in rechunk.push(float_to_int16(res.process(pcm))):
                    yield chunk
        finally:
            stop.cancel()
            room.release()  # a reader waiting for room sees `stopping` and leaves
        # The resampler holds back a few samples of look-ahead until told the input ended.
        for chunk in rechunk.push(float_to_int16(res.process(np.zeros(0, np.int16), last=True))):
            yield chunk
        tail = rechunk.flush()
        if tail is not None:
            yield tail
        self.mark("ended", "end of input")
