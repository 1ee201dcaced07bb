"""Recorded audio: WAV/FLAC/MP3/OGG via soundfile, anything else via ffmpeg if present."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import soundfile as sf

from agent.audio.base import AudioSource, ErrorCallback
from agent.audio.convert import Rechunker, Resampler, float_to_int16
from agent.constants import PIPELINE_RATE
from agent.errors import AudioSourceError

log = logging.getLogger(__name__)

READ_SECONDS = 0.5


def probe(path: Path) -> sf.SoundFile | None:
    """Open with soundfile, or None when libsndfile does not know the format."""
    try:
        return sf.SoundFile(str(path))
    except sf.LibsndfileError as e:
        log.debug("soundfile cannot open %s: %s", path, e)
        return None


class FileSource(AudioSource):
    """Plays a recording through the pipeline, in real time or as fast as possible."""

    name = "file"

    def __init__(self, path: Path, block_ms: int, realtime: bool = False,
                 on_error: ErrorCallback | None = None) -> None:
        super().__init__(block_ms, on_error)
        self.path = Path(path).expanduser()
        self.realtime = realtime

    def _check(self) -> None:
        if not self.path.exists():
            raise AudioSourceError("not_found", f"{self.path}: no such file")
        if not self.path.is_file():
            raise AudioSourceError("unreadable", f"{self.path}: not a regular file")

    async def _decoded(self) -> AsyncIterator[np.ndarray]:
        """16 kHz mono float32 blocks of the whole file."""
        self._check()
        snd = await asyncio.to_thread(probe, self.path)
        if snd is None:
            async for block in self._ffmpeg():
                yield block
            return
        with snd:
            res = Resampler(snd.samplerate)
            frames = max(1, int(snd.samplerate * READ_SECONDS))
            while True:
                try:
                    block = await asyncio.to_thread(snd.read, frames, "float32", True)
                except (sf.LibsndfileError, RuntimeError) as e:
                    raise AudioSourceError("corrupt", f"{self.path}: decode failed: {e}") from e
                last = len(block) < frames
                yield res.process(block, last=last)
                if last:
                    return

    async def _ffmpeg(self) -> AsyncIterator[np.ndarray]:
        """Decode formats libsndfile lacks (m4a, webm, ...) with ffmpeg."""
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise AudioSourceError(
                "unsupported", f"{self.path}: not a WAV/FLAC/MP3/OGG file and ffmpeg is absent"
            )
        try:
            proc = await asyncio.create_subprocess_exec(
                exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(self.path),
                "-f", "s16le", "-ac", "1", "-ar", str(PIPELINE_RATE), "-",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:  # EMFILE, ENOMEM: this file fails, the daemon does not
            raise AudioSourceError("unreadable", f"{self.path}: cannot run ffmpeg: {e}") from e
        assert proc.stdout is not None and proc.stderr is not None
        got = 0
        carry = b""
        try:
            while True:
                data = await proc.stdout.read(PIPELINE_RATE)
                if not data:
                    break
                data = carry + data
                cut = len(data) - len(data) % 2
                carry = data[cut:]
                got += cut
                yield np.frombuffer(data[:cut], dtype=np.int16).astype(np.float32) / 32768.0
            err = (await proc.stderr.read()).decode(errors="replace").strip()
            rc = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if rc != 0 or got == 0:
            last = err.splitlines()[-1] if err else f"ffmpeg exited {rc}"
            raise AudioSourceError("corrupt", f"{self.path}: cannot decode: {last}")

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Fixed-size int16 chunks, paced to the wall clock when `realtime`."""
        rechunk = Rechunker(self.block_samples)
        block_s = self.block_samples / PIPELINE_RATE
        t0 = time.monotonic()
        n = 0
        self.device = str(self.path)
        self.mark("ok")
        async for block in self._decoded():
            pieces = rechunk.push(float_to_int16(block))
            for chunk in pieces:
                if self.stopping.is_set():
                    return
                if self.realtime:
                    delay = t0 + n * block_s - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                n += 1
                yield chunk
            if not self.realtime:
                # Let commands, sinks and analysers run while we read as fast as possible.
                await asyncio.sleep(0)
        tail = rechunk.flush()
        if tail is not None and not self.stopping.is_set():
            yield tail
        self.mark("ended", "end of file")
