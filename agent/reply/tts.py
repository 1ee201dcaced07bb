"""The speech synthesis interface every TTS backend implements, and helpers around it.

`synthesize(text_chunks)` consumes text as the LLM produces it and yields 16 kHz mono s16le
PCM as soon as the backend has any. Cancelling the task that iterates it stops synthesis
within 100 ms: the backend closes its socket or abandons its worker, and yields nothing more.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable

import numpy as np
import soxr

from agent.audio.convert import float_to_int16
from agent.constants import PIPELINE_RATE


class Tts(abc.ABC):
    """A streaming text-to-speech backend."""

    backend: str = ""
    voice: str = ""
    sample_rate: int = PIPELINE_RATE  # of the PCM that synthesize() yields

    @abc.abstractmethod
    def synthesize(self, text_chunks: AsyncIterator[str]) -> AsyncGenerator[bytes, None]:
        """PCM s16le mono at `sample_rate` for the text chunks, as it becomes ready."""

    async def warm_up(self) -> None:  # noqa: B027 - optional hook
        """Load models or open connections ahead of the first reply."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections or models."""


async def aiter_texts(texts: Iterable[str]) -> AsyncIterator[str]:
    """Text chunks as the async iterator `synthesize()` takes."""
    for t in texts:
        yield t


async def synthesize_all(tts: Tts, text: str | Iterable[str]) -> bytes:
    """The whole PCM of `text` (for `say --out` and the `tts` command)."""
    parts = [text] if isinstance(text, str) else list(text)
    out = bytearray()
    async with contextlib.aclosing(tts.synthesize(aiter_texts(parts))) as pcm:
        async for chunk in pcm:
            out += chunk
    return bytes(out)


class PcmResampler:
    """Streaming float32 -> 16 kHz s16le bytes, for backends whose voice has another rate."""

    def __init__(self, in_rate: int, out_rate: int = PIPELINE_RATE) -> None:
        self._stream = (None if in_rate == out_rate else
                        soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32",
                                            quality="HQ"))

    def process(self, audio: np.ndarray, last: bool = False) -> bytes:
        """Resample one block (float32 in [-1, 1]); `last` flushes the filter's tail."""
        x = np.asarray(audio, dtype=np.float32)
        if self._stream is not None:
            x = self._stream.resample_chunk(x, last=last)
        return float_to_int16(x).tobytes()


class EvenBytes:
    """Re-cuts a byte stream so every piece holds whole s16 samples."""

    def __init__(self) -> None:
        self._carry = b""

    def push(self, data: bytes) -> bytes:
        """Whole samples so far; an odd trailing byte waits for the next piece."""
        data = self._carry + data
        cut = len(data) & ~1
        self._carry = data[cut:]
        return data[:cut]
