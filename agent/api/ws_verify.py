"""`/ws/speakers/verify`: stream audio, get a voice similarity for each window (ECAPA-style).

The reference is an enrolled speaker (`speaker_id` in the opening `start`) or the first
`reference_s` seconds of audio; then every `hop_s` the last `window_s` seconds are compared
with it, and `stop` gives a final verdict over everything after the reference. Framing as
`/ws/asr`: JSON `control` messages, audio as binary s16le frames or `{"type": "audio", "data":
"<base64>"}`, answers `status`, `reference`, `result` (mode window|final) and `error` (the
connection stays). Model calls run in the decode runner: the reference and the final at
`Priority.ANALYSIS`, windows best effort (shed under load, as partials are), one at a time
per connection; a window that falls behind is skipped in favour of the newest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
from aiohttp import web

from agent.analysis import Priority
from agent.api.context import ApiContext
from agent.api.ws_audio import AudioSocket, refuse, upgrade
from agent.audio.convert import Resampler
from agent.constants import CAPTURE_RATES, PIPELINE_RATE
from agent.errors import AgentError, SpeakerError
from agent.speaker.analyser import CANNOT_TELL, SpeakerAnalyser
from agent.speaker.store import Speaker

log = logging.getLogger(__name__)

ENDPOINT = "speakers_verify"
MAX_SESSIONS = 4  # each one keeps a worker busy ~40 ms per hop
DEFAULTS = {"window_s": 3.0, "hop_s": 1.0, "reference_s": 8.0}
LIMITS = {"window_s": (1.0, 10.0), "hop_s": (0.25, 10.0), "reference_s": (1.0, 30.0)}
SR = PIPELINE_RATE


def _seconds(n: int) -> float:
    return round(n / SR, 3)


class VerifySession(AudioSocket):
    """Protocol state of one client: the reference, the test audio, the window in flight."""

    endpoint = ENDPOINT

    def __init__(self, ctx: ApiContext, ws: web.WebSocketResponse, a: SpeakerAnalyser,
                 peer: str = "?") -> None:
        super().__init__(ctx, ws, peer)
        self.a = a
        self.max_samples = int(ctx.app.cfg.speaker.max_audio_s * SR)
        self.opts = dict(DEFAULTS)
        self.rate = SR
        self._clear()

    def _clear(self) -> None:
        self.state = "idle"  # idle -> reference (from audio) -> verifying
        self.resampler: Resampler | None = None
        self.speaker: Speaker | None = None
        self.ref_vec: np.ndarray | None = None
        self.ref: list[np.ndarray] = []  # reference audio so far
        self.ref_due = 0  # samples of reference audio at which to (re)try it
        self.test = np.zeros(0, np.float32)  # the newest max_samples of test audio
        self.test_total = 0  # test samples received
        self.next_window = 0
        self.seq = 0
        self.shed = 0
        self.task: asyncio.Task[None] | None = None
        self.closing = False  # stop() is finishing: no new jobs

    async def on_control(self, msg: dict[str, Any]) -> None:
        """start (speaker_id, sample_rate, window_s, hop_s, reference_s), stop or reset."""
        cmd = msg.get("command")
        if cmd == "start":
            try:
                await self.start(msg)
            except AgentError as e:
                await self.error(e.code, e.message)
        elif cmd == "stop":
            if self.state == "idle":
                await self.error("not_started", "stop without start: nothing to verify")
                return
            await self.stop()
        elif cmd == "reset":
            self.abandon()
            await self.status("reset")
        else:
            await self.error("unknown_command", f"unknown command {str(cmd)[:40]!r}; expected "
                                                "start, stop or reset")

    async def start(self, msg: dict[str, Any], implicit: bool = False) -> None:
        """Begin a verification (the previous one, if any, is abandoned)."""
        rate = msg.get("sample_rate", SR)
        if type(rate) is not int or rate not in CAPTURE_RATES:
            raise SpeakerError("bad_sample_rate", f"sample_rate must be one of "
                               f"{', '.join(map(str, CAPTURE_RATES))} (got {str(rate)[:20]})")
        opts = dict(DEFAULTS)
        for k, (lo, hi) in LIMITS.items():
            v = msg.get(k, opts[k])
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise SpeakerError("bad_message", f"{k} must be a number in [{lo:g}, {hi:g}]")
            opts[k] = float(v)
        if opts["hop_s"] > opts["window_s"]:
            raise SpeakerError("bad_message", "hop_s must not exceed window_s")
        speaker = None
        sid = msg.get("speaker_id")
        if sid is not None:
            if not isinstance(sid, str):
                raise SpeakerError("bad_message", "speaker_id must be a string")
            speaker = await asyncio.to_thread(self.a.store.get, sid)
            if self.a.embedder.model_id not in speaker.models:
                raise SpeakerError("needs_reenrolment", f"speaker {speaker.name!r} has no "
                                   f"voiceprint for {self.a.embedder.model_id}", status=409)
        self.abandon()
        self.rate, self.opts, self.speaker = rate, opts, speaker
        self.resampler = Resampler(rate) if rate != SR else None
        self.state = "verifying" if speaker else "reference"
        self.ref_due = int(opts["reference_s"] * SR)
        self.next_window = int(opts["window_s"] * SR)
        await self.status("started", reference="speaker" if speaker else "audio",
                          speaker_id=speaker.id if speaker else None,
                          name=speaker.name if speaker else None, sample_rate=rate,
                          implicit=implicit, **opts)

    async def on_audio(self, pcm: bytes) -> None:
        """s16le mono PCM at the session's rate."""
        if len(pcm) % 2:
            await self.error("bad_audio", f"PCM must hold whole 16-bit samples (got {len(pcm)} "
                                          "bytes)")
            return
        if not pcm:
            return
        if self.state == "idle":
            await self.start({"sample_rate": self.rate}, implicit=True)
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        if self.resampler is not None:
            x = self.resampler.process(x)
        if self.state == "reference":
            self.ref.append(x)
        else:
            self._add_test(x)
        self._kick()

    def _add_test(self, x: np.ndarray) -> None:
        self.test = np.concatenate([self.test, x])[-self.max_samples:]
        self.test_total += len(x)

    # -- model work, one job at a time --------------------------------------------------------

    def _kick(self) -> None:
        """Start the next due job unless one is running."""
        if self.closing or (self.task is not None and not self.task.done()):
            return
        job = None
        if self.state == "reference" and sum(map(len, self.ref)) >= self.ref_due:
            job = self._reference()
        elif self.state == "verifying" and self.test_total >= self.next_window:
            # Skip to the newest window when audio came faster than we scored it.
            self.next_window = self.test_total + int(self.opts["hop_s"] * SR)
            job = self._window()
        if job is not None:
            self.task = asyncio.get_running_loop().create_task(job, name=f"ws-verify:{self.id}")
            self.task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("/ws/speakers/verify job failed: %s", exc)
            return
        if self.task is task:
            self._kick()

    def score(self, audio: np.ndarray) -> dict[str, Any]:
        """Embed `audio` and compare it with the reference (blocking: a worker runs this)."""
        try:
            emb = self.a.embedder.extract(audio)
        except SpeakerError as e:
            if e.code not in CANNOT_TELL:
                raise
            return {"similarity": None, "is_match": None, "reason": e.code, "speech_s": 0.0}
        if self.speaker is not None:
            m = self.a.store.verify(self.speaker.id, emb.vector, emb.model_id)
            sim, ok = m.score, m.is_match
        else:
            assert self.ref_vec is not None
            sim = float(np.dot(self.ref_vec, emb.vector))
            ok = sim >= self.a.store.threshold
        return {"similarity": round(sim, 4), "is_match": ok, "speech_s": round(emb.speech_s, 2)}

    async def _reference(self) -> None:
        audio = np.concatenate(self.ref)
        t0 = time.monotonic()
        try:
            emb = await self.ctx.app.runner.run(self.a.embedder.extract, audio,
                                                priority=Priority.ANALYSIS, kind="speaker")
        except SpeakerError as e:
            if e.code not in CANNOT_TELL or len(audio) >= self.max_samples:
                self.abandon()
                await self.error("bad_reference", f"no usable reference voice in "
                                 f"{_seconds(len(audio))} s of audio ({e.message}); start again")
                return
            # Not enough speech yet: listen on and try again a hop later.
            self.ref_due = len(audio) + int(self.opts["hop_s"] * SR)
            return
        self.ref_vec = emb.vector
        rest = np.concatenate(self.ref)[len(audio):]  # what came while it was embedded
        self.ref, self.state = [], "verifying"
        if len(rest):
            self._add_test(rest)
        await self.send({"type": "reference", "audio_s": _seconds(len(audio)),
                         "speech_s": round(emb.speech_s, 2),
                         "processing_time_ms": round(1000 * (time.monotonic() - t0), 1)})

    async def _window(self) -> None:
        n = int(self.opts["window_s"] * SR)
        audio, end = self.test[-n:], self.test_total
        t0 = time.monotonic()
        out = await self.ctx.app.runner.partial(self.score, audio, kind="speaker")
        if out is None:
            self.shed += 1
            return
        self.seq += 1
        ms = round(1000 * (time.monotonic() - t0), 1)
        self.ctx.app.observe("ws_verify_window", ms / 1000)
        await self.send({"type": "result", "mode": "window", "seq": self.seq,
                         "start_s": _seconds(end - len(audio)), "end_s": _seconds(end), **out,
                         "processing_time_ms": ms})

    async def stop(self) -> None:
        """Finish: the verdict over all test audio (the newest speaker.max_audio_s of it)."""
        self.closing = True
        if self.task is not None and not self.task.done():
            with contextlib.suppress(Exception):
                await self.task
        if self.resampler is not None:
            tail = self.resampler.process(np.zeros(0, np.float32), last=True)
            if self.state == "verifying" and len(tail):
                self._add_test(tail)
        state, audio = self.state, self.test
        await self.status("stopped", windows=self.seq, shed=self.shed)
        t0 = time.monotonic()
        if state != "verifying":
            out: dict[str, Any] = {"similarity": None, "is_match": None,
                                   "reason": "no_reference", "speech_s": 0.0}
        elif not len(audio):
            out = {"similarity": None, "is_match": None, "reason": "no_audio", "speech_s": 0.0}
        else:
            out = await self.ctx.app.runner.run(self.score, audio, priority=Priority.ANALYSIS,
                                                kind="speaker")
        await self.send({"type": "result", "mode": "final", **out,
                         "audio_s": _seconds(len(audio)), "windows": self.seq,
                         "threshold": self.a.store.threshold,
                         "processing_time_ms": round(1000 * (time.monotonic() - t0), 1)})
        self.abandon()

    def abandon(self) -> None:
        """Drop everything (the job in flight is cancelled; its worker call finishes unread)."""
        if self.task is not None:
            self.task.cancel()
        rate = self.rate
        self._clear()
        self.rate = rate


async def verify_ws(request: web.Request) -> web.StreamResponse:
    """`GET /ws/speakers/verify` (WebSocket upgrade)."""
    ctx, ws = await upgrade(request)
    a = ctx.app.analysers.get("speaker")
    if not isinstance(a, SpeakerAnalyser):
        return await refuse(ws, "speaker_unavailable", "no speaker model is loaded "
                             "(speaker.enabled is false, or the model failed to load)")
    sockets = ctx.sockets.setdefault(ENDPOINT, set())
    if len(sockets) >= MAX_SESSIONS:
        return await refuse(ws, "too_many_sessions", f"all {MAX_SESSIONS} verify sessions "
                             "are in use; try again later")
    sockets.add(ws)
    session = VerifySession(ctx, ws, a, request.remote or "?")
    try:
        await session.status("ready", model=a.embedder.model_id, sample_rate=SR,
                             threshold=a.store.threshold, max_audio_s=session.max_samples / SR,
                             **DEFAULTS)
        await session.serve()
    finally:
        session.abandon()
        sockets.discard(ws)
    return ws


def setup(app: web.Application) -> None:
    """Register the route."""
    app.router.add_get("/ws/speakers/verify", verify_ws, name="ws_speakers_verify")
