"""Downmix, streaming resampling to 16 kHz and fixed-size re-chunking."""

from __future__ import annotations

import numpy as np
import soxr

from agent.constants import PIPELINE_RATE


def to_mono_float(block: np.ndarray) -> np.ndarray:
    """Any (frames,) or (frames, channels) int/float block -> float32 mono in [-1, 1]."""
    if block.dtype == np.int16:
        data = block.astype(np.float32) / 32768.0
    elif block.dtype == np.int32:
        data = block.astype(np.float32) / 2147483648.0
    else:
        data = block.astype(np.float32, copy=False)
    if data.ndim == 2:
        data = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(data, dtype=np.float32)


def float_to_int16(data: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> int16 with clipping (resampling can overshoot slightly)."""
    return (np.clip(data, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)


class Resampler:
    """Streaming downmix + resample from `in_rate` to the 16 kHz pipeline rate."""

    def __init__(self, in_rate: int, out_rate: int = PIPELINE_RATE) -> None:
        self.in_rate = in_rate
        self._stream = (
            None if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")
        )

    def process(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        """Feed one block of device audio; returns whatever 16 kHz float32 is ready."""
        mono = to_mono_float(block)
        if self._stream is None:
            return mono
        return self._stream.resample_chunk(mono, last=last)


class Rechunker:
    """Collects int16 samples and hands them out in blocks of exactly `size`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buf = np.zeros(0, dtype=np.int16)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Append samples; return every complete block."""
        buf = np.concatenate([self._buf, samples]) if len(self._buf) else samples
        n = len(buf) // self.size
        out = [buf[i * self.size:(i + 1) * self.size].copy() for i in range(n)]
        self._buf = buf[n * self.size:].copy()
        return out

    def flush(self) -> np.ndarray | None:
        """The zero-padded last partial block, if any."""
        if not len(self._buf):
            return None
        out = np.zeros(self.size, dtype=np.int16)
        out[: len(self._buf)] = self._buf
        self._buf = np.zeros(0, dtype=np.int16)
        return out

    def clear(self) -> None:
        """Forget any partial block."""
        self._buf = np.zeros(0, dtype=np.int16)
