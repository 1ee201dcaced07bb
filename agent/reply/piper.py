"""Local TTS with Piper (`piper-tts`, ONNX): the voice that works with no cloud at all.

Synthesis is synchronous and CPU-bound, so it runs through `run_sync` (a worker thread by
default; the daemon's decode runner when it hands one in), one Piper sentence at a time so
the first audio is out after the first sentence. The voice's own rate (22.05 kHz for the
medium voices) is resampled to 16 kHz with soxr, streaming across the whole reply so chunk
joins do not click. A cancelled reply stops waiting at once; the sentence already running in
the worker finishes there and is thrown away (one sentence, a few hundred ms of one core).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agent.constants import PIPELINE_RATE
from agent.errors import ModelError, ReplyError
from agent.reply.tts import PcmResampler, Tts

log = logging.getLogger(__name__)

T = TypeVar("T")
RunSync = Callable[[Callable[[], Any]], Awaitable[Any]]
DEFAULT_MODEL_ID = "piper-joe-us"
MAX_TEXT_CHARS = 5000  # one `say`: longer text is refused rather than hogging a core for minutes


async def _to_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def voice_files(model_dir: Path) -> tuple[Path, Path]:
    """The voice's .onnx and its .onnx.json in `model_dir`; ModelError when not exactly one."""
    onnx = sorted(model_dir.glob("*.onnx"))
    if len(onnx) != 1:
        raise ModelError("missing_file", f"{model_dir}: expected one Piper voice (*.onnx), "
                         f"found {len(onnx)}")
    config = onnx[0].with_name(onnx[0].name + ".json")
    if not config.is_file():
        raise ModelError("missing_file", f"{model_dir}: {config.name} missing")
    return onnx[0], config


class PiperTts(Tts):
    """A Piper voice behind the streaming TTS interface."""

    backend = "piper"

    def __init__(self, model_dir: Path, *, length_scale: float | None = None,
                 volume: float = 1.0, block_ms: int = 100, threads: int = 1,
                 run_sync: RunSync | None = None) -> None:
        self.model_path, self.config_path = voice_files(Path(model_dir))
        cfg = json.loads(self.config_path.read_text(encoding="utf-8"))
        self.voice_rate = int(cfg["audio"]["sample_rate"])
        self.voice = self.model_path.stem  # e.g. en_US-joe-medium
        self.sample_rate = PIPELINE_RATE
        self.length_scale = length_scale
        self.volume = volume
        self.block_samples = PIPELINE_RATE * block_ms // 1000
        self.threads = threads
        self._run: RunSync = run_sync or _to_thread
        self._voice: Any = None
        # Piper's espeak phonemizer keeps global state: one synthesis at a time. Re-entrant:
        # a synthesis holding it may load the voice first.
        self._lock = threading.RLock()

    @classmethod
    def installed(cls, model_id: str = DEFAULT_MODEL_ID, **kw: Any) -> PiperTts:
        """The voice installed as `model_id` (ModelError with the install command if absent)."""
        from agent import models

        return cls(models.path(model_id), **kw)

    def load(self) -> None:
        """Load the ONNX voice (blocking: call from a worker thread; idempotent)."""
        with self._lock:
            if self._voice is not None:
                return
            try:
                import onnxruntime
                from piper import PiperVoice
            except ImportError as e:
                raise ModelError("backend_missing", f"piper-tts is not installed ({e}): "
                                 "pip install piper-tts") from e
            try:
                voice = PiperVoice.load(self.model_path, config_path=self.config_path)
                opts = onnxruntime.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                # Re-open with our thread count: Piper's default takes every core.
                voice.session = onnxruntime.InferenceSession(
                    str(self.model_path), sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime / json errors on a broken voice
                raise ModelError("load_failed", f"cannot load Piper voice "
                                 f"{self.model_path}: {e}") from e
            self._voice = voice
            log.info("Piper voice %s loaded (%d Hz)", self.voice, self.voice_rate)

    async def warm_up(self) -> None:
        """Load the voice off the event loop."""
        await self._run(self.load)

    def _sentences(self, text: str) -> Iterator[np.ndarray]:
        """Float32 audio at the voice rate, one array per Piper sentence (blocking, lazy)."""
        from piper import SynthesisConfig

        self.load()
        syn = SynthesisConfig(length_scale=self.length_scale, volume=self.volume)
        for chunk in self._voice.synthesize(text, syn_config=syn):
            yield chunk.audio_float_array

    def synthesize_blocking(self, text: str) -> np.ndarray:
        """All of `text` as 16 kHz int16 (for files and tests; blocking)."""
        text = _check_text(text)
        res = PcmResampler(self.voice_rate)
        with self._lock:
            pcm = b"".join(res.process(a) for a in self._sentences(text))
        pcm += res.process(np.zeros(0, np.float32), last=True)
        return np.frombuffer(pcm, dtype="<i2").copy()

    async def synthesize(self, text_chunks: AsyncIterator[str]) -> AsyncGenerator[bytes, None]:
        """16 kHz PCM for each text chunk, sentence by sentence, in `block_ms` pieces."""
        await self._run(self.load)
        res = PcmResampler(self.voice_rate)
        async for text in text_chunks:
            if not text.strip():
                continue
            text = _check_text(text)
            sentences = self._sentences(text)

            def next_sentence(it: Iterator[np.ndarray] = sentences) -> np.ndarray | None:
                with self._lock:
                    return next(it, None)

            while (audio := await self._run(next_sentence)) is not None:
                pcm = res.process(audio)
                step = 2 * self.block_samples
                for i in range(0, len(pcm), step):
                    yield pcm[i:i + step]
        tail = res.process(np.zeros(0, np.float32), last=True)
        if tail:
            yield tail


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _check_text(text: str) -> str:
    """The text Piper can speak: control characters (which crash its phonemizer) as spaces."""
    text = _CONTROL.sub(" ", text)
    if not text.strip():
        raise ReplyError("empty_text", "nothing to say: the text is empty", status=400)
    if len(text) > MAX_TEXT_CHARS:
        raise ReplyError("text_too_long", f"text of {len(text)} characters; at most "
                         f"{MAX_TEXT_CHARS} can be spoken at once", status=413)
    return text
