"""MicSource against a real capture device: a private PulseAudio null sink, seen via ALSA.

A WAV is played into the null sink with `paplay`; its monitor, remapped as the default
source, is what PortAudio's ALSA device `pulse` records. The 16 kHz chunks that come out of
MicSource must match the file. sounddevice is never imported at module level: PortAudio lists
devices once, so the server must be up first (the fixture also re-enumerates, in case another
test imported sounddevice earlier).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from agent.audio.mic import MicSource, list_input_devices  # imports sounddevice lazily
from agent.config import AudioConfig
from agent.errors import AgentError, AudioSourceError
from tests.conftest import ASR_EN, REPO
from tests.pulse import PulseServer, missing_portaudio, missing_requirements

WAV = ASR_EN / "sense_and_sensibility_01_austen_64kb-0880.wav"
MIN_CORRELATION = 0.99
PAD = 64  # samples of zeros around the capture, so the fractional shift never wraps audio


def need_wav() -> None:
    if not WAV.exists():
        pytest.skip(f"shared test data not found at {WAV} (clone the repo beside shared/)")


def mic_cfg(**kw: Any) -> AudioConfig:
    return AudioConfig(source="mic", **kw)


def _shift(x: np.ndarray, delay: float) -> np.ndarray:
    """Delay `x` by a fraction of a sample (band-limited, circular)."""
    f = np.fft.rfftfreq(len(x))
    return np.fft.irfft(np.fft.rfft(x) * np.exp(-2j * np.pi * f * delay), len(x))


def align(captured: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Lag of `ref` inside `captured` (samples, sub-sample) and the correlation there.

    Integer lag from the FFT cross-correlation peak, then a fractional delay in [-1, 1]: the
    null sink runs at 48 kHz, so the file is upsampled 16 -> 48 kHz and the capture starts at
    an arbitrary 48 kHz sample; after decimation it can sit 1/3 or 2/3 of a 16 kHz sample off
    the file, which alone pulls the correlation down to ~0.984 (fricatives near 4-8 kHz).
    """
    cap = np.pad(captured.astype(np.float64), PAD)
    r = ref.astype(np.float64)
    nfft = 1 << (len(cap) + len(r) - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(cap, nfft) * np.conj(np.fft.rfft(r, nfft)), nfft)
    lag = int(np.argmax(xc[: len(cap) - len(r) + 1]))
    lo = max(lag - PAD, 0)
    window = cap[lo: lag + len(r) + PAD]
    best = (float(lag), -1.0)
    for d in np.linspace(-1.0, 1.0, 41):
        seg = _shift(window, -d)[lag - lo: lag - lo + len(r)]
        c = float(np.corrcoef(seg, r)[0, 1])
        if c > best[1]:
            best = (lag - PAD + d, c)
    return best


def test_align_finds_fractional_delay() -> None:
    """The comparison itself: a 0.4-sample delay is found and scores ~1."""
    need_wav()
    ref, _ = sf.read(WAV, dtype="float64")
    cap = np.concatenate([np.zeros(1000), _shift(np.pad(ref, 50), 0.4)[50:-50], np.zeros(500)])
    lag, corr = align(cap, ref)
    assert lag == pytest.approx(1000.4, abs=0.05)
    assert corr > 0.9999


async def capture_while_playing(srv: PulseServer, cfg: AudioConfig, wav: Path,
                                tail_s: float = 1.0,
                                ) -> tuple[np.ndarray, MicSource, list[AgentError]]:
    """Start MicSource, play `wav` into the null sink once audio flows, and stop once the
    capture holds everything since playback began plus `tail_s` of what followed."""
    errors: list[AgentError] = []
    src = MicSource(cfg, on_error=errors.append)
    chunks: list[np.ndarray] = []
    captured = 0
    want: int | None = None  # samples to capture before stopping, once playback started
    first, enough = asyncio.Event(), asyncio.Event()

    async def collect() -> None:
        nonlocal captured
        async for chunk in src.chunks():
            chunks.append(chunk)
            captured += len(chunk)
            first.set()
            if want is not None and captured >= want:
                enough.set()

    task = asyncio.create_task(collect())
    try:
        await asyncio.wait_for(first.wait(), timeout=10)
        want = captured + sf.info(str(wav)).frames + int(tail_s * 16000)
        play = await asyncio.create_subprocess_exec(
            *srv.paplay_cmd(wav), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(play.communicate(), timeout=30)
        assert play.returncode == 0, f"paplay failed: {out.decode(errors='replace')}"
        await asyncio.wait_for(enough.wait(), timeout=10)
    finally:
        src.stop()
        await asyncio.wait_for(task, timeout=10)
    assert chunks, f"no audio captured; errors: {errors}"
    return np.concatenate(chunks), src, errors


@pytest.mark.parametrize("rate", [48000, 16000, None], ids=["48k", "16k", "device-default"])
async def test_mic_captures_what_pulse_plays(pulse: PulseServer, rate: int | None) -> None:
    need_wav()
    devices = {d["name"]: d for d in list_input_devices()}
    assert "pulse" in devices, (
        f"PortAudio does not list the ALSA 'pulse' device: {sorted(devices)}\n{pulse.log}"
    )
    ref, sr = sf.read(WAV, dtype="int16")
    assert sr == 16000

    cfg = mic_cfg(device="pulse", sample_rate=rate, block_ms=30)
    captured, src, errors = await capture_while_playing(pulse, cfg, WAV)

    assert errors == []
    assert src.opened == 1
    assert src.device_name == "pulse"
    assert src.device_rate == (rate or int(devices["pulse"]["default_samplerate"]))
    assert captured.dtype == np.int16
    assert len(captured) % src.block_samples == 0
    assert len(captured) >= len(ref) + 16000 * 0.5  # the whole file plus part of the tail

    lag, corr = align(captured, ref)
    start = round(lag)
    seg = captured[start: start + len(ref)].astype(np.float64)
    gain = float(np.sqrt(np.mean(seg**2) / np.mean(ref.astype(np.float64) ** 2)))
    print(f"rate={src.device_rate} lag={lag:.2f} corr={corr:.6f} gain={gain:.4f} "
          f"overflows={src.overflows} dropped={src.dropped_chunks}")
    assert corr >= MIN_CORRELATION, f"correlation {corr:.5f} at lag {lag:.2f}"
    assert 0.9 < gain < 1.1, f"level changed: gain {gain:.3f}"


async def test_unknown_device_reports_and_retries_until_stopped() -> None:
    if reason := missing_portaudio():
        pytest.skip(reason)
    errors: list[AgentError] = []
    twice = asyncio.Event()

    def on_error(e: AgentError) -> None:
        errors.append(e)
        if len(errors) >= 2:
            twice.set()

    cfg = mic_cfg(device="no-such-mic-xyz", retry_initial_s=0.05, retry_max_s=0.1)
    src = MicSource(cfg, on_error=on_error)
    chunks: list[np.ndarray] = []

    async def collect() -> None:
        async for chunk in src.chunks():
            chunks.append(chunk)

    task = asyncio.create_task(collect())
    await asyncio.wait_for(twice.wait(), timeout=10)
    assert not task.done()  # still retrying
    src.stop()
    await asyncio.wait_for(task, timeout=2)  # iteration ends cleanly, no exception

    assert chunks == []
    assert src.opened == 0
    assert len(errors) >= 2
    for e in errors:
        assert isinstance(e, AudioSourceError)
        assert e.code == "device_not_found"
        assert "no-such-mic-xyz" in e.message


def test_refresh_lets_early_sounddevice_import_see_late_server() -> None:
    """sounddevice imported BEFORE the server starts still finds `pulse` after refresh."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    code = textwrap.dedent("""
        import sounddevice as sd
        from tests.pulse import pulse_server
        before = [d["name"] for d in sd.query_devices()]
        with pulse_server() as srv:
            after = [d["name"] for d in sd.query_devices()]
        print(before, after)
        assert "pulse" in after, (before, after, srv.log)
    """)
    # Not the session server: no PULSE_* from the `pulse` fixture may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
