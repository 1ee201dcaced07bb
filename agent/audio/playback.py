"""Local speaker output via PortAudio (sounddevice): 16 kHz PCM in, resampled with soxr.

The PortAudio callback only copies from a bounded ring buffer (zeros when it runs dry), so
nothing in the audio thread can block or allocate much. The event loop resamples and fills
the ring; a writer that gets more than `buffer_s` ahead of the speaker waits. `flush()` empties
the ring: the next callback, `block_ms` later, plays silence, and what is already queued in
the device (about `latency_s`) is all that is still heard. That is the barge-in path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import soxr

from agent.constants import PIPELINE_RATE
from agent.errors import ReplyError

log = logging.getLogger(__name__)

_POLL_S = 0.005  # how often a waiting writer looks for room (the callback never wakes it)


def _sd() -> Any:
    """Import sounddevice lazily: PortAudio enumerates devices once, at import."""
    try:
        import sounddevice
    except OSError as e:  # libportaudio2 missing
        raise ReplyError("portaudio_missing", f"PortAudio is not available: {e}",
                         status=503) from e
    return sounddevice


def list_output_devices() -> list[dict[str, Any]]:
    """Every device with output channels: index, name, channels, default rate."""
    return [
        {"index": i, "name": d["name"], "channels": d["max_output_channels"],
         "default_samplerate": d["default_samplerate"]}
        for i, d in enumerate(_sd().query_devices()) if d["max_output_channels"] > 0
    ]


def resolve_output_device(device: int | str | None) -> dict[str, Any]:
    """The output device by index or case-insensitive name substring (None: the default)."""
    devices = list_output_devices()
    names = ", ".join(f"{d['index']}:{d['name']}" for d in devices) or "none"
    if device is None:
        idx = _sd().default.device[1]
        for d in devices:
            if d["index"] == idx:
                return d
        if devices:
            return devices[0]
        raise ReplyError("playback_device_not_found", "no output device found", status=503)
    if isinstance(device, int):
        found = [d for d in devices if d["index"] == device]
    else:
        found = [d for d in devices if device.lower() in d["name"].lower()]
    if not found:
        raise ReplyError("playback_device_not_found",
                         f"no output device {device!r}; outputs: {names}", status=503)
    return found[0]


class _Ring:
    """Fixed-capacity float32 FIFO shared with the PortAudio thread (guarded by a lock)."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, dtype=np.float32)
        self.start = 0
        self.count = 0
        self.lock = threading.Lock()

    @property
    def free(self) -> int:
        return len(self.buf) - self.count

    def push(self, x: np.ndarray) -> int:
        """Append as much of `x` as fits; returns how many samples were taken."""
        with self.lock:
            n = min(len(x), len(self.buf) - self.count)
            end = (self.start + self.count) % len(self.buf)
            first = min(n, len(self.buf) - end)
            self.buf[end:end + first] = x[:first]
            self.buf[:n - first] = x[first:n]
            self.count += n
            return n

    def pop_into(self, out: np.ndarray) -> int:
        """Fill `out` (frames, channels) from the FIFO, zeros after it runs dry."""
        frames = out.shape[0]
        with self.lock:
            n = min(frames, self.count)
            first = min(n, len(self.buf) - self.start)
            out[:first] = self.buf[self.start:self.start + first, None]
            out[first:n] = self.buf[:n - first, None]
            self.start = (self.start + n) % len(self.buf)
            self.count -= n
        out[n:] = 0.0
        return n

    def clear(self) -> int:
        with self.lock:
            n, self.count = self.count, 0
            return n


class Player:
    """A PortAudio output stream fed with 16 kHz mono PCM; also a reply audio consumer."""

    name = "speaker"

    def __init__(self, device: int | str | None = None, *, sample_rate: int | None = None,
                 channels: int = 1, block_ms: int = 10, latency_s: float = 0.03,
                 buffer_s: float = 2.0) -> None:
        self.device = device
        self.requested_rate = sample_rate
        self.channels = channels
        self.block_ms = block_ms
        self.latency_s = latency_s
        self.buffer_s = buffer_s
        self.device_name: str | None = None
        self.device_rate: int | None = None
        self.frames_played = 0  # device-rate samples the callback took from the ring
        self.underruns = 0  # callbacks that ran dry while audio was expected
        self.flushed_samples = 0
        self._ring: _Ring | None = None
        self._stream: Any = None
        self._resampler: Any = None
        self._pending = False  # audio was written and not yet fully played
        self._draining = False  # finish() runs: running dry is expected, not an underrun
        self._generation = 0  # bumped by flush(): a writer still waiting drops its rest

    # ---------------------------------------------------------------- stream

    def open(self) -> None:
        """Open and start the output stream (blocking for a few ms; idempotent)."""
        if self._stream is not None and self._stream.active:
            return
        self.close()
        sd = _sd()
        dev = resolve_output_device(self.device)
        rate = self.requested_rate or int(dev["default_samplerate"])
        ring = _Ring(max(int(rate * self.buffer_s), rate // 10))

        def callback(outdata: np.ndarray, frames: int, t: Any, status: Any) -> None:
            # PortAudio thread: copy what is there, never wait.
            got = ring.pop_into(outdata)
            self.frames_played += got
            if got < frames and self._pending and not self._draining:
                self.underruns += 1  # the writer fell behind real time mid-reply

        try:
            stream = sd.OutputStream(
                device=dev["index"], samplerate=rate, channels=self.channels,
                dtype="float32", blocksize=max(1, rate * self.block_ms // 1000),
                latency=self.latency_s, callback=callback,
            )
            stream.start()
        except Exception as e:  # PortAudioError, ValueError (bad rate/channels)
            raise ReplyError("playback_open_failed", f"cannot open output {dev['name']!r} at "
                             f"{rate} Hz x {self.channels}: {e}", status=503) from e
        self._stream, self._ring = stream, ring
        self.device_name, self.device_rate = dev["name"], rate
        self._resampler = self._new_resampler()
        log.info("playing to %r at %d Hz (latency %.0f ms)", dev["name"], rate,
                 1000 * float(stream.latency))

    def close(self) -> None:
        """Stop and close the stream (what is buffered is dropped)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.abort()
                stream.close()

    @property
    def output_latency_s(self) -> float:
        """What PortAudio reports the device adds after the callback (0 when closed)."""
        return float(self._stream.latency) if self._stream is not None else 0.0

    @property
    def buffered_s(self) -> float:
        """Audio written and not yet taken by the device."""
        if self._ring is None or not self.device_rate:
            return 0.0
        return self._ring.count / self.device_rate

    def _new_resampler(self) -> Any:
        if self.device_rate == PIPELINE_RATE:
            return None
        return soxr.ResampleStream(PIPELINE_RATE, self.device_rate, 1, dtype="float32",
                                   quality="HQ")

    def _resample(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        if self._resampler is None:
            return x
        return self._resampler.resample_chunk(x, last=last)

    # ---------------------------------------------------------------- playing

    async def write(self, pcm: bytes | np.ndarray) -> None:
        """Queue 16 kHz mono s16le (bytes or int16) for playback; waits while the ring is full."""
        if self._stream is None:
            await asyncio.to_thread(self.open)  # PortAudio opens in tens of ms: not on the loop
        x = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, bytes | bytearray) else pcm
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        await self._push(self._resample(np.ascontiguousarray(x, dtype=np.float32)))

    async def _push(self, y: np.ndarray) -> None:
        ring, gen = self._ring, self._generation
        assert ring is not None
        self._pending = True
        while len(y):
            taken = ring.push(y)
            y = y[taken:]
            if len(y):
                # Wait about until half the ring has played (the callback never wakes us).
                await asyncio.sleep(max(_POLL_S, ring.count / 2 / (self.device_rate or 1)))
                if self._ring is not ring or self._generation != gen:
                    return  # flushed or reopened meanwhile: the rest is dropped

    async def finish(self) -> None:
        """The resampler's tail, then wait until the device has played everything."""
        if self._stream is None:
            return
        gen = self._generation
        await self._push(self._resample(np.zeros(0, np.float32), last=True))
        self._resampler = self._new_resampler()
        ring = self._ring
        self._draining = True
        try:
            # Polled: the PortAudio callback must not call into the loop to wake us.
            while ring is not None and ring.count > 0 and self._generation == gen:  # noqa: ASYNC110
                await asyncio.sleep(max(_POLL_S, ring.count / (self.device_rate or 1)))
            if self._generation == gen:
                await asyncio.sleep(self.output_latency_s)  # what the device still holds
        finally:
            self._draining = False
        self._pending = False

    def flush(self) -> int:
        """Silence now: drop everything queued (device-rate samples dropped)."""
        self._pending = False
        self._generation += 1
        if self._ring is None:
            return 0
        n = self._ring.clear()
        self.flushed_samples += n
        self._resampler = self._new_resampler()
        return n

    async def play(self, chunks: AsyncIterator[bytes]) -> None:
        """Play a stream of PCM chunks to the end; cancelled, it flushes (nothing plays on)."""
        try:
            async for chunk in chunks:
                await self.write(chunk)
            await self.finish()
        except asyncio.CancelledError:
            self.flush()
            raise

    # ------------------------------------------- the reply session's consumer protocol

    async def begin(self, reply_id: str, sample_rate: int) -> None:
        """A reply starts: make sure the stream is open (16 kHz in, whatever the device)."""
        if sample_rate != PIPELINE_RATE:
            raise ReplyError("bad_rate", f"the player takes {PIPELINE_RATE} Hz, not "
                             f"{sample_rate}")
        if self._stream is None:
            await asyncio.to_thread(self.open)

    async def end(self) -> None:
        """The reply's audio is complete: play it out."""
        await self.finish()

    def abort(self) -> None:
        """Barge-in: silence at once."""
        self.flush()
