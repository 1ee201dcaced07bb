"""CosyVoice streaming TTS: a native aiohttp client of DashScope's duplex WebSocket protocol.

The protocol is the one `dashscope.audio.tts_v2.SpeechSynthesizer` speaks (`streaming_call` /
`streaming_complete`): the client sends `run-task`, waits for `task-started`, sends each text
chunk as `continue-task` and ends with `finish-task`; the server sends `result-generated`
events and binary PCM frames, then `task-finished` (or `task-failed`). The SDK runs all this on
a websocket-client thread with blocking waits of up to 15 s; here it is one coroutine whose
cancellation closes the socket at once, with a deadline on every wait.

The socket is opened when synthesis starts, before the first text exists, so the TLS and
WebSocket handshakes overlap the LLM's time to first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from pydantic import SecretStr

from agent import jsonsafe
from agent.constants import PIPELINE_RATE
from agent.errors import CloudError
from agent.jsonsafe import BadJson
from agent.reply import cloud
from agent.reply.tts import EvenBytes, PcmResampler, Tts

log = logging.getLogger(__name__)

PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)  # what CosyVoice's "pcm" format offers
_POLL_S = 0.5  # receive slice while no text is in flight (nothing can be late then)


@dataclass
class _Flow:
    """Shared between the sender and the receiver of one task."""

    loop: asyncio.AbstractEventLoop
    last_activity: float = 0.0  # text sent or audio received, loop time
    texts_sent: int = 0
    finish_sent: bool = False
    audio_bytes: int = 0
    sender_error: BaseException | None = None


class CosyVoiceTts(Tts):
    """Streaming text in, 16 kHz PCM out, over one WebSocket task per reply."""

    backend = "cosyvoice"

    def __init__(
        self,
        *,
        api_key: SecretStr | str | None = None,
        ws_url: str | None = None,
        model: str = "cosyvoice-v2",
        voice: str = "longxiaochun_v2",
        request_rate: int = PIPELINE_RATE,
        volume: int = 50,
        speech_rate: float = 1.0,
        pitch_rate: float = 1.0,
        connect_timeout_s: float = 5.0,
        first_audio_timeout_s: float = 8.0,
        idle_timeout_s: float = 10.0,
        retries: int = 2,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 2.0,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        if request_rate not in PCM_RATES:
            raise ValueError(f"request_rate must be one of {PCM_RATES}")
        self._api_key = api_key
        self.ws_url = ws_url or cloud.DEFAULT_WS_BASE
        self.model = model
        self.voice = voice
        self.request_rate = request_rate
        self.volume = volume
        self.speech_rate = speech_rate
        self.pitch_rate = pitch_rate
        self.connect_timeout_s = connect_timeout_s
        self.first_audio_timeout_s = first_audio_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.retries = retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.parameters = dict(parameters or {})
        self.connects = 0  # WebSocket handshakes tried, retries included
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the key
        return f"CosyVoiceTts(model={self.model!r}, voice={self.voice!r}, url={self.ws_url!r})"

    async def synthesize(self, text_chunks: AsyncIterator[str]) -> AsyncGenerator[bytes, None]:
        """PCM for the streamed text; CloudError on failure, a drop or a missed deadline."""
        key = cloud.api_key(self._api_key)
        task_id = uuid.uuid4().hex
        ws = await self._start(key, task_id)
        flow = _Flow(asyncio.get_running_loop())
        flow.last_activity = flow.loop.time()
        sender = asyncio.create_task(self._send(ws, task_id, text_chunks, flow))
        clean = False
        even = EvenBytes()
        resample = None if self.request_rate == PIPELINE_RATE else PcmResampler(self.request_rate)
        try:
            while True:
                msg = await self._receive(ws, flow)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    flow.audio_bytes += len(msg.data)
                    flow.last_activity = flow.loop.time()
                    pcm = even.push(msg.data)
                    if resample is not None and pcm:
                        pcm = resample.process(np.frombuffer(pcm, "<i2") / 32768.0)
                    if pcm:
                        yield pcm
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    flow.last_activity = flow.loop.time()
                    if self._on_event(msg.data, task_id) == "task-finished":
                        clean = True
                        break
                else:  # CLOSE, CLOSING, CLOSED, ERROR before task-finished
                    if flow.sender_error is not None:
                        raise flow.sender_error
                    raise CloudError(
                        "dropped", f"CosyVoice connection closed mid-task after "
                        f"{flow.audio_bytes / (2 * self.request_rate):.2f} s of audio "
                        f"({msg.type.name}{f': {msg.extra}' if msg.extra else ''})")
            if resample is not None:
                tail = resample.process(np.zeros(0, np.float32), last=True)
                if tail:
                    yield tail
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            await self._close(ws, task_id, clean)

    async def _start(self, key: str, task_id: str) -> aiohttp.ClientWebSocketResponse:
        """Connect and run the task (retried with backoff: nothing was sent yet)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        attempt = 0
        while True:
            ws: aiohttp.ClientWebSocketResponse | None = None
            try:
                ws = await self._connect(key, deadline)
                await ws.send_str(self._run_task(task_id))
                while True:
                    msg = await _receive_until(ws, deadline)
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        if self._on_event(msg.data, task_id) == "task-started":
                            return ws
                    elif msg.type != aiohttp.WSMsgType.BINARY:
                        raise CloudError("dropped", "CosyVoice closed the connection before "
                                         "the task started")
            except TimeoutError:
                await _abort(ws)
                raise CloudError("timeout", f"CosyVoice task not started within "
                                 f"{self.connect_timeout_s:g} s", status=504) from None
            except BaseException as e:
                await _abort(ws)
                if not isinstance(e, CloudError) or e.code not in cloud.RETRYABLE \
                        or attempt >= self.retries:
                    raise
                delay = max(e.retry_after_s or 0.0, cloud.backoff_delay(
                    attempt, self.backoff_initial_s, self.backoff_max_s))
                if loop.time() + delay >= deadline:
                    raise
                log.info("TTS %s (%s); retry %d in %.2f s", e.code, e.message, attempt + 1,
                         delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _connect(self, key: str, deadline: float) -> aiohttp.ClientWebSocketResponse:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        self.connects += 1
        try:
            async with asyncio.timeout_at(deadline):
                return await self._session.ws_connect(
                    self.ws_url, headers=cloud.auth_headers(key), heartbeat=None,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0),
                    max_msg_size=16 * 1024 * 1024,
                )
        except aiohttp.WSServerHandshakeError as e:
            retry_after = e.headers.get("Retry-After") if e.headers else None
            raise cloud.status_error(e.status, e.message, "TTS", retry_after) from None
        except aiohttp.ClientError as e:
            raise CloudError("unreachable", f"CosyVoice unreachable: {e}") from None

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, task_id: str,
                    text_chunks: AsyncIterator[str], flow: _Flow) -> None:
        """continue-task per chunk, then finish-task; a failure closes the socket."""
        try:
            async for text in text_chunks:
                if not text.strip():
                    continue
                await ws.send_str(self._frame(task_id, "continue-task", {"text": text}))
                flow.texts_sent += 1
                flow.last_activity = flow.loop.time()
            await ws.send_str(self._frame(task_id, "finish-task", {}))
            flow.finish_sent = True
            flow.last_activity = flow.loop.time()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the text source failed: end the task with its error
            flow.sender_error = e
            await ws.close()

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse, flow: _Flow
                       ) -> aiohttp.WSMessage:
        """The next message; CloudError `timeout` when text waits too long for audio."""
        while True:
            waiting = flow.texts_sent > 0 or flow.finish_sent
            limit = self.first_audio_timeout_s if flow.audio_bytes == 0 else self.idle_timeout_s
            remaining = flow.last_activity + limit - flow.loop.time() if waiting else _POLL_S
            if waiting and remaining <= 0:
                raise CloudError(
                    "timeout", f"CosyVoice sent no audio for {limit:g} s "
                    f"({'before the first audio' if flow.audio_bytes == 0 else 'mid-reply'})",
                    status=504)
            try:
                return await ws.receive(timeout=min(remaining, _POLL_S))
            except TimeoutError:
                continue

    def _on_event(self, data: str, task_id: str) -> str:
        """The event name of a server JSON frame; raises CloudError on task-failed."""
        try:
            header = jsonsafe.loads(data, max_bytes=len(data.encode()) + 1)["header"]
            event = str(header["event"])
        except (BadJson, KeyError, TypeError):
            raise CloudError("bad_response", f"malformed CosyVoice event: {data[:120]!r}"
                             ) from None
        if event == "task-failed":
            code = header.get("error_code") or "TaskFailed"
            message = header.get("error_message") or ""
            ours = "rate_limited" if "throttl" in f"{code}{message}".lower() else "task_failed"
            raise CloudError(ours, f"CosyVoice task {task_id} failed: {code}: {message}")
        return event

    def _run_task(self, task_id: str) -> str:
        params = {
            "voice": self.voice, "volume": self.volume, "text_type": "PlainText",
            "sample_rate": self.request_rate, "rate": self.speech_rate, "format": "pcm",
            "pitch": self.pitch_rate, **self.parameters,
        }
        payload = {"model": self.model, "task_group": "audio", "task": "tts",
                   "function": "SpeechSynthesizer", "input": {}, "parameters": params}
        return json.dumps({"header": {"action": "run-task", "task_id": task_id,
                                      "streaming": "duplex"}, "payload": payload})

    def _frame(self, task_id: str, action: str, text_input: dict[str, Any]) -> str:
        payload: dict[str, Any] = {"input": text_input}
        if action == "continue-task":
            payload = {"model": self.model, "task_group": "audio", "task": "tts",
                       "function": "SpeechSynthesizer", **payload}
        return json.dumps({"header": {"action": action, "task_id": task_id,
                                      "streaming": "duplex"}, "payload": payload},
                          ensure_ascii=False)

    async def _close(self, ws: aiohttp.ClientWebSocketResponse, task_id: str,
                     clean: bool) -> None:
        """Clean: the normal close handshake. Otherwise tell the server to stop, and go."""
        if clean:
            with contextlib.suppress(Exception):
                await ws.close()
            return
        with contextlib.suppress(Exception):
            await ws.send_str(self._frame(task_id, "finish-task", {"directive": "cancel"}))
        await _abort(ws)

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _receive_until(ws: aiohttp.ClientWebSocketResponse, deadline: float
                         ) -> aiohttp.WSMessage:
    loop = asyncio.get_running_loop()
    remaining = deadline - loop.time()
    if remaining <= 0:
        raise TimeoutError
    return await ws.receive(timeout=remaining)


async def _abort(ws: aiohttp.ClientWebSocketResponse | None) -> None:
    """Close without waiting for the server's close frame (barge-in must not wait on it)."""
    if ws is None or ws.closed:
        return
    with contextlib.suppress(Exception):  # TimeoutError included; never a cancellation
        await asyncio.wait_for(ws.close(), 0.05)
