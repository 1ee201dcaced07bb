"""Live microphone via PortAudio (sounddevice), resampled to 16 kHz, reopened on failure."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from agent.audio.base import AudioSource, ErrorCallback
from agent.audio.convert import Rechunker, Resampler, float_to_int16
from agent.config import AudioConfig
from agent.errors import AudioSourceError

log = logging.getLogger(__name__)

_END = object()


def _sd() -> Any:
    """Import sounddevice lazily: PortAudio enumerates devices once, at import."""
    try:
        import sounddevice
    except OSError as e:  # libportaudio2 missing
        raise AudioSourceError("portaudio_missing", f"PortAudio is not available: {e}") from e
    return sounddevice


def list_input_devices() -> list[dict[str, Any]]:
    """Every device with input channels: index, name, channels, default rate."""
    sd = _sd()
    return [
        {"index": i, "name": d["name"], "channels": d["max_input_channels"],
         "default_samplerate": d["default_samplerate"]}
        for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0
    ]


def resolve_device(device: int | str | None) -> dict[str, Any]:
    """Find the input device by index or case-insensitive name substring."""
    devices = list_input_devices()
    names = ", ".join(f"{d['index']}:{d['name']}" for d in devices) or "none"
    if device is None:
        sd = _sd()
        try:
            idx = sd.default.device[0]
            if idx is None or idx < 0:
                raise ValueError
            return next(d for d in devices if d["index"] == idx)
        except (ValueError, StopIteration, TypeError):
            if devices:
                return devices[0]
            raise AudioSourceError("device_not_found", "no input device found") from None
    if isinstance(device, int):
        for d in devices:
            if d["index"] == device:
                return d
        raise AudioSourceError(
            "device_not_found", f"no input device with index {device}; inputs: {names}"
        )
    matches = [d for d in devices if device.lower() in d["name"].lower()]
    if not matches:
        raise AudioSourceError(
            "device_not_found", f"no input device matching {device!r}; inputs: {names}"
        )
    return matches[0]


class MicSource(AudioSource):
    """Captures a PortAudio input; survives missing/unplugged devices by retrying."""

    name = "mic"

    def __init__(self, cfg: AudioConfig, on_error: ErrorCallback | None = None) -> None:
        super().__init__(cfg.block_ms, on_error)
        self.cfg = cfg
        self._queue: collections.deque[object] = collections.deque()
        self._ready = asyncio.Event()
        self.overflows = 0
        self.opened = 0
        self.device_name: str | None = None
        self.device_rate: int | None = None

    def _push(self, item: object) -> None:
        """Runs on the event loop: bounded queue that drops the oldest chunk."""
        if len(self._queue) >= self.cfg.queue_chunks:
            self._queue.popleft()
            self.dropped_chunks += 1
        self._queue.append(item)
        self._ready.set()

    def _open(self, loop: asyncio.AbstractEventLoop) -> Any:
        sd = _sd()
        dev = resolve_device(self.cfg.device)
        rate = self.cfg.sample_rate or int(dev["default_samplerate"])
        channels = self.cfg.channels or min(int(dev["channels"]), 2)
        blocksize = max(1, rate * self.cfg.block_ms // 1000)

        def callback(indata: np.ndarray, frames: int, t: Any, status: Any) -> None:
            # PortAudio thread: never block here; copy and hand over to the loop.
            if status.input_overflow:
                self.overflows += 1
            loop.call_soon_threadsafe(self._push, indata.copy())

        def finished() -> None:
            loop.call_soon_threadsafe(self._push, _END)

        try:
            stream = sd.InputStream(
                device=dev["index"], samplerate=rate, channels=channels, dtype="float32",
                blocksize=blocksize, callback=callback, finished_callback=finished,
            )
            stream.start()
        except Exception as e:  # PortAudioError or ValueError for bad rate/channels
            raise AudioSourceError(
                "device_open_failed", f"cannot open input {dev['name']!r} at {rate} Hz x "
                f"{channels}: {e}"
            ) from e
        self.device_name, self.device_rate = dev["name"], rate
        log.info("capturing from %r at %d Hz x %d", dev["name"], rate, channels)
        return stream

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Fixed-size chunks for as long as the daemon runs."""
        loop = asyncio.get_running_loop()
        backoff = self.cfg.retry_initial_s
        while not self.stopping.is_set():
            try:
                stream = self._open(loop)
            except AudioSourceError as e:
                self.on_error(e)
                self.mark("unavailable", e.message, retry_in=backoff)
                if await self._sleep_or_stop(backoff):
                    return
                backoff = min(backoff * 2, self.cfg.retry_max_s)
                continue
            self.opened += 1
            self.device = self.device_name
            self.mark("ok")
            backoff = self.cfg.retry_initial_s
            self._queue.clear()
            res = Resampler(int(stream.samplerate))
            rechunk = Rechunker(self.block_samples)
            try:
                while not self.stopping.is_set():
                    if not self._queue:
                        self._ready.clear()
                        stop = asyncio.ensure_future(self.stopping.wait())
                        ready = asyncio.ensure_future(self._ready.wait())
                        done, _ = await asyncio.wait(
                            {stop, ready}, timeout=self.cfg.stall_timeout_s,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        stop.cancel()
                        ready.cancel()
                        if not done:
                            raise AudioSourceError(
                                "device_stalled",
                                f"no audio from {self.device_name!r} for "
                                f"{self.cfg.stall_timeout_s:g} s",
                            )
                        continue
                    item = self._queue.popleft()
                    if item is _END:
                        raise AudioSourceError(
                            "device_lost", f"input {self.device_name!r} stopped (unplugged?)"
                        )
                    assert isinstance(item, np.ndarray)
                    if self.state != "ok":
                        self.mark("ok")
                    for chunk in rechunk.push(float_to_int16(res.process(item))):
                        yield chunk
            except AudioSourceError as e:
                self.on_error(e)
                self.mark("stalled" if e.code == "device_stalled" else "unavailable", e.message,
                          retry_in=backoff)
            finally:
                try:
                    stream.abort()
                    stream.close()
                except Exception as e:  # already gone with the device
                    log.debug("closing stream: %s", e)
            if not self.stopping.is_set() and await self._sleep_or_stop(backoff):
                return
