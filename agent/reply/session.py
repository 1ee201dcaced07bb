"""One spoken reply at a time: prompt -> LLM stream -> sentence chunks -> TTS -> audio outs.

Everything is injected: `emit(event_cls, **fields)` publishes (the caller adds `device_id`),
the LLM client, a cloud TTS, a local TTS and the audio outputs (the speaker, kiosk streams).
The LLM and the TTS run concurrently: each sentence goes to the TTS as soon as the chunker
cuts it, and the TTS socket is opened while the LLM is still thinking.

Degradation: a cloud failure is a `cloud.unavailable` event. When the cloud TTS fails before
any audio was heard, the local voice speaks the whole reply; otherwise (the LLM failed, or
the TTS broke off mid-audio) the local voice says `offline_text` after what was heard.
Barge-in: `cancel(reason)` silences every output first (synchronously), then cancels the
reply's task, which closes the LLM response and the TTS socket; `reply.cancelled` says why.
`speaking` (and `on_speaking`) tells the pipeline when to ignore the microphone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.errors import AgentError, CloudError, ReplyError
from agent.events import (
    CloudUnavailable,
    ErrorEvent,
    LlmDone,
    LlmStarted,
    LlmText,
    ReplyCancelled,
    TtsFinished,
    TtsStarted,
)
from agent.reply.chunker import SentenceChunker
from agent.reply.history import ConversationStore
from agent.reply.llm import LlmClient
from agent.reply.tts import Tts, aiter_texts

log = logging.getLogger(__name__)

Emit = Callable[..., Any]
OFFLINE_TEXT = "Sorry, I can't reach the cloud right now."


class AudioOut(Protocol):
    """Where a reply's audio goes: the local player, a kiosk stream, a file."""

    name: str

    async def begin(self, reply_id: str, sample_rate: int) -> None:
        """A reply's first audio is coming."""
        ...

    async def write(self, pcm: bytes) -> None:
        """16 kHz mono s16le; may wait (the player keeps at most a little ahead)."""
        ...

    async def end(self) -> None:
        """The reply is complete: play out what is queued."""
        ...

    def abort(self) -> None:
        """Barge-in: drop everything queued, silence now (never blocks)."""
        ...


@dataclass
class ReplyResult:
    """How a reply ended and how fast it was."""

    reply_id: str
    outcome: str  # done, degraded (a cloud failure, the local voice spoke), cancelled, error
    text: str = ""
    first_text_ms: float | None = None  # trigger -> first LLM text
    first_audio_ms: float | None = None  # trigger -> first audio handed to the outputs
    audio_s: float = 0.0
    backends: list[str] = field(default_factory=list)
    error: AgentError | None = None
    cancel_reason: str | None = None


class _TextFeed:
    """Sentences as the LLM produces them; can be read again from the start (fallback)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.closed = False
        self._changed = asyncio.Event()

    def put(self, text: str) -> None:
        self.items.append(text)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def read(self) -> AsyncIterator[str]:
        i = 0
        while True:
            while i < len(self.items):
                i += 1
                yield self.items[i - 1]
            if self.closed:
                return
            self._changed.clear()
            await self._changed.wait()


@dataclass
class _Reply:
    reply_id: str
    t0: float
    ids: dict[str, str | None]
    result: ReplyResult
    outs: list[AudioOut] = field(default_factory=list)
    begun: bool = False
    audio_bytes: int = 0
    seq: int = 0
    llm_failed: bool = False
    tts_broke: bool = False  # the cloud TTS failed after audio was heard (or with no local)
    cancel_reason: str | None = None


class ReplySession:
    """Runs replies (and `say`), one at a time, for one device."""

    def __init__(
        self,
        emit: Emit,
        *,
        llm: LlmClient | None = None,
        tts: Tts | None = None,
        local_tts: Tts | None = None,
        outputs: Sequence[AudioOut] = (),
        conversations: ConversationStore | None = None,
        chunk_min_weight: int = 8,
        chunk_max_weight: int = 160,
        offline_text: str = OFFLINE_TEXT,
        on_speaking: Callable[[bool], None] | None = None,
    ) -> None:
        self.emit = emit
        self.llm = llm
        self.tts = tts
        self.local_tts = local_tts
        self.outputs: list[AudioOut] = list(outputs)
        self.conversations = conversations or ConversationStore()
        self.chunk_min_weight = chunk_min_weight
        self.chunk_max_weight = chunk_max_weight
        self.offline_text = offline_text
        self.on_speaking = on_speaking
        self.speaking = False
        self._task: asyncio.Task[ReplyResult] | None = None
        self._current: _Reply | None = None

    @property
    def busy(self) -> bool:
        """A reply is in progress (thinking or speaking)."""
        return self._task is not None and not self._task.done()

    # ---------------------------------------------------------------- entry points

    async def reply(self, prompt: str, *, session_id: str | None = None,
                    utterance_id: str | None = None, conversation: str = "default",
                    trigger_mono: float | None = None) -> ReplyResult:
        """Answer `prompt` out loud; returns when the reply has been played (or cut short)."""
        return await self._run(lambda r: self._reply_flow(r, prompt, conversation),
                               session_id, utterance_id, trigger_mono)

    async def say(self, text: str, *, session_id: str | None = None,
                  utterance_id: str | None = None, local: bool = False,
                  trigger_mono: float | None = None) -> ReplyResult:
        """Speak `text` (cloud TTS unless `local`, the local voice when that fails)."""
        return await self._run(lambda r: self._say_flow(r, text, local),
                               session_id, utterance_id, trigger_mono)

    async def cancel(self, reason: str = "barge_in") -> bool:
        """Stop the reply in progress: outputs silenced at once, LLM and TTS closed."""
        task, cur = self._task, self._current
        if task is None or task.done() or cur is None:
            return False
        cur.cancel_reason = reason
        for out in cur.outs:
            out.abort()
        self._set_speaking(False)
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        return True

    async def warm_up(self) -> None:
        """Load the local voice now, so the first offline reply is not a model load late."""
        if self.local_tts is not None:
            await self.local_tts.warm_up()

    async def aclose(self) -> None:
        """Shutdown: cancel what runs, close the clients."""
        await self.cancel("shutdown")
        for client in (self.llm, self.tts, self.local_tts):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    # ---------------------------------------------------------------- running

    async def _run(self, flow: Callable[[_Reply], Any], session_id: str | None,
                   utterance_id: str | None, trigger_mono: float | None) -> ReplyResult:
        await self.cancel("superseded")
        rid = uuid.uuid4().hex
        cur = _Reply(rid, trigger_mono or time.monotonic(),
                     {"session_id": session_id, "utterance_id": utterance_id},
                     ReplyResult(rid, "done"))
        self._current = cur
        self._task = asyncio.create_task(self._guarded(cur, flow))
        try:
            return await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self._current is cur:
                await self.cancel("abandoned")  # our caller went away (HTTP client, shutdown)
            raise

    async def _guarded(self, cur: _Reply, flow: Callable[[_Reply], Any]) -> ReplyResult:
        res = cur.result
        try:
            await flow(cur)
            if cur.begun:
                await self._end_outputs(cur)
            res.audio_s = cur.audio_bytes / 2 / 16000
            if res.outcome != "error":
                self._event(cur, TtsFinished, audio_s=res.audio_s,
                            first_audio_ms=res.first_audio_ms, played=bool(cur.outs))
        except asyncio.CancelledError:
            res.outcome, res.cancel_reason = "cancelled", cur.cancel_reason or "cancelled"
            for out in cur.outs:
                out.abort()
            self._event(cur, ReplyCancelled, reason=res.cancel_reason)
        except AgentError as e:
            res.outcome, res.error = "error", e
            self._error(cur, e.stage, e.code, e.message)
            for out in cur.outs:
                out.abort()
        except Exception as e:  # a bug must not take the daemon's replies down for good
            log.exception("reply %s failed", cur.reply_id)
            res.outcome = "error"
            self._error(cur, "reply", "internal", str(e))
            for out in cur.outs:
                out.abort()
        finally:
            self._set_speaking(False)
        res.audio_s = cur.audio_bytes / 2 / 16000
        return res

    async def _reply_flow(self, cur: _Reply, prompt: str, conversation: str) -> None:
        if not prompt.strip():
            raise ReplyError("empty_prompt", "nothing to answer: the prompt is empty",
                             status=400)
        if self.llm is None:
            raise ReplyError("no_llm", "no LLM is configured for replies", status=503)
        self._event(cur, LlmStarted, model=self.llm.model, prompt=prompt)
        feed = _TextFeed()
        producer = asyncio.create_task(self._produce(cur, self.llm, prompt, conversation, feed))
        speaker = asyncio.create_task(self._speak(cur, feed))
        try:
            await asyncio.wait({producer})
            if cur.llm_failed and not feed.items:
                speaker.cancel()  # the cloud said nothing: do not wait on its TTS socket
            await asyncio.wait({speaker})
            if not speaker.cancelled():
                speaker.result()  # its error, if any
        finally:
            for t in (producer, speaker):
                t.cancel()
            # Unwinding closes the LLM response and the TTS socket: done before we return.
            await asyncio.wait({producer, speaker})
        if cur.llm_failed or cur.tts_broke:
            await self._notice(cur)

    async def _say_flow(self, cur: _Reply, text: str, local: bool) -> None:
        if not text.strip():
            raise ReplyError("empty_text", "nothing to say: the text is empty", status=400)
        feed = _TextFeed()
        chunker = self._chunker()
        for s in [*chunker.push(text), *chunker.flush()]:
            feed.put(s)
        feed.close()
        await self._speak(cur, feed, local=local)

    async def _produce(self, cur: _Reply, llm: LlmClient, prompt: str, conversation: str,
                       feed: _TextFeed) -> None:
        """LLM -> chunker -> feed, with the llm.* events; records a cloud failure."""
        chunker = self._chunker()
        conv = self.conversations.get(conversation)
        t_req, t_first, parts, finish = time.monotonic(), None, [], None
        try:
            async with contextlib.aclosing(llm.stream(prompt, conv.messages())) as deltas:
                async for d in deltas:
                    if d.text:
                        if t_first is None:
                            t_first = time.monotonic()
                            cur.result.first_text_ms = (t_first - cur.t0) * 1000
                        parts.append(d.text)
                        for s in chunker.push(d.text):
                            self._sentence(cur, feed, s)
                    finish = d.finish_reason or finish
            for s in chunker.flush():
                self._sentence(cur, feed, s)
            text = "".join(parts)
            cur.result.text = text
            self._event(cur, LlmDone, text=text, finish_reason=finish,
                        first_text_ms=None if t_first is None else (t_first - t_req) * 1000,
                        total_ms=(time.monotonic() - t_req) * 1000)
            conv.add(prompt, text)
        except CloudError as e:
            for s in chunker.flush():  # what arrived before the failure is still said
                self._sentence(cur, feed, s)
            cur.result.text = "".join(parts)
            cur.llm_failed = True
            self._unavailable(cur, "llm", e)
        except asyncio.CancelledError:
            if parts:  # barge-in: remember what the user heard the start of
                conv.add(prompt, "".join(parts))
            raise
        finally:
            feed.close()

    async def _speak(self, cur: _Reply, feed: _TextFeed, local: bool = False) -> None:
        """The feed through the cloud TTS; the local voice takes over if that fails."""
        tts = None if local else self.tts
        if tts is not None:
            try:
                await self._segment(cur, tts, feed.read())
                return
            except CloudError as e:
                self._unavailable(cur, "tts", e)
                if cur.audio_bytes or self.local_tts is None:
                    cur.tts_broke = True  # heard half a reply: _notice() says why it stopped
                    return
        if self.local_tts is None:
            raise ReplyError("no_tts", "no TTS backend is configured", status=503)
        await self._segment(cur, self.local_tts, feed.read())

    async def _notice(self, cur: _Reply) -> None:
        """The short local reply that says the cloud is gone."""
        if self.local_tts is not None and self.offline_text:
            await self._segment(cur, self.local_tts, aiter_texts([self.offline_text]))

    async def _segment(self, cur: _Reply, tts: Tts, texts: AsyncIterator[str]) -> None:
        started = False
        async with contextlib.aclosing(tts.synthesize(texts)) as pcm_stream:
            async for pcm in pcm_stream:
                if not started:  # at its first audio: a backend that failed first says nothing
                    started = True
                    cur.result.backends.append(tts.backend)
                    self._event(cur, TtsStarted, voice=tts.voice, backend=tts.backend,
                                sample_rate=tts.sample_rate)
                if not cur.begun:
                    await self._begin(cur, tts.sample_rate)
                cur.audio_bytes += len(pcm)
                for out in list(cur.outs):
                    try:
                        await out.write(pcm)
                    except AgentError as e:  # one broken output (a kiosk gone) stops only itself
                        self._drop_output(cur, out, e)

    # ---------------------------------------------------------------- helpers

    async def _begin(self, cur: _Reply, sample_rate: int) -> None:
        cur.begun = True
        cur.result.first_audio_ms = (time.monotonic() - cur.t0) * 1000
        cur.outs = list(self.outputs)
        self._set_speaking(True)
        for out in list(cur.outs):
            try:
                await out.begin(cur.reply_id, sample_rate)
            except AgentError as e:
                self._drop_output(cur, out, e)

    async def _end_outputs(self, cur: _Reply) -> None:
        for out in list(cur.outs):
            try:
                await out.end()
            except AgentError as e:
                self._drop_output(cur, out, e)

    def _drop_output(self, cur: _Reply, out: AudioOut, e: AgentError) -> None:
        log.warning("audio output %s failed: %s", out.name, e)
        cur.outs.remove(out)
        self._error(cur, e.stage, e.code, f"audio output {out.name}: {e.message}")

    def _sentence(self, cur: _Reply, feed: _TextFeed, text: str) -> None:
        cur.seq += 1
        self._event(cur, LlmText, text=text, seq=cur.seq)
        feed.put(text)

    def _unavailable(self, cur: _Reply, service: str, e: CloudError) -> None:
        cur.result.outcome = "degraded"
        log.warning("cloud %s unavailable: %s", service, e)
        self._event(cur, CloudUnavailable, service=service, code=e.code, message=e.message,
                    retry_in_s=e.retry_after_s)

    def _chunker(self) -> SentenceChunker:
        return SentenceChunker(self.chunk_min_weight, self.chunk_max_weight)

    def _event(self, cur: _Reply, cls: type, **fields: Any) -> None:
        self.emit(cls, reply_id=cur.reply_id, **cur.ids, **fields)

    def _error(self, cur: _Reply, stage: str, code: str, message: str) -> None:
        self.emit(ErrorEvent, stage=stage, code=code, message=message, reply_id=cur.reply_id,
                  **cur.ids)

    def _set_speaking(self, on: bool) -> None:
        if self.speaking != on:
            self.speaking = on
            if self.on_speaking is not None:
                self.on_speaking(on)
