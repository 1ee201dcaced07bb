"""The local Piper voice: intelligible speech (checked by our own ASR), off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import ModelError, ReplyError
from agent.reply.piper import PiperTts
from agent.reply.tts import aiter_texts, synthesize_all

MODEL_ID = "piper-joe-us"


def piper_dir() -> Path:
    """The installed voice, or skip saying how to get it."""
    from agent import models

    try:
        return models.path(MODEL_ID)
    except ModelError as e:
        # Until the manifest has the entry, a voice copied by hand into models_onnx/ counts.
        by_hand = models.models_dir() / MODEL_ID
        if e.code == "unknown_model" and list(by_hand.glob("*.onnx")):
            return by_hand
        pytest.skip(f"Piper voice not installed: {e.message}")


@pytest.fixture(scope="module")
def voice() -> PiperTts:
    pytest.importorskip("piper", reason="piper-tts not installed (pip install piper-tts)")
    tts = PiperTts(piper_dir())
    tts.load()
    return tts


def asr_engine() -> Any:
    from agent.asr.sherpa import SherpaOfflineEngine
    from agent.config import SherpaOfflineAsrConfig

    try:
        return SherpaOfflineEngine(SherpaOfflineAsrConfig(threads=1))
    except ModelError as e:
        pytest.skip(f"ASR model for the round trip not installed: {e.message}")


def test_speech_is_understood_by_our_asr(voice: PiperTts) -> None:
    from agent.asr.wer import wer

    text = "Eight of spades, four of clubs, seven of hearts."
    pcm = voice.synthesize_blocking(text)
    assert pcm.dtype == np.int16
    assert 1.5 < len(pcm) / 16000 < 6.0
    assert np.abs(pcm).max() > 8000  # loud enough to hear
    heard = asr_engine().decode(pcm.astype(np.float32) / 32768.0).text
    print(f"piper said {text!r}, whisper heard {heard!r}")
    assert wer([text], [heard]) <= 0.25, heard


async def test_streams_sentence_by_sentence_without_blocking_the_loop(voice: PiperTts) -> None:
    texts = ["This is the first sentence of the local reply.",
             "And this second one comes after it. And a third one too."]
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:  # how late the loop runs a 10 ms timer
        while not stop.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    tick = asyncio.create_task(ticker())
    t0 = time.monotonic()
    arrivals: list[tuple[float, int]] = []
    async for pcm in voice.synthesize(aiter_texts(texts)):
        arrivals.append((time.monotonic() - t0, len(pcm)))
    total = time.monotonic() - t0
    stop.set()
    await tick
    audio_s = sum(n for _, n in arrivals) / 2 / 16000
    assert 3.0 < audio_s < 12.0
    assert all(n % 2 == 0 for _, n in arrivals)
    assert arrivals[0][0] < total / 2  # the first sentence played while the rest synthesized
    assert max(lags) < 0.05, f"event loop blocked for {max(lags) * 1000:.0f} ms"


async def test_cancel_stops_at_once(voice: PiperTts) -> None:
    got: list[bytes] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for pcm in voice.synthesize(aiter_texts(["A long sentence. " * 30])):
            got.append(pcm)
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    n = len(got)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 0.1
    await asyncio.sleep(0.3)
    assert len(got) <= n + 1  # at most the piece already on its way


async def test_runs_through_the_injected_runner(voice: PiperTts) -> None:
    calls = 0

    async def runner(fn: Callable[[], Any]) -> Any:
        nonlocal calls
        calls += 1
        return await asyncio.to_thread(fn)

    tts = PiperTts(voice.model_path.parent, run_sync=runner)
    tts._voice = voice._voice  # share the loaded model: this test is about the runner
    pcm = await synthesize_all(tts, "Hello from the runner.")
    assert len(pcm) > 16000
    assert calls >= 2  # load check + at least one sentence


async def test_bad_text_is_refused(voice: PiperTts) -> None:
    with pytest.raises(ReplyError) as ei:
        voice.synthesize_blocking("   ")
    assert ei.value.code == "empty_text"
    with pytest.raises(ReplyError) as ei:
        await synthesize_all(voice, "x" * 6000)
    assert ei.value.code == "text_too_long" and ei.value.status == 413


def test_missing_voice_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as ei:
        PiperTts(tmp_path)
    assert ei.value.code == "missing_file"
