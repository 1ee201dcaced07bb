"""Wyoming text to speech: the voices we offer, `synthesize`, and the streaming session.

`synthesize` is answered with one audio-start .. audio-stop (HA's non-streaming client reads
until the first audio-stop). The streaming form (`synthesize-start`, `-chunk`s,
`synthesize-stop`) cuts the text into sentences as it arrives and answers each sentence with
its own audio-start .. audio-stop as soon as it is spoken, then `synthesize-stopped`; the
`synthesize` a streaming client also sends, for older servers, is ignored. Synthesis is CPU
work: it runs in the decode runner, one voice call at a time (Piper holds a lock of its own,
and a runner worker waiting on it would be a core lost to everyone else).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.tts import SynthesizeStopped, SynthesizeVoice

from agent.analysis import Priority
from agent.errors import AgentError, ModelError, ReplyError
from agent.reply.chunker import SentenceChunker
from agent.reply.tts import Tts, aiter_texts

if TYPE_CHECKING:
    from agent.app.core import App

log = logging.getLogger(__name__)

Send = Callable[[Event], Awaitable[None]]
WIDTH, CHANNELS = 2, 1  # what every Tts yields: s16le mono


@dataclass
class Voice:
    """One voice as `info` lists it, with the backend that speaks it."""

    name: str
    tts: Tts
    languages: list[str]
    description: str
    attribution: tuple[str, str]  # (who, url)
    version: str | None = None
    program: str = "voice-agent-piper"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def piper_dir(model_id: str) -> Path:
    """The installed Piper voice (ModelError with the install command when absent)."""
    from agent import models

    try:
        return models.path(model_id)
    except ModelError as e:
        # Until the manifest has the entry, a voice copied by hand into models_onnx/ counts.
        by_hand = models.models_dir() / model_id
        if e.code == "unknown_model" and list(by_hand.glob("*.onnx")):
            return by_hand
        raise


def local_voice(app: App) -> Voice:
    """The local Piper voice of `reply.piper`, synthesising in the app's decode runner."""
    from agent.reply.piper import DEFAULT_MODEL_ID, PiperTts

    piper = getattr(getattr(app.cfg, "reply", None), "piper", None)
    model_id = getattr(piper, "model", DEFAULT_MODEL_ID)

    holder: list[Voice] = []

    async def run_sync(fn: Callable[[], Any]) -> Any:
        async with holder[0].lock:
            return await app.runner.run(fn, priority=Priority.FINAL, kind="tts")

    tts = PiperTts(piper_dir(model_id), length_scale=getattr(piper, "length_scale", None),
                   volume=getattr(piper, "volume", 1.0), run_sync=run_sync)
    meta = json.loads(tts.config_path.read_text(encoding="utf-8"))
    code = (meta.get("language") or {}).get("code") or "en_US"
    voice = Voice(name=tts.voice, tts=tts, languages=[code],
                  description=f"Piper {tts.voice} (local, {tts.voice_rate} Hz voice, sent as "
                              f"{tts.sample_rate} Hz)",
                  attribution=("Rhasspy Piper", "https://github.com/rhasspy/piper"),
                  version=str(meta.get("piper_version") or "") or None)
    holder.append(voice)
    return voice


def _lang(code: str) -> str:
    return code.replace("-", "_").split("_")[0].lower()


def select_voice(voices: list[Voice], wanted: SynthesizeVoice | None) -> Voice:
    """The voice a request names (or whose language it names); the first one otherwise."""
    if not voices:
        raise ReplyError("tts_unavailable", "no text-to-speech voice is installed "
                         "(voice-agent models install piper-joe-us)", status=503)
    if wanted is None:
        return voices[0]
    if wanted.name is not None:
        for v in voices:
            if v.name == wanted.name:
                return v
        raise ReplyError("unknown_voice", f"no voice {wanted.name[:80]!r}; voices: "
                         f"{', '.join(v.name for v in voices)}", status=404)
    if wanted.language is not None:
        for match in (lambda v, lang: lang in v.languages,
                      lambda v, lang: _lang(lang) in {_lang(x) for x in v.languages}):
            for v in voices:
                if match(v, wanted.language):
                    return v
        raise ReplyError("unsupported_language", f"no voice speaks {wanted.language[:20]!r}",
                         status=400)
    return voices[0]


def check_format(text_format: Any) -> None:
    """Plain text only: SSML would be read out tag by tag."""
    if text_format not in (None, "text") and getattr(text_format, "value", None) != "text":
        raise ReplyError("unsupported_format", f"text_format {str(text_format)[:20]!r} is not "
                         "supported: send plain text", status=400)


async def speak(voice: Voice, texts: list[str], send: Send) -> float:
    """One audio-start .. audio-stop holding all of `texts`; returns the seconds of audio."""
    rate = voice.tts.sample_rate
    await send(AudioStart(rate=rate, width=WIDTH, channels=CHANNELS).event())
    n = 0
    async with contextlib.aclosing(voice.tts.synthesize(aiter_texts(texts))) as pcm:
        async for block in pcm:
            if block:
                n += len(block)
                await send(AudioChunk(rate=rate, width=WIDTH, channels=CHANNELS,
                                      audio=block).event())
    await send(AudioStop().event())
    return n / (WIDTH * rate)


class StreamingSynthesis:
    """synthesize-start .. synthesize-stop: each sentence spoken as soon as it is complete."""

    def __init__(self, voice: Voice, send: Send, on_error: Callable[[AgentError], Awaitable[None]]
                 ) -> None:
        self.voice = voice
        self.send = send
        self.on_error = on_error
        self.chunker = SentenceChunker()
        self.sentences = 0
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._worker = asyncio.create_task(self._speak(), name="wyoming-tts")
        self.failed = False

    def push(self, text: str) -> None:
        """A synthesize-chunk: queue every sentence it completes."""
        for sentence in self.chunker.push(text):
            self._queue.put_nowait(sentence)

    async def stop(self) -> None:
        """synthesize-stop: speak the rest, then `synthesize-stopped`."""
        for sentence in self.chunker.flush():
            self._queue.put_nowait(sentence)
        self._queue.put_nowait(None)
        await self._worker
        await self.send(SynthesizeStopped().event())

    async def _speak(self) -> None:
        while (sentence := await self._queue.get()) is not None:
            if self.failed:
                continue
            try:
                await speak(self.voice, [sentence], self.send)
                self.sentences += 1
            except AgentError as e:
                # The rest of the text would go unspoken anyway: say why, once.
                self.failed = True
                await self.on_error(e)

    def abandon(self) -> None:
        """The client left: stop speaking."""
        self._worker.cancel()
