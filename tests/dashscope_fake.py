"""A loopback DashScope: qwen text generation over SSE and CosyVoice's duplex TTS WebSocket.

Speaks the wire protocol the `dashscope` SDK speaks (tests run the SDK against it too), with
faults to inject per request: first-token and first-audio latency, HTTP 401/429/500, errors
inside the stream, malformed SSE, a connection cut mid-reply or mid-audio, a failed TTS task.
Audio is made from the text deterministically (`fake_pcm`: one tone per character), so a test
can check every byte that came out of the client. Timestamps (time.monotonic, comparable
across processes) of what it received and sent let tests and bench/reply.py tell the
server's share of a latency from the client's.

    python -m tests.dashscope_fake --first-token-s 0.2 --first-audio-s 0.15
prints {"http": ..., "ws": ..., "key": ...} and serves until killed; GET /_fake/log returns
the timestamps.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

RATE = 16000
GEN_PATH = "/api/v1/services/aigc/text-generation/generation"
WS_PATH = "/api-ws/v1/inference"


def fake_reply(prompt: str) -> str:
    """The reply the fake LLM gives to `prompt` when no text is scripted."""
    return (f"You said: {prompt.strip()}. This is the fake cloud answering. "
            "It speaks three sentences!")


def fake_pcm(text: str, rate: int = RATE) -> bytes:
    """s16le audio for `text`: 40 ms of a character-specific tone per visible character."""
    parts: list[np.ndarray] = []
    tone_n, fade = int(0.040 * rate), int(0.005 * rate)
    env = np.ones(tone_n)
    env[:fade] = np.linspace(0, 1, fade)
    env[-fade:] = np.linspace(1, 0, fade)
    t = np.arange(tone_n) / rate
    for ch in text:
        if ch.isspace():
            parts.append(np.zeros(int(0.020 * rate)))
        elif ch.isalnum() or ord(ch) > 0x2E80:
            f = 220.0 + (ord(ch) * 37) % 1600
            parts.append(0.3 * env * np.sin(2 * np.pi * f * t))
        else:  # punctuation: a pause
            parts.append(np.zeros(int(0.060 * rate)))
    if not parts:
        return b""
    return (np.concatenate(parts) * 32767).astype("<i2").tobytes()


@dataclass
class LlmScript:
    """How the fake answers one generation request."""

    text: str | None = None  # None: fake_reply(last user message)
    first_token_s: float = 0.0
    token_interval_s: float = 0.0
    token_chars: int = 4
    status: int | None = None  # answer with this HTTP error status instead
    error_format: str = "sse"  # "sse": event:error body; "json": a JSON body
    retry_after: str | None = None
    stream_error_status: int | None = None  # 200, one token, then event:error with this
    malformed_after: int | None = None  # garbage data: line after this many tokens
    drop_after: int | None = None  # cut the connection after this many tokens


@dataclass
class TtsScript:
    """How the fake answers one TTS WebSocket connection."""

    reject_status: int | None = None  # refuse the handshake with this status
    start_delay_s: float = 0.0  # run-task -> task-started
    first_audio_s: float = 0.0  # first continue-task -> first audio frame
    frame_bytes: int = 3200  # 100 ms at 16 kHz
    frame_interval_s: float = 0.0  # pause between frames (0: as fast as the socket goes)
    drop_after_bytes: int | None = None  # cut the connection after this much audio
    fail: bool = False  # task-failed after the first text


@dataclass
class LlmRecord:
    """What happened to one generation request (times: time.monotonic)."""

    body: dict[str, Any]
    headers: dict[str, str]
    t_received: float
    t_first_sent: float | None = None  # first token on the wire
    t_tokens: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    t_done: float | None = None
    t_disconnected: float | None = None  # the client went away before the end
    peer: str = ""  # the client's address:port (the same one twice = a kept-alive connection)


@dataclass
class TtsRecord:
    """What happened on one TTS connection."""

    headers: dict[str, str]
    t_connected: float
    run_task: dict[str, Any] | None = None
    texts: list[tuple[float, str]] = field(default_factory=list)
    t_first_audio: float | None = None
    audio_bytes: int = 0
    t_finish: float | None = None
    directive: str | None = None
    t_closed: float | None = None
    closed_by_client: bool = False


class FakeDashscope:
    """The server. `llm_plan` / `tts_plan` script the next requests; defaults after that."""

    def __init__(self, api_key: str = "sk-fake-test-key", host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.host = host
        self.llm_default = LlmScript()
        self.tts_default = TtsScript()
        self.llm_plan: collections.deque[LlmScript] = collections.deque()
        self.tts_plan: collections.deque[TtsScript] = collections.deque()
        self.llm_log: list[LlmRecord] = []
        self.tts_log: list[TtsRecord] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def http_base(self) -> str:
        """For `base_url` / `dashscope.base_http_api_url`."""
        return f"http://{self.host}:{self.port}/api/v1"

    @property
    def ws_url(self) -> str:
        """For `ws_url` / `dashscope.base_websocket_api_url`."""
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    async def start(self, port: int = 0) -> FakeDashscope:
        """Listen on loopback (`port` 0: any free one)."""
        app = web.Application()
        app.router.add_post(GEN_PATH, self._generation)
        app.router.add_get(WS_PATH, self._tts)
        app.router.add_get("/_fake/log", self._log)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDashscope:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- LLM

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _generation(self, request: web.Request) -> web.StreamResponse:
        rec = LlmRecord(body={}, headers=dict(request.headers), t_received=time.monotonic(),
                        peer=str(request.transport.get_extra_info("peername")
                                 if request.transport else ""))
        self.llm_log.append(rec)
        script = self.llm_plan.popleft() if self.llm_plan else self.llm_default
        request_id = uuid.uuid4().hex
        try:
            rec.body = await request.json()
        except ValueError:
            return _error(400, "InvalidParameter", "body is not JSON", request_id, "json")
        if not self._authorized(request):
            return _error(401, "InvalidApiKey", "Invalid API-key provided.", request_id,
                          script.error_format)
        if script.status is not None:
            return _error(script.status, _STATUS_CODES.get(script.status, "Error"),
                          f"fake {script.status}", request_id, script.error_format,
                          script.retry_after)
        messages = rec.body.get("input", {}).get("messages", [])
        prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        text = script.text if script.text is not None else fake_reply(prompt)
        tokens = [text[i:i + script.token_chars]
                  for i in range(0, len(text), script.token_chars)]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream;charset=UTF-8",
                                           "X-Request-Id": request_id})
        await resp.prepare(request)
        try:
            if not await _sleep_unless_gone(request, script.first_token_s):
                rec.t_disconnected = time.monotonic()
                return resp
            for n, tok in enumerate(tokens):
                if n and not await _sleep_unless_gone(request, script.token_interval_s):
                    rec.t_disconnected = time.monotonic()
                    return resp
                if script.drop_after is not None and n >= script.drop_after:
                    _cut(request)
                    return resp
                if script.malformed_after is not None and n >= script.malformed_after:
                    await resp.write(b'id:%d\nevent:result\n:HTTP_STATUS/200\n'
                                     b'data:{"output": {"choices": [\n\n' % (n + 1))
                    await resp.write_eof()
                    return resp
                if script.stream_error_status is not None and n >= 1:
                    body = {"code": _STATUS_CODES.get(script.stream_error_status, "Error"),
                            "message": "fake in-stream error", "request_id": request_id}
                    await resp.write(_sse(n + 1, "error", script.stream_error_status, body))
                    await resp.write_eof()
                    return resp
                await resp.write(_sse(n + 1, "result", 200, _chunk(tok, "null", request_id)))
                now = time.monotonic()
                rec.t_first_sent = rec.t_first_sent or now
                rec.t_tokens.append(now)
                rec.tokens.append(tok)
            await resp.write(_sse(len(tokens) + 1, "result", 200,
                                  _chunk("", "stop", request_id)))
            await resp.write_eof()
            rec.t_done = time.monotonic()
        except (ConnectionResetError, RuntimeError):  # the client left mid-write
            rec.t_disconnected = time.monotonic()
        return resp

    # ---------------------------------------------------------------- TTS

    async def _tts(self, request: web.Request) -> web.StreamResponse:
        script = self.tts_plan.popleft() if self.tts_plan else self.tts_default
        if not self._authorized(request):
            return web.json_response({"code": "InvalidApiKey", "message": "bad key"},
                                     status=401)
        if script.reject_status is not None:
            return web.json_response({"code": "Fake", "message": "refused"},
                                     status=script.reject_status)
        rec = TtsRecord(headers=dict(request.headers), t_connected=time.monotonic())
        self.tts_log.append(rec)
        ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        texts: asyncio.Queue[str | None] = asyncio.Queue()
        writer: asyncio.Task[None] | None = None
        task_id = ""
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                header, payload = frame["header"], frame.get("payload", {})
                action = header["action"]
                task_id = header.get("task_id", task_id)
                if action == "run-task":
                    rec.run_task = frame
                    await asyncio.sleep(script.start_delay_s)
                    await ws.send_str(_event(task_id, "task-started"))
                    writer = asyncio.create_task(
                        self._speak(request, ws, task_id, texts, script, rec))
                elif action == "continue-task":
                    text = payload.get("input", {}).get("text", "")
                    rec.texts.append((time.monotonic(), text))
                    if script.fail:
                        await ws.send_str(_event(task_id, "task-failed",
                                                 error_code="InvalidParameter",
                                                 error_message="fake task failure"))
                        continue
                    await texts.put(text)
                elif action == "finish-task":
                    rec.t_finish = time.monotonic()
                    rec.directive = payload.get("input", {}).get("directive")
                    if rec.directive == "cancel":
                        while not texts.empty():
                            texts.get_nowait()
                    await texts.put(None)
            rec.closed_by_client = True
        finally:
            rec.t_closed = time.monotonic()
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(BaseException):
                    await writer
        return ws

    async def _speak(self, request: web.Request, ws: web.WebSocketResponse, task_id: str,
                     texts: asyncio.Queue[str | None], script: TtsScript,
                     rec: TtsRecord) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):  # the client left
            await self._speak_all(request, ws, task_id, texts, script, rec)

    async def _speak_all(self, request: web.Request, ws: web.WebSocketResponse, task_id: str,
                         texts: asyncio.Queue[str | None], script: TtsScript,
                         rec: TtsRecord) -> None:
        first = True
        while (text := await texts.get()) is not None:
            if first:
                await asyncio.sleep(script.first_audio_s)
                first = False
            if rec.directive == "cancel":
                break
            params = (rec.run_task or {}).get("payload", {}).get("parameters", {})
            pcm = fake_pcm(text, int(params.get("sample_rate", RATE)))
            await ws.send_str(_event(task_id, "result-generated",
                                     output={"sentence": {"text": text}}))
            for i in range(0, len(pcm), script.frame_bytes):
                if script.drop_after_bytes is not None \
                        and rec.audio_bytes >= script.drop_after_bytes:
                    _cut(request)
                    return
                if i and script.frame_interval_s:
                    await asyncio.sleep(script.frame_interval_s)
                await ws.send_bytes(pcm[i:i + script.frame_bytes])
                rec.t_first_audio = rec.t_first_audio or time.monotonic()
                rec.audio_bytes += len(pcm[i:i + script.frame_bytes])
        await ws.send_str(_event(task_id, "task-finished", output={},
                                 usage={"characters": sum(len(t) for _, t in rec.texts)}))

    async def _log(self, request: web.Request) -> web.Response:
        return web.json_response({"llm": [asdict(r) for r in self.llm_log],
                                  "tts": [asdict(r) for r in self.tts_log]})


_STATUS_CODES = {400: "InvalidParameter", 401: "InvalidApiKey", 429: "Throttling.RateQuota",
                 500: "InternalError", 503: "ServiceUnavailable"}


def _sse(n: int, event: str, status: int, body: dict[str, Any]) -> bytes:
    return (f"id:{n}\nevent:{event}\n:HTTP_STATUS/{status}\n"
            f"data:{json.dumps(body, ensure_ascii=False)}\n\n").encode()


def _chunk(text: str, finish: str, request_id: str) -> dict[str, Any]:
    return {"output": {"choices": [{"message": {"content": text, "role": "assistant"},
                                    "finish_reason": finish}]},
            "usage": {"total_tokens": 1, "output_tokens": 1, "input_tokens": 1},
            "request_id": request_id}


def _error(status: int, code: str, message: str, request_id: str, fmt: str,
           retry_after: str | None = None) -> web.Response:
    body = {"code": code, "message": message, "request_id": request_id}
    headers = {"Retry-After": retry_after} if retry_after else {}
    if fmt == "json":
        return web.json_response(body, status=status, headers=headers)
    return web.Response(body=_sse(1, "error", status, body), status=status,
                        content_type="text/event-stream", headers=headers)


def _event(task_id: str, event: str, **payload: Any) -> str:
    header: dict[str, Any] = {"task_id": task_id, "event": event, "attributes": {}}
    for k in ("error_code", "error_message"):
        if k in payload:
            header[k] = payload.pop(k)
    return json.dumps({"header": header, "payload": payload})


async def until(pred: Callable[[], object], within_s: float = 5.0, step: float = 0.005
                ) -> bool:
    """Poll `pred` (state another task or process changes) until true or `within_s` passed."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(step)
    return bool(pred())


def _cut(request: web.Request) -> None:
    """Drop the TCP connection without a goodbye (a network failure, not a clean close)."""
    if request.transport is not None:
        request.transport.abort()


async def _sleep_unless_gone(request: web.Request, seconds: float) -> bool:
    """Sleep; False as soon as the client has disconnected."""
    end = time.monotonic() + seconds
    while True:
        tr = request.transport
        if tr is None or tr.is_closing():
            return False
        left = end - time.monotonic()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, 0.002))


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeDashscope(api_key=args.key)
    fake.llm_default = LlmScript(first_token_s=args.first_token_s,
                                 token_interval_s=args.token_interval_s)
    fake.tts_default = TtsScript(first_audio_s=args.first_audio_s,
                                 frame_interval_s=args.frame_interval_s)
    await fake.start(args.port)
    print(json.dumps({"http": fake.http_base, "ws": fake.ws_url, "key": fake.api_key}),
          flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone (bench/reply.py runs it in its own process)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--key", default="sk-fake-test-key")
    ap.add_argument("--first-token-s", type=float, default=0.0)
    ap.add_argument("--token-interval-s", type=float, default=0.0)
    ap.add_argument("--first-audio-s", type=float, default=0.0)
    ap.add_argument("--frame-interval-s", type=float, default=0.0)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
