"""`/ws/asr`: a client streams its own audio and gets partial and final recognition back.

FunASR-style protocol: `{"type": "control", "command": "start|stop|reset"}`, audio as
`{"type": "audio", "data": "<base64 s16le>"}` or binary frames; answers are `status`,
`result` (mode partial|final) and `error` messages. One utterance at a time per connection;
audio without a `start` starts one implicitly. Recognition is the daemon's own recognition
stream on the daemon-wide decode runner, exactly as for live utterances.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from aiohttp import web

from agent.api.context import ApiContext
from agent.api.ws_audio import AudioSocket, refuse, upgrade
from agent.app import emotion as emotion_app
from agent.asr.base import AsrEngine
from agent.asr.schedule import StreamParams
from agent.asr.stream import RecognitionStream
from agent.audio.convert import Resampler
from agent.constants import CAPTURE_RATES, PIPELINE_RATE
from agent.pipeline.gate import new_id

log = logging.getLogger(__name__)


class Utterance:
    """One start..stop: its recognition stream, resampler and partial forwarder."""

    def __init__(self, stream: RecognitionStream, rate: int) -> None:
        self.id = new_id()
        self.stream = stream
        self.resampler = Resampler(rate) if rate != PIPELINE_RATE else None
        self.forwarder: asyncio.Task[None] | None = None
        self.sent = 0  # partials sent: once `stopped` went out, only the final follows
        self.stopped = False


class AsrConnection(AudioSocket):
    """Protocol state of one `/ws/asr` client."""

    endpoint = "asr"
    not_an_object = "bad_message"

    def __init__(self, ctx: ApiContext, ws: web.WebSocketResponse, engine: AsrEngine,
                 peer: str) -> None:
        super().__init__(ctx, ws, peer)
        self.engine = engine
        self.utt: Utterance | None = None
        # What `start` asked for last; utterances started implicitly by audio reuse it.
        self.rate = PIPELINE_RATE
        self.partials = ctx.cfg.asr_partials
        self.max_samples = int(ctx.cfg.asr_max_utterance_s * PIPELINE_RATE)
        self._background: set[asyncio.Task[object]] = set()

    def params(self, partials: bool) -> StreamParams:
        """The recognition stream's settings for this connection."""
        cfg, asr, d = self.ctx.cfg, self.ctx.app.cfg.asr, StreamParams()
        # A streaming engine's config has no segment settings (it has no segments).
        return StreamParams(partials=partials, interval_s=cfg.asr_partial_interval_ms / 1000,
                            reuse=cfg.asr_final_from_partial,
                            segments=getattr(asr, "segments", d.segments),
                            pause_s=getattr(asr, "segment_pause_ms", d.pause_s * 1000) / 1000,
                            min_segment_s=getattr(asr, "segment_min_s", d.min_segment_s))

    async def on_control(self, msg: dict[str, Any]) -> None:
        """start (optionally `sample_rate`, `partials`), stop or reset."""
        cmd = msg.get("command")
        if cmd == "start":
            rate = msg.get("sample_rate", PIPELINE_RATE)
            if type(rate) is not int or rate not in CAPTURE_RATES:
                await self.error("bad_sample_rate", f"sample_rate must be one of "
                                 f"{', '.join(map(str, CAPTURE_RATES))} (got {str(rate)[:20]})")
                return
            partials = msg.get("partials", self.ctx.cfg.asr_partials)
            if not isinstance(partials, bool):
                await self.error("bad_message", "partials must be true or false")
                return
            if self.utt is not None:
                # A second start without stop: the first utterance is finished, not lost.
                await self.finish("restart")
            self.rate, self.partials = rate, partials
            await self.begin()
        elif cmd == "stop":
            if self.utt is None:
                await self.error("not_started", "stop without start: nothing to recognise")
                return
            await self.finish("stop")
        elif cmd == "reset":
            self.abandon()
            await self.status("reset")
        else:
            await self.error("unknown_command", f"unknown command {str(cmd)[:40]!r}; expected "
                                                "start, stop or reset")

    async def on_audio(self, pcm: bytes) -> None:
        """s16le mono PCM at the utterance's rate (16 kHz unless `start` said otherwise)."""
        if len(pcm) % 2:
            await self.error("bad_audio", f"PCM must hold whole 16-bit samples (got {len(pcm)} "
                                          "bytes)")
            return
        if not pcm:
            return
        if self.utt is None:
            await self.begin(implicit=True)
        utt = self.utt
        assert utt is not None
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        if utt.resampler is not None:
            x = utt.resampler.process(x)
        while len(x):
            room = self.max_samples - utt.stream.fed_samples
            utt.stream.feed(x[:room])
            x = x[room:]
            if utt.stream.fed_samples >= self.max_samples:
                # Whisper sees 30 s at most: finish here and go on with a new utterance
                # (`x` is at 16 kHz already; later audio still comes at the client's rate).
                await self.finish("max_length")
                if len(x):
                    await self.begin(implicit=True)
                    assert self.utt is not None
                    utt = self.utt

    # ---- utterances -----------------------------------------------------------------------

    async def begin(self, implicit: bool = False) -> None:
        """Open a new utterance."""
        stream = RecognitionStream(self.engine, self.ctx.app.runner, self.params(self.partials))
        utt = Utterance(stream, self.rate)
        self.utt = utt
        utt.forwarder = asyncio.create_task(self._forward(utt), name=f"ws-asr:{utt.id}")
        await self.status("started", utterance_id=utt.id, sample_rate=self.rate,
                          partials=self.partials, implicit=implicit)

    async def _forward(self, utt: Utterance) -> None:
        async for p in utt.stream.partials():
            if utt.stopped:
                continue
            utt.sent += 1
            if p.decode_ms is not None:
                self.ctx.metrics.latency.observe(p.decode_ms / 1000,
                                                 stage="ws_asr_partial_decode")
            self.ctx.metrics.ws_results.inc(mode="partial")
            await self.send({"type": "result", "mode": "partial", "text": p.text,
                             "seq": utt.sent, "utterance_id": utt.id, "audio_s": p.audio_s,
                             "processing_time_ms": p.decode_ms})

    async def finish(self, reason: str) -> None:
        """Final recognition of the current utterance: `stopped`, then the final result."""
        utt = self.utt
        if utt is None:
            return
        self.utt = None
        t_stop = time.monotonic()
        if utt.resampler is not None:
            tail = utt.resampler.process(np.zeros(0, np.float32), last=True)
            room = self.max_samples - utt.stream.fed_samples
            if len(tail) and room > 0:
                utt.stream.feed(tail[:room])
        utt.stopped = True
        await self.status("stopped", utterance_id=utt.id, reason=reason)
        final = await utt.stream.finish()
        if utt.forwarder is not None:
            await utt.forwarder
        now = time.monotonic()
        # The streamed utterance's emotion, as a live one's: after its final, off the loop.
        task = asyncio.create_task(emotion_app.analyse_stream_utterance(
            self.ctx.app, self.id, utt.id, utt.stream.audio()), name=f"ws-asr-emotion:{utt.id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        m = self.ctx.metrics
        m.latency.observe(final.finish_ms / 1000, stage="ws_asr_decode")
        m.latency.observe(now - t_stop, stage="ws_asr_final")
        m.ws_results.inc(mode="final")
        await self.send({
            "type": "result", "mode": "final", "text": final.text, "language": final.language,
            "model": self.engine.model_id, "utterance_id": utt.id, "reason": reason,
            "audio_s": final.audio_s, "partials": utt.sent, "segments": final.segments,
            "processing_time_ms": final.finish_ms,
            "latency_ms": round(1000 * (now - t_stop), 1), "from_partial": final.reused,
        })

    def abandon(self) -> None:
        """Drop the current utterance without a result."""
        utt, self.utt = self.utt, None
        if utt is not None:
            utt.stream.abandon()
            if utt.forwarder is not None:
                utt.forwarder.cancel()


async def asr_ws(request: web.Request) -> web.StreamResponse:
    """`GET /ws/asr` (WebSocket upgrade)."""
    ctx, ws = await upgrade(request)
    cfg = ctx.cfg
    peer = request.remote or "?"
    engine = ctx.app.asr_engine
    if engine is None:
        ctx.metrics.ws_rejected.inc(reason="asr_unavailable")
        return await refuse(ws, "asr_unavailable", "no ASR model is loaded (asr.enabled is "
                             "false, the model failed to load, or the daemon is starting)")
    if ctx.asr_sessions >= cfg.max_asr_sessions:
        ctx.metrics.ws_rejected.inc(reason="too_many_sessions")
        log.warning("/ws/asr client %s refused: %d sessions open", peer, ctx.asr_sessions)
        return await refuse(ws, "too_many_sessions",
                             f"all {cfg.max_asr_sessions} ASR sessions are in use "
                             "(api.max_asr_sessions); try again later")
    ctx.asr_sessions += 1
    ctx.sockets["asr"].add(ws)
    conn = AsrConnection(ctx, ws, engine, peer)
    emotion_app.open_stream(ctx.app, conn.id)
    log.info("/ws/asr client %s connected (session %s)", peer, conn.id)
    try:
        await conn.status("ready", model=engine.model_id, sample_rate=PIPELINE_RATE,
                          partials=cfg.asr_partials, max_utterance_s=cfg.asr_max_utterance_s)
        await conn.serve()
    finally:
        conn.abandon()
        emotion_app.end_stream(ctx.app, conn.id)
        ctx.asr_sessions -= 1
        ctx.sockets["asr"].discard(ws)
        log.info("/ws/asr client %s left", peer)
    return ws


def setup(app: web.Application) -> None:
    """Register the route."""
    app.router.add_get("/ws/asr", asr_ws, name="ws_asr")
