"""Wyoming PCM (any rate, 8/16/24/32-bit, any channel count) -> 16 kHz mono float32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.audio.convert import Resampler
from agent.constants import PIPELINE_RATE
from agent.errors import AudioDecodeError

MIN_RATE, MAX_RATE = 4000, 192_000
MAX_CHANNELS = 8
WIDTHS = (1, 2, 3, 4)


@dataclass(frozen=True)
class PcmFormat:
    """rate (Hz), width (bytes per sample), channels: what audio-start/-chunk announce."""

    rate: int
    width: int
    channels: int

    @classmethod
    def parse(cls, data: dict[str, Any], what: str = "audio") -> PcmFormat:
        """The format in an event's data; AudioDecodeError `bad_audio_format` when absurd."""
        rate, width, channels = data.get("rate"), data.get("width"), data.get("channels")
        if type(rate) is not int or not MIN_RATE <= rate <= MAX_RATE:
            raise AudioDecodeError("bad_audio_format", f"{what}: rate must be an integer "
                                   f"{MIN_RATE}-{MAX_RATE} Hz (got {str(rate)[:20]})")
        if type(width) is not int or width not in WIDTHS:
            raise AudioDecodeError("bad_audio_format", f"{what}: width must be 1, 2, 3 or 4 "
                                   f"bytes (got {str(width)[:20]})")
        if type(channels) is not int or not 1 <= channels <= MAX_CHANNELS:
            raise AudioDecodeError("bad_audio_format", f"{what}: channels must be 1-"
                                   f"{MAX_CHANNELS} (got {str(channels)[:20]})")
        return cls(rate, width, channels)

    @property
    def frame_bytes(self) -> int:
        """Bytes per frame (one sample of every channel)."""
        return self.width * self.channels


def to_float(pcm: bytes, width: int) -> np.ndarray:
    """Little-endian PCM samples -> float32 in [-1, 1] (8-bit is unsigned, as in WAV)."""
    if width == 1:
        return (np.frombuffer(pcm, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(pcm, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    return (np.frombuffer(pcm, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)


class PcmConverter:
    """Streams chunks of one format into 16 kHz mono; a chunk in a new format restarts it."""

    def __init__(self, fmt: PcmFormat) -> None:
        self.fmt = fmt
        self._resampler = Resampler(fmt.rate)
        self._carry = b""  # a frame split across two chunks

    def push(self, pcm: bytes, fmt: PcmFormat | None = None) -> np.ndarray:
        """Convert one chunk; returns the 16 kHz float32 audio ready so far."""
        head = np.zeros(0, np.float32)
        if fmt is not None and fmt != self.fmt:
            head = self.flush()
            self.fmt, self._resampler = fmt, Resampler(fmt.rate)
        data = self._carry + pcm
        cut = len(data) - len(data) % self.fmt.frame_bytes
        self._carry = data[cut:]
        if not cut:
            return head
        x = to_float(data[:cut], self.fmt.width)
        if self.fmt.channels > 1:
            x = x.reshape(-1, self.fmt.channels)
        y = self._resampler.process(x)
        return np.concatenate([head, y]) if len(head) else y

    def flush(self) -> np.ndarray:
        """The resampler's tail (the end of the stream)."""
        self._carry = b""
        if self.fmt.rate == PIPELINE_RATE:
            return np.zeros(0, np.float32)
        return self._resampler.process(np.zeros((0, self.fmt.channels), np.float32), last=True)
