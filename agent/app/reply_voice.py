"""The reply's voices and language model, built from config.

The cloud clients (DashScope qwen, CosyVoice) from `dashscope.*` and `reply.*`; the local
Piper voice from `reply.piper`, its synthesis run by the daemon-wide decode runner (priority
FINAL: a reply is what the user waits for), wrapped so that the offline notice is rendered
once and replayed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent.analysis import Priority
from agent.config import Config
from agent.errors import AgentError, ReplyError
from agent.reply.cosyvoice import CosyVoiceTts
from agent.reply.llm import DashscopeLlm
from agent.reply.piper import PiperTts
from agent.reply.tts import Tts, synthesize_all

if TYPE_CHECKING:
    from agent.app.core import App

log = logging.getLogger(__name__)

PIECE_BYTES = 3200  # 100 ms of 16 kHz s16: how the cached notice is handed out
# Speech rates no voice beats (fast English is ~15 letters/s; a digit is a word; Chinese is
# ~5 characters/s): the least time a text can take to say.
LETTERS_PER_S, DIGIT_S, CJK_S = 25.0, 0.3, 0.15


def speech_floor_s(text: str) -> float:
    """A lower bound on how long `text` takes to say (to refuse the hopeless before synthesis)."""
    digits = sum(ch.isdigit() for ch in text)
    cjk = sum(0x3000 <= ord(ch) <= 0x9FFF for ch in text)
    letters = sum(ch.isalpha() for ch in text) - cjk
    return letters / LETTERS_PER_S + digits * DIGIT_S + cjk * CJK_S


def cloud_llm(cfg: Config) -> DashscopeLlm:
    """The streaming qwen client."""
    ds, llm = cfg.dashscope, cfg.reply.llm
    return DashscopeLlm(api_key=ds.api_key, base_url=ds.base_url, model=llm.model,
                        system_prompt=llm.system_prompt,
                        first_text_timeout_s=llm.first_text_timeout_s,
                        idle_timeout_s=llm.idle_timeout_s, retries=ds.retries,
                        backoff_initial_s=ds.backoff_initial_s, backoff_max_s=ds.backoff_max_s,
                        parameters=llm.parameters)


def cloud_tts(cfg: Config) -> Tts | None:
    """CosyVoice, or None when `reply.tts` is piper (the local voice only)."""
    if cfg.reply.tts != "cosyvoice":
        return None
    ds, cv = cfg.dashscope, cfg.reply.cosyvoice
    return LimitedTts(CosyVoiceTts(
        api_key=ds.api_key, ws_url=ds.ws_url, model=cv.model, voice=cv.voice,
        request_rate=cv.sample_rate, volume=cv.volume, speech_rate=cv.speech_rate,
        pitch_rate=cv.pitch_rate, connect_timeout_s=cv.connect_timeout_s,
        first_audio_timeout_s=cv.first_audio_timeout_s, idle_timeout_s=cv.idle_timeout_s,
        retries=ds.retries, backoff_initial_s=ds.backoff_initial_s,
        backoff_max_s=ds.backoff_max_s), cfg.api.max_audio_s)


def local_voice(app: App) -> Tts | None:
    """The Piper voice through the decode runner, or None when it is not installed."""
    rc = app.cfg.reply
    runner = app.runner

    def run_sync(fn: Callable[[], Any]) -> Awaitable[Any]:
        return runner.run(fn, priority=Priority.FINAL, kind="tts")

    try:
        voice = PiperTts.installed(rc.piper.model, length_scale=rc.piper.length_scale,
                                   volume=rc.piper.volume, run_sync=run_sync)
    except AgentError as e:
        if rc.enabled or rc.tts == "piper":
            # Replies lose their offline notice (or their only voice): degraded health.
            app.problems["tts"] = e.message
        log.warning("local voice unavailable (say needs the cloud): %s", e)
        return None
    return LimitedTts(CachedNotice(voice, rc.offline_text), app.cfg.api.max_audio_s)


class LimitedTts(Tts):
    """A voice that stops past `max_s` of audio: no request makes more than api.max_audio_s.

    Speech is cheap to ask for and dear to make (a page of digits is half an hour of Piper),
    so the bound that caps uploads caps synthesis too; past it, ReplyError `audio_too_long`.
    """

    def __init__(self, inner: Tts, max_s: float) -> None:
        self.inner = inner
        self.max_s = max_s
        self.backend, self.voice, self.sample_rate = inner.backend, inner.voice, \
            inner.sample_rate

    async def warm_up(self) -> None:
        """The inner voice's warm-up."""
        await self.inner.warm_up()

    async def synthesize(self, text_chunks: AsyncIterator[str]) -> AsyncGenerator[bytes, None]:
        """The inner voice's audio, up to `max_s`."""
        limit, made = int(self.max_s * self.sample_rate) * 2, 0
        async with contextlib.aclosing(self.inner.synthesize(text_chunks)) as pcm_stream:
            async for pcm in pcm_stream:
                made += len(pcm)
                if made > limit:
                    raise ReplyError("audio_too_long", f"the speech runs past api.max_audio_s "
                                     f"= {self.max_s:g} s", status=413)
                yield pcm

    async def aclose(self) -> None:
        """Close the inner voice."""
        await self.inner.aclose()


class CachedNotice(Tts):
    """The local voice, with the offline notice rendered once (at warm-up) and replayed.

    During a cloud outage every question gets the same notice: replaying it costs no CPU and
    its first audio is immediate.
    """

    def __init__(self, inner: Tts, notice: str) -> None:
        self.inner = inner
        self.notice = notice.strip()
        self.backend, self.voice, self.sample_rate = inner.backend, inner.voice, \
            inner.sample_rate
        self.pcm: bytes | None = None

    async def warm_up(self) -> None:
        """Load the voice and render the notice."""
        await self.inner.warm_up()
        if self.notice:
            self.pcm = await synthesize_all(self.inner, self.notice)

    async def synthesize(self, text_chunks: AsyncIterator[str]) -> AsyncGenerator[bytes, None]:
        """The inner voice's audio, or the cached notice when that is all there is to say."""
        it = aiter(text_chunks)
        first = await anext(it, None)
        if first is None:
            return
        head = [first]
        if self.pcm is not None and first.strip() == self.notice:
            second = await anext(it, None)
            if second is None:
                for i in range(0, len(self.pcm), PIECE_BYTES):
                    yield self.pcm[i:i + PIECE_BYTES]
                return
            head.append(second)

        async def rest() -> AsyncIterator[str]:
            for t in head:
                yield t
            async for t in it:
                yield t

        async with contextlib.aclosing(self.inner.synthesize(rest())) as pcm_stream:
            async for pcm in pcm_stream:
                yield pcm

    async def aclose(self) -> None:
        """Close the inner voice."""
        await self.inner.aclose()
