"""`/ws/asr`: a client streams its own audio and gets partial and final recognition back.

FunASR-style protocol: `{"type": "control", "command": "start|stop|reset"}`, audio as
`{"type": "audio", "data": "<base64 s16le>"}` or binary frames; answers are `status`,
`result` (mode partial|final) and `error` messages. One ASR session per connection, one
utterance at a time; audio without a `start` starts an utterance implicitly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from typing import Any

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from agent.api.context import CTX, ApiContext
from agent.api.errors import ApiError
from agent.asr.base import AsrEngine, AsrSession, Transcript, has_words
from agent.audio.convert import Resampler, float_to_int16
from agent.config import WebrtcVadConfig
from agent.constants import CAPTURE_RATES, PIPELINE_RATE
from agent.gate import new_id
from agent.vad.webrtc import WebrtcVad

log = logging.getLogger(__name__)

PARTIAL_MIN_S = 0.3  # shorter audio decodes to nothing useful
# A partial that heard the speech up to this long past its last voiced frame can be the final;
# this much silence after speech also triggers a partial at once (the user has stopped talking).
SPEECH_MARGIN_S = 0.15
MARGIN = int(SPEECH_MARGIN_S * PIPELINE_RATE)


class SpeechEnd:
    """Where speech was last heard in a stream (lenient webrtc VAD, microseconds a frame)."""

    def __init__(self) -> None:
        self._vad = WebrtcVad(WebrtcVadConfig(aggressiveness=1, frame_ms=30))
        self._frame = self._vad.frame_samples
        self._buf = np.zeros(0, np.int16)
        self._pos = 0
        self.end = 0  # sample index just past the last voiced frame

    def push(self, x: np.ndarray) -> None:
        """Follow float32 16 kHz samples."""
        buf = np.concatenate([self._buf, float_to_int16(x)])
        n = len(buf) // self._frame
        for i in range(n):
            if self._vad.is_speech(buf[i * self._frame:(i + 1) * self._frame]):
                self.end = self._pos + (i + 1) * self._frame
        self._pos += n * self._frame
        self._buf = buf[n * self._frame:]


def _consume(fut: asyncio.Future[str]) -> None:
    """A decode nobody waits for any more: its error (a closing pool) is not news."""
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("abandoned partial decode failed: %s", fut.exception())


class Utterance:
    """The audio of one start..stop, with its engine session and partial ticker."""

    def __init__(self, session: AsrSession, rate: int, partials: bool) -> None:
        self.id = new_id()
        self.session = session
        self.resampler = Resampler(rate) if rate != PIPELINE_RATE else None
        self.partials = partials
        self.fed = asyncio.Event()
        self.seq = 0
        self.last_partial = ""
        self.ticker: asyncio.Task[None] | None = None
        self.closed = False
        self.speech = SpeechEnd()
        # The newest partial decode: samples it covers, and its text (or its future).
        self.heard: tuple[int, str] = (0, "")
        self.inflight: tuple[int, asyncio.Future[str]] | None = None
        self.decoded_to = 0  # samples the newest partial decode (started) covers
        self.endpoint = asyncio.Event()  # speech just ended: decode now, not at the interval


class AsrConnection:
    """Protocol state of one `/ws/asr` client."""

    def __init__(self, ctx: ApiContext, ws: web.WebSocketResponse, engine: AsrEngine,
                 peer: str) -> None:
        self.ctx = ctx
        self.ws = ws
        self.engine = engine
        self.peer = peer
        self.id = new_id()
        self.utt: Utterance | None = None
        # What `start` asked for last; utterances started implicitly by audio reuse it.
        self.rate = PIPELINE_RATE
        self.partials = ctx.cfg.asr_partials
        self.max_samples = int(ctx.cfg.asr_max_utterance_s * PIPELINE_RATE)
        self.interval = ctx.cfg.asr_partial_interval_ms / 1000

    async def send(self, payload: dict[str, Any]) -> None:
        """Send one JSON message (a closed socket is not an error here)."""
        if self.ws.closed:
            return
        timeout = self.ctx.cfg.ws_send_timeout_s
        try:
            await asyncio.wait_for(self.ws.send_str(json.dumps(payload)), timeout)
        except ConnectionError:
            pass
        except TimeoutError:
            # A client that does not read its results must not hold a session forever.
            log.warning("dropping /ws/asr client %s: a send blocked for %g s", self.peer, timeout)
            self.ctx.metrics.ws_dropped.inc(endpoint="asr", reason="slow_client")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code=WSCloseCode.POLICY_VIOLATION,
                                                     message=b"slow_client"), 1.0)

    async def error(self, code: str, message: str) -> None:
        """A protocol error; the connection stays open."""
        await self.send({"type": "error", "code": code, "message": message})

    async def status(self, status: str, **extra: Any) -> None:
        """A status message."""
        await self.send({"type": "status", "status": status, "session_id": self.id, **extra})

    # ---- client messages ----------------------------------------------------------------

    async def on_text(self, text: str) -> None:
        """A JSON message: control or base64 audio."""
        try:
            msg = json.loads(text)
        except ValueError as e:
            await self.error("bad_json", f"message is not JSON: {e}")
            return
        if not isinstance(msg, dict):
            await self.error("bad_message", "expected a JSON object with a `type`")
            return
        kind = msg.get("type")
        if kind == "audio":
            data = msg.get("data")
            if not isinstance(data, str):
                await self.error("bad_message", "audio message needs `data`: base64 s16le PCM")
                return
            try:
                pcm = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                await self.error("bad_base64", f"audio data is not valid base64: {e}")
                return
            await self.on_audio(pcm)
        elif kind == "control":
            await self.on_control(msg)
        else:
            await self.error("bad_message", f"unknown message type {kind!r}: expected "
                                            "control or audio")

    async def on_control(self, msg: dict[str, Any]) -> None:
        """start (optionally `sample_rate`, `partials`), stop or reset."""
        cmd = msg.get("command")
        if cmd == "start":
            rate = msg.get("sample_rate", PIPELINE_RATE)
            if type(rate) is not int or rate not in CAPTURE_RATES:
                await self.error("bad_sample_rate", f"sample_rate must be one of "
                                 f"{', '.join(map(str, CAPTURE_RATES))} (got {rate!r})")
                return
            partials = msg.get("partials", self.ctx.cfg.asr_partials)
            if not isinstance(partials, bool):
                await self.error("bad_message", "partials must be true or false")
                return
            if self.utt is not None:
                # A second start without stop: the first utterance is finished, not lost.
                await self.finish("restart")
            self.rate, self.partials = rate, partials
            await self.begin(rate, partials)
        elif cmd == "stop":
            if self.utt is None:
                await self.error("not_started", "stop without start: nothing to recognise")
                return
            await self.finish("stop")
        elif cmd == "reset":
            self.abandon()
            await self.status("reset")
        else:
            await self.error("unknown_command",
                             f"unknown command {cmd!r}; expected start, stop or reset")

    async def on_audio(self, pcm: bytes) -> None:
        """s16le mono PCM at the utterance's rate (16 kHz unless `start` said otherwise)."""
        if len(pcm) % 2:
            await self.error("bad_audio", f"PCM must hold whole 16-bit samples (got {len(pcm)} "
                                          "bytes)")
            return
        if not pcm:
            return
        if self.utt is None:
            await self.begin(self.rate, self.partials, implicit=True)
        utt = self.utt
        assert utt is not None
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        if utt.resampler is not None:
            x = utt.resampler.process(x)
        while len(x):
            room = self.max_samples - utt.session.fed_samples
            await self.feed(utt, x[:room])
            x = x[room:]
            if utt.session.fed_samples >= self.max_samples:
                # Whisper sees 30 s at most: finish here and go on with a new utterance
                # (`x` is at 16 kHz already; later audio still comes at the client's rate).
                await self.finish("max_length")
                if len(x):
                    await self.begin(self.rate, self.partials, implicit=True)
                    assert self.utt is not None
                    utt = self.utt

    # ---- utterances -----------------------------------------------------------------------

    async def begin(self, rate: int, partials: bool, implicit: bool = False) -> None:
        """Open a new utterance."""
        utt = Utterance(self.engine.session(), rate, partials)
        self.utt = utt
        if partials and not utt.session.streaming:
            utt.ticker = asyncio.create_task(self._partials(utt), name=f"ws-asr-partial:{utt.id}")
        await self.status("started", utterance_id=utt.id, sample_rate=rate, partials=partials,
                          implicit=implicit)

    async def feed(self, utt: Utterance, x: np.ndarray) -> None:
        """Hand samples to the engine session."""
        if not len(x):
            return
        if utt.session.streaming:
            # Streaming engines decode in feed(): a worker thread, and never skipped.
            text = await self.ctx.pool.final(utt.session.feed, x)
            if utt.partials and text:
                await self._send_partial(utt, text, None, utt.session.fed_samples)
        else:
            utt.session.feed(x)  # offline sessions only buffer: cheap enough for the loop
            if utt.partials and self.ctx.cfg.asr_final_from_partial:
                utt.speech.push(x)
                end, fed = utt.speech.end, utt.session.fed_samples
                if end and fed - end >= MARGIN and utt.decoded_to < end + MARGIN:
                    utt.endpoint.set()
            utt.fed.set()

    async def _partials(self, utt: Utterance) -> None:
        """Re-decode the growing buffer every interval; at most one decode in flight."""
        done_at = 0
        while not utt.closed:
            await utt.fed.wait()
            utt.fed.clear()
            n = utt.session.fed_samples
            if n < PARTIAL_MIN_S * PIPELINE_RATE or n == done_at:
                continue
            t0 = time.monotonic()
            utt.decoded_to = n

            def running(fut: asyncio.Future[str], n: int = n) -> None:
                # At stop, a decode already running may still become the final.
                fut.add_done_callback(_consume)
                utt.inflight = (n, fut)

            text = await self.ctx.pool.partial(utt.session.partial, running)
            utt.inflight = None
            took = time.monotonic() - t0
            if text is None:  # skipped: a final is waiting somewhere
                utt.fed.set()
            else:
                done_at = n
                utt.heard = (n, text)
                self.ctx.metrics.latency.observe(took, stage="ws_asr_partial_decode")
                if not utt.closed and text:
                    await self._send_partial(utt, text, took, n)
            # Wait out the interval, unless the speech just ended: a partial over the whole
            # utterance, ready before the user lets go, is a final with no wait.
            rest = self.interval - (time.monotonic() - t0)
            if rest > 0 and text is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(utt.endpoint.wait(), rest)
            elif rest > 0:
                await asyncio.sleep(rest)
            utt.endpoint.clear()

    async def _send_partial(self, utt: Utterance, text: str, took: float | None,
                            heard: int) -> None:
        if text == utt.last_partial:
            return
        utt.last_partial = text
        utt.seq += 1
        self.ctx.metrics.ws_results.inc(mode="partial")
        await self.send({"type": "result", "mode": "partial", "text": text, "seq": utt.seq,
                         "utterance_id": utt.id,
                         "audio_s": round(heard / PIPELINE_RATE, 3),  # what it decoded
                         "processing_time_ms": round(1000 * took, 1) if took else None})

    async def _stop_ticker(self, utt: Utterance) -> None:
        utt.closed = True
        if utt.ticker is not None:
            # A partial decode already running finishes in its thread; its text is dropped.
            utt.ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await utt.ticker

    async def finish(self, reason: str) -> None:
        """Final decode of the current utterance; sends `stopped`, then the final result."""
        utt = self.utt
        if utt is None:
            return
        self.utt = None
        t_stop = time.monotonic()
        await self._stop_ticker(utt)
        if utt.resampler is not None:
            tail = utt.resampler.process(np.zeros(0, np.float32), last=True)
            room = self.max_samples - utt.session.fed_samples
            if len(tail) and room > 0:
                await self.feed(utt, tail[:room])
        await self.status("stopped", utterance_id=utt.id, reason=reason)
        t0 = time.monotonic()
        result = await self._from_partial(utt)
        if result is None:
            # The engine itself reuses a partial that decoded exactly all the audio.
            result = await self.ctx.pool.final(utt.session.finish)
        now = time.monotonic()
        m = self.ctx.metrics
        m.latency.observe(now - t0, stage="ws_asr_decode")
        m.latency.observe(now - t_stop, stage="ws_asr_final")
        m.ws_results.inc(mode="final")
        await self.send({
            "type": "result", "mode": "final", "text": result.text, "language": result.language,
            "model": self.engine.model_id, "utterance_id": utt.id, "reason": reason,
            "audio_s": round(utt.session.fed_samples / PIPELINE_RATE, 3), "partials": utt.seq,
            "processing_time_ms": round(1000 * (now - t0), 1),
            "latency_ms": round(1000 * (now - t_stop), 1), "from_partial": result.reused,
        })

    async def _from_partial(self, utt: Utterance) -> Transcript | None:
        """The newest partial's text when it already heard all the speech, else None.

        After the last word a push-to-talk user holds on a moment; a partial decoded (or
        decoding) over that silence is what a final decode would say, so the client gets it
        at once instead of after another full decode. Anything voiced after it, or any doubt,
        means a real final decode.
        """
        if not (utt.partials and self.ctx.cfg.asr_final_from_partial) or utt.session.streaming:
            return None
        fed = utt.session.fed_samples
        need = min(fed, utt.speech.end + MARGIN)
        if utt.speech.end == 0:
            return None
        text: str | None = None
        if utt.heard[0] >= need and utt.heard[1]:
            text = utt.heard[1]
        elif utt.inflight is not None and utt.inflight[0] >= need:
            text = await utt.inflight[1]
        if text is None or not has_words(text):
            return None  # "[BLANK_AUDIO]" and the like: let a real decode have its say
        return Transcript(text, self.engine.language, reused=True)

    def abandon(self) -> None:
        """Drop the current utterance without a result."""
        utt, self.utt = self.utt, None
        if utt is not None:
            utt.closed = True
            if utt.ticker is not None:
                utt.ticker.cancel()


async def _refuse(ws: web.WebSocketResponse, code: str, message: str) -> web.WebSocketResponse:
    with contextlib.suppress(Exception):
        await ws.send_str(json.dumps({"type": "error", "code": code, "message": message}))
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=code.encode())
    return ws


async def asr_ws(request: web.Request) -> web.StreamResponse:
    """`GET /ws/asr` (WebSocket upgrade)."""
    ctx = request.app[CTX]
    cfg = ctx.cfg
    ws = web.WebSocketResponse(heartbeat=cfg.ws_heartbeat_s, compress=False,
                               max_msg_size=min(int(cfg.max_body_mb * 2**20), 16 * 2**20))
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "not_websocket", "this is a WebSocket endpoint: connect with an "
                                             "Upgrade: websocket request")
    await ws.prepare(request)
    peer = request.remote or "?"
    engine = ctx.daemon.asr_engine
    if engine is None:
        ctx.metrics.ws_rejected.inc(reason="asr_unavailable")
        return await _refuse(ws, "asr_unavailable", "no ASR model is loaded (asr.enabled is "
                             "false, the model failed to load, or the daemon is starting)")
    if ctx.asr_sessions >= cfg.max_asr_sessions:
        ctx.metrics.ws_rejected.inc(reason="too_many_sessions")
        log.warning("/ws/asr client %s refused: %d sessions open", peer, ctx.asr_sessions)
        return await _refuse(ws, "too_many_sessions",
                             f"all {cfg.max_asr_sessions} ASR sessions are in use "
                             "(api.max_asr_sessions); try again later")
    ctx.asr_sessions += 1
    ctx.sockets["asr"].add(ws)
    conn = AsrConnection(ctx, ws, engine, peer)
    log.info("/ws/asr client %s connected (session %s)", peer, conn.id)
    try:
        await conn.status("ready", model=engine.model_id, sample_rate=PIPELINE_RATE,
                          partials=cfg.asr_partials, max_utterance_s=cfg.asr_max_utterance_s)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await conn.on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await conn.on_audio(msg.data)
    finally:
        conn.abandon()
        ctx.asr_sessions -= 1
        ctx.sockets["asr"].discard(ws)
        log.info("/ws/asr client %s left", peer)
    return ws


def setup(app: web.Application) -> None:
    """Register the route."""
    app.router.add_get("/ws/asr", asr_ws, name="ws_asr")
