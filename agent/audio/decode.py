"""Uploaded audio -> 16 kHz mono float32, with the work it may cause bounded; long-audio windows.

Shared by every surface that takes a recording (HTTP uploads, MQTT/WS base64, the CLI):
synchronous, so it runs in the decode runner's threads. Decoding and resampling go block by
block, so a small file that claims hours of 384 kHz, 8-channel audio costs a header read and
a refusal, not gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import logging
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from agent.constants import PIPELINE_RATE
from agent.errors import AudioDecodeError

log = logging.getLogger(__name__)

MIN_RATE, MAX_RATE = 1000, 384_000
MAX_CHANNELS = 64
FFMPEG_TIMEOUT_S = 60.0
# Whisper sees at most 30 s at once: longer audio is cut into windows at quiet points.
WINDOW_S = 28.0
MIN_CUT_S = 18.0
FRAME = PIPELINE_RATE * 30 // 1000


@dataclass(frozen=True)
class DecodeLimits:
    """How much audio, and how much decoding work, one request may cause."""

    max_audio_s: float = 300.0
    # Input samples (frames x channels) read before resampling: 300 s of 48 kHz stereo.
    max_input_samples: int = 300 * 48_000 * 2


@dataclass(frozen=True)
class Decoded:
    """A decoded recording."""

    audio: np.ndarray  # float32, 16 kHz, mono
    sample_rate: int  # of the upload
    channels: int
    truncated: bool  # the file ended before its header said it would

    @property
    def duration_s(self) -> float:
        """Seconds of audio."""
        return len(self.audio) / PIPELINE_RATE


def _too_long(limits: DecodeLimits) -> AudioDecodeError:
    return AudioDecodeError("audio_too_long", f"audio longer than {limits.max_audio_s:g} s "
                            "(api.max_audio_s)", status=413)


def _too_much(frames: int, channels: int, rate: int, limits: DecodeLimits) -> AudioDecodeError:
    return AudioDecodeError(
        "too_much_audio", f"{frames} frames x {channels} channels at {rate} Hz is more decoding "
        f"work than one request may cause ({limits.max_input_samples} input samples)",
        status=413)


class _Mono16k:
    """Block-wise downmix + streaming resample to 16 kHz, with a length limit."""

    def __init__(self, rate: int, limits: DecodeLimits) -> None:
        self._rs = None if rate == PIPELINE_RATE else soxr.ResampleStream(
            rate, PIPELINE_RATE, 1, dtype="float32", quality="HQ")
        self._limit = int(limits.max_audio_s * PIPELINE_RATE)
        self._limits = limits
        self._parts: list[np.ndarray] = []
        self.n = 0

    def push(self, block: np.ndarray, last: bool = False) -> None:
        """A (frames, channels) float32 block."""
        mono = block.mean(axis=1) if block.ndim == 2 and block.shape[1] > 1 else block.reshape(-1)
        mono = np.nan_to_num(mono.astype(np.float32, copy=False), nan=0.0, posinf=1.0,
                             neginf=-1.0)
        out = mono if self._rs is None else self._rs.resample_chunk(mono, last=last)
        self.n += len(out)
        if self.n > self._limit + PIPELINE_RATE // 100:  # resampler rounding slack
            raise _too_long(self._limits)
        if len(out):
            self._parts.append(np.array(out, dtype=np.float32))

    def result(self) -> np.ndarray:
        """All of it."""
        if not self._parts:
            return np.zeros(0, np.float32)
        return np.concatenate(self._parts)[:self._limit]


def _decode_soundfile(data: bytes, limits: DecodeLimits) -> Decoded | None:
    """WAV/FLAC/OGG/MP3 from memory; None when libsndfile does not know the format."""
    try:
        snd = sf.SoundFile(io.BytesIO(data))
    except Exception as e:  # LibsndfileError, but also TypeError/RuntimeError on odd headers
        log.debug("soundfile cannot open the upload: %s", e)
        return None
    with snd:
        rate, channels, frames = snd.samplerate, snd.channels, snd.frames
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioDecodeError("bad_audio", f"unsupported sample rate {rate} Hz")
        if not 1 <= channels <= MAX_CHANNELS:
            raise AudioDecodeError("bad_audio", f"unsupported channel count {channels}")
        # Refused on the header's word when it can be: no work done for an oversized claim.
        if 0 < frames < 2**62 and frames * channels > limits.max_input_samples:
            raise _too_much(frames, channels, rate, limits)
        if 0 < frames < 2**62 and frames / rate > limits.max_audio_s + 0.01:
            raise _too_long(limits)
        out = _Mono16k(rate, limits)
        got = 0
        block_frames = max(1024, min(rate, limits.max_input_samples // (4 * channels)))
        while True:
            try:
                block = snd.read(block_frames, dtype="float32", always_2d=True)
            except Exception as e:
                raise AudioDecodeError("bad_audio", f"cannot decode the audio: {e}") from e
            if not len(block):
                break
            got += len(block)
            if got * channels > limits.max_input_samples:
                raise _too_much(got, channels, rate, limits)
            out.push(block)
        out.push(np.zeros((0, 1), np.float32), last=True)
    truncated = 0 < frames < 2**62 and got < frames
    return Decoded(out.result(), rate, channels, truncated)


def _decode_ffmpeg(data: bytes, limits: DecodeLimits) -> Decoded:
    """Anything else ffmpeg reads (webm/opus from browsers, m4a), as 16 kHz mono s16le."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioDecodeError("bad_audio", "not a WAV/FLAC/MP3/OGG file, and ffmpeg (for "
                               "other formats) is not installed")
    limit = int(limits.max_audio_s * PIPELINE_RATE) * 2
    cmd = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", "pipe:0",
           "-f", "s16le", "-ac", "1", "-ar", str(PIPELINE_RATE), "-t",
           f"{limits.max_audio_s + 0.05:.2f}", "pipe:1"]
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, timeout=FFMPEG_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as e:
        raise AudioDecodeError("bad_audio", f"decoding took over {FFMPEG_TIMEOUT_S:g} s") from e
    except OSError as e:
        raise AudioDecodeError("bad_audio", f"cannot run ffmpeg: {e}") from e
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        why = err[-1] if err else f"ffmpeg exited {proc.returncode}"
        raise AudioDecodeError("bad_audio", f"not audio in a known format: {why[:300]}")
    if len(proc.stdout) > limit + 3200:
        raise _too_long(limits)
    pcm = np.frombuffer(proc.stdout[:len(proc.stdout) // 2 * 2], dtype="<i2")
    return Decoded(pcm.astype(np.float32) / 32768.0, PIPELINE_RATE, 1, False)


def decode_audio(data: bytes, limits: DecodeLimits | None = None) -> Decoded:
    """Decode an uploaded recording (blocking); AudioDecodeError 400 (bad/empty) or 413."""
    limits = limits or DecodeLimits()
    if not data:
        raise AudioDecodeError("empty_audio", "the request holds no audio")
    failure: AudioDecodeError | None = None
    try:
        decoded = _decode_soundfile(data, limits) or _decode_ffmpeg(data, limits)
    except AudioDecodeError as e:
        # Refused mid-decode, the error's traceback holds the frames, and with them the blocks
        # decoded so far, in reference cycles only the garbage collector breaks: RSS climbed
        # ~100 MB per burst of 10 bombs. A fresh error, raised without them, keeps nothing.
        failure = AudioDecodeError(e.code, e.message, status=e.status)
    finally:
        release_memory()
    if failure is not None:
        try:
            raise failure
        finally:
            failure = None  # no frame -> error -> traceback -> frame cycle either
    if not len(decoded.audio):
        raise AudioDecodeError("empty_audio", "the audio decodes to no samples"
                               + (" (the file is truncated)" if decoded.truncated else ""))
    return decoded


def decode_base64(text: str) -> bytes:
    """Standard base64, an optional `data:...;base64,` prefix and whitespace allowed."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise AudioDecodeError("bad_base64", f"audio is not valid base64: {e}") from e


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


_libc: ctypes.CDLL | None = None
_libc_tried = False
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# Blocks this large are mmapped, so freeing them returns them to the OS at once. Left to
# itself glibc raises this threshold after the first large free (up to 32 MB), and the
# blocks of a burst of uploads then stay in its heap: RSS +40 MB after 10 bombs, not +2.
MMAP_THRESHOLD = 256 * 1024


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): RSS returns after a burst."""
    global _libc, _libc_tried
    if not _libc_tried:
        _libc_tried = True
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else None
        except OSError:
            _libc = None
        if _libc is not None and hasattr(_libc, "mallopt"):
            _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
