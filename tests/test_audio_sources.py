"""File and stdin sources: formats, resampling, downmixing, fixed chunk size."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.audio.convert import Rechunker
from agent.audio.file import FileSource
from agent.audio.sources import parse_source_spec
from agent.audio.stdin import StdinSource
from agent.config import AudioConfig
from agent.errors import AudioSourceError

from .conftest import ASR_EN, need_shared

CLIP = "sense_and_sensibility_01_austen_64kb-0880.wav"


def reference() -> np.ndarray:
    need_shared()
    x, sr = sf.read(ASR_EN / CLIP, dtype="float32")
    assert sr == 16000
    return x


async def collect(src: FileSource | StdinSource) -> np.ndarray:
    chunks = [c async for c in src.chunks()]
    assert chunks and all(len(c) == src.block_samples and c.dtype == np.int16 for c in chunks)
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Best normalized correlation over small lags (codecs and resamplers add delay)."""
    best = 0.0
    n = min(len(a), len(b)) - 2000
    for lag in range(-1000, 1001, 1):
        x = a[1000 + lag: 1000 + lag + n]
        y = b[1000: 1000 + n]
        if len(x) < n:
            continue
        c = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))
        best = max(best, c)
    return best


@pytest.mark.parametrize("fmt,subtype,min_corr", [
    ("WAV", "PCM_16", 0.999), ("FLAC", "PCM_16", 0.999), ("OGG", "VORBIS", 0.95),
    ("MP3", "MPEG_LAYER_III", 0.95),
])
async def test_formats_via_soundfile(tmp_path: Path, fmt: str, subtype: str,
                                     min_corr: float) -> None:
    ref = reference()
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, ref, 16000, format=fmt, subtype=subtype)
    got = await collect(FileSource(path, 30))
    assert abs(len(got) - len(ref)) < 2000
    assert similarity(got, ref) >= min_corr


async def test_48k_stereo_is_downmixed_and_resampled(tmp_path: Path) -> None:
    import soxr

    ref = reference()
    up = soxr.resample(ref, 16000, 48000)
    stereo = np.stack([up, up * 0.5], axis=1)
    path = tmp_path / "stereo48k.wav"
    sf.write(path, stereo, 48000, subtype="FLOAT")
    got = await collect(FileSource(path, 20))
    assert abs(len(got) - len(ref)) <= 320  # one 20 ms chunk of padding at most
    assert similarity(got, ref * 0.75) >= 0.999


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
async def test_m4a_via_ffmpeg(tmp_path: Path) -> None:
    ref = reference()
    path = tmp_path / "clip.m4a"
    cmd = ["ffmpeg", "-loglevel", "error", "-i", str(ASR_EN / CLIP), "-c:a", "aac", str(path)]
    await asyncio.to_thread(subprocess.run, cmd, check=True)
    got = await collect(FileSource(path, 30))
    assert similarity(got, ref) >= 0.95


async def test_corrupt_file_raises_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.ogg"
    path.write_bytes(b"OggS" + b"\x00" * 100 + bytes(range(256)) * 20)
    with pytest.raises(AudioSourceError) as e:
        await collect(FileSource(path, 30))
    assert e.value.code in ("corrupt", "unsupported") and str(path) in e.value.message


async def test_stdin_raw_pcm_with_odd_byte_splits() -> None:
    ref = reference()
    pcm = (ref * 32767).astype(np.int16).tobytes()

    class Dribble(io.RawIOBase):
        """Returns odd-sized pieces, as pipes do."""

        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def read(self, n: int = -1) -> bytes:
            piece = self.data[self.pos: self.pos + 777]
            self.pos += len(piece)
            return piece

    got = await collect(StdinSource(30, stream=Dribble(pcm)))  # type: ignore[arg-type]
    assert similarity(got, ref) >= 0.9999


def test_rechunker_exact_blocks() -> None:
    r = Rechunker(480)
    out = r.push(np.arange(1000, dtype=np.int16)) + r.push(np.arange(500, dtype=np.int16))
    assert [len(b) for b in out] == [480, 480, 480]
    tail = r.flush()
    assert tail is not None and len(tail) == 480 and tail[60:].sum() == 0


def test_source_spec_parsing() -> None:
    cfg = AudioConfig()
    assert parse_source_spec("mic:3", cfg).device == 3
    assert parse_source_spec("mic:USB Audio", cfg).device == "USB Audio"
    assert parse_source_spec("file:/x.wav", cfg).file == Path("/x.wav")
    assert parse_source_spec("-", cfg).source == "stdin"
    with pytest.raises(AudioSourceError):
        parse_source_spec("camera:1", cfg)
