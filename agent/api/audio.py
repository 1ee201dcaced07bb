"""Uploaded audio -> 16 kHz mono float32 (soundfile, ffmpeg fallback), and long-audio windows."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import cast

import numpy as np
import soundfile as sf

from agent.api.errors import ApiError
from agent.audio.convert import Resampler, to_mono_float
from agent.audio.file import FileSource
from agent.constants import PIPELINE_RATE
from agent.errors import AudioSourceError

log = logging.getLogger(__name__)

MIN_RATE, MAX_RATE = 1000, 384_000
MAX_CHANNELS = 64
FFMPEG_TIMEOUT_S = 60.0
# Whisper sees at most 30 s at once: longer audio is cut into windows at quiet points.
WINDOW_S = 28.0
MIN_CUT_S = 18.0
FRAME = PIPELINE_RATE * 30 // 1000


def _too_long(max_s: float) -> ApiError:
    return ApiError(413, "audio_too_long", f"audio longer than api.max_audio_s = {max_s:g} s")


def _decode_soundfile(data: bytes, max_s: float) -> np.ndarray | None:
    """WAV/FLAC/OGG/MP3 from memory; None when libsndfile does not know the format."""
    try:
        snd = sf.SoundFile(io.BytesIO(data))
    except Exception as e:  # LibsndfileError, but also TypeError/RuntimeError on odd headers
        log.debug("soundfile cannot open the upload: %s", e)
        return None
    with snd:
        rate, channels = snd.samplerate, snd.channels
        if not MIN_RATE <= rate <= MAX_RATE:
            raise ApiError(400, "bad_audio", f"unsupported sample rate {rate} Hz")
        if not 1 <= channels <= MAX_CHANNELS:
            raise ApiError(400, "bad_audio", f"unsupported channel count {channels}")
        # Read in blocks: headers can claim any length, and we stop at the limit.
        limit = int(rate * max_s)
        blocks: list[np.ndarray] = []
        got = 0
        while True:
            try:
                block = snd.read(rate, dtype="float32", always_2d=True)
            except Exception as e:
                raise ApiError(400, "bad_audio", f"cannot decode the audio: {e}") from e
            if not len(block):
                break
            got += len(block)
            if got > limit:
                raise _too_long(max_s)
            blocks.append(to_mono_float(block))
    if not blocks:
        return np.zeros(0, dtype=np.float32)
    mono = np.nan_to_num(np.concatenate(blocks), nan=0.0, posinf=1.0, neginf=-1.0)
    return Resampler(rate).process(mono, last=True) if rate != PIPELINE_RATE else mono


def _write_temp(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(prefix="voice-agent-upload-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


async def _decode_ffmpeg(data: bytes, max_s: float) -> np.ndarray:
    """Anything else ffmpeg reads (webm/opus from browsers, m4a), via the file source."""
    path = await asyncio.to_thread(_write_temp, data)
    src = FileSource(path, 30, realtime=False)
    chunks: list[np.ndarray] = []
    limit = int(PIPELINE_RATE * max_s)
    got = 0
    gen = cast(AsyncGenerator[np.ndarray, None], src.chunks())  # an async generator
    try:
        async with asyncio.timeout(FFMPEG_TIMEOUT_S):
            async for chunk in gen:
                got += len(chunk)
                if got > limit + len(chunk):  # the last chunk is zero-padded
                    raise _too_long(max_s)
                chunks.append(chunk)
    except AudioSourceError as e:
        msg = e.message.replace(str(path), "upload")
        raise ApiError(400, "bad_audio", f"not audio in a known format: {msg}") from e
    except TimeoutError as e:
        raise ApiError(400, "bad_audio", f"decoding took over {FFMPEG_TIMEOUT_S:g} s") from e
    finally:
        await gen.aclose()  # kills ffmpeg when we stop early
        with contextlib.suppress(OSError):
            path.unlink()
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32) / 32768.0


async def decode_upload(data: bytes, max_s: float) -> np.ndarray:
    """Decoded 16 kHz mono float32; ApiError 400 (bad/empty audio) or 413 (too long)."""
    if not data:
        raise ApiError(400, "empty_audio", "the request holds no audio")
    audio = await asyncio.to_thread(_decode_soundfile, data, max_s)
    if audio is None:
        audio = await _decode_ffmpeg(data, max_s)
    if not len(audio):
        raise ApiError(400, "empty_audio", "the audio decodes to no samples")
    return audio


def windows(audio: np.ndarray, window_s: float = WINDOW_S) -> list[np.ndarray]:
    """Cut audio longer than one window at the quietest 30 ms frame near each window's end."""
    size = int(window_s * PIPELINE_RATE)
    out: list[np.ndarray] = []
    start = 0
    while len(audio) - start > size:
        lo = start + int(MIN_CUT_S * PIPELINE_RATE)
        region = audio[lo:start + size]
        n = len(region) // FRAME
        energy = (region[:n * FRAME].reshape(n, FRAME) ** 2).mean(axis=1)
        # The latest of the quietest frames: fewer, longer windows.
        cut = lo + (n - 1 - int(np.argmin(energy[::-1]))) * FRAME + FRAME // 2
        out.append(audio[start:cut])
        start = cut
    out.append(audio[start:])
    return out
