"""Emotion sessions: a summary per push-to-talk hold, `/ws/asr` connection or vad window.

Fed by the emotion analyser (`begin` / `done` per utterance) and by the bus (a gate closing
ends its push-to-talk session). A push-to-talk session's `emotion.session` goes out once its
gate closed and its utterances are analysed (after `SETTLE_S`, for an utterance still on its
way through the pipeline); a `/ws/asr` connection's after `end`; in vad mode one per window
of `window_s` from the window's first utterance, all under the daemon run's session id.
What is open when the daemon stops is summarised then. Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from agent.bus import Publisher, Subscription
from agent.emotion.session import SessionSummary, SessionTracker, summarize
from agent.events import EmotionDetected, EmotionSession, GateMode, StateChanged

log = logging.getLogger(__name__)

#: After a session ends, how long to wait for an utterance still on its way through the
#: pipeline (the chunk in flight when the gate closed) before its summary goes out.
SETTLE_S = 0.5
#: Gate sessions remembered as closed, so that such a late utterance finds its session ended.
RECENTLY_CLOSED = 64

Kind = Literal["ptt", "vad", "stream"]
State = Literal["open", "ending", "closed"]


@dataclass
class _Session:
    id: str
    kind: Kind
    state: State = "open"
    inflight: int = 0  # utterances begun, not yet done
    window: int = 0  # vad: windows summarised so far
    started_ts: float = field(default_factory=time.time)
    ended_ts: float | None = None
    last: SessionSummary | None = None  # the final summary (vad: the last window's)
    timer: asyncio.TimerHandle | None = None  # ptt/stream: settle; vad: the window's end


class EmotionSessions:
    """Per-session emotion summaries, fed by the emotion analyser (all calls on the loop)."""

    def __init__(self, mode: GateMode, window_s: float, max_sessions: int,
                 settle_s: float = SETTLE_S) -> None:
        self.mode = mode
        self.window_s = window_s
        self.settle_s = settle_s
        self.max_sessions = max_sessions
        self.tracker = SessionTracker(max_sessions)
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._gate_closed: deque[str] = deque(maxlen=RECENTLY_CLOSED)
        self._pub: Publisher | None = None
        self._sub: Subscription | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        self.published = 0

    # -- fed by the analyser ----------------------------------------------------------------

    def begin(self, session_id: str | None, pub: Publisher) -> None:
        """An utterance of `session_id` is being analysed."""
        self._attach(pub)
        if session_id is None or self._closed:
            return
        s = self._session(session_id, "vad" if self.mode == "vad" else "ptt")
        s.inflight += 1
        if s.kind != "vad":
            self._cancel(s)
            if s.state != "open" or session_id in self._gate_closed:
                # Begun after its gate closed (the chunk in flight): the session is ending,
                # and a summary already out is published again, complete.
                s.state = "ending"

    def done(self, session_id: str | None, event: EmotionDetected | None) -> None:
        """That utterance's result (None: no opinion, or abandoned)."""
        s = self._sessions.get(session_id) if session_id is not None else None
        if s is None or self._closed:
            return
        s.inflight = max(0, s.inflight - 1)
        if event is not None:
            self.tracker.add(s.id, event)
            if s.kind == "vad" and s.timer is None:
                s.timer = asyncio.get_running_loop().call_later(self.window_s,
                                                                self._end_window, s)
        if s.state == "ending" and s.inflight == 0:
            self._settle(s)

    # -- session boundaries -----------------------------------------------------------------

    def open_stream(self, session_id: str) -> None:
        """A `/ws/asr` connection's session begins."""
        self._session(session_id, "stream")

    def end(self, session_id: str) -> None:
        """The session ended (the gate closed, the connection went): summarise it when done."""
        self._gate_closed.append(session_id)
        s = self._sessions.get(session_id)
        if s is None or s.kind == "vad" or s.state == "closed":
            return
        s.state = "ending"
        if s.inflight == 0:
            self._settle(s)

    def _settle(self, s: _Session) -> None:
        self._cancel(s)
        s.timer = asyncio.get_running_loop().call_later(self.settle_s, self._finish, s)

    def _finish(self, s: _Session) -> None:
        s.timer = None
        if s.inflight or s.state != "ending":
            return
        s.state, s.ended_ts = "closed", time.time()
        # The observations stay (bounded): a late utterance republishes the complete summary.
        summary = self.tracker.summary(s.id)
        if summary is not None:
            s.last = summary
            self._publish(s, summary)

    def _end_window(self, s: _Session) -> None:
        s.timer = None
        summary = self.tracker.close(s.id)
        if summary is not None:
            s.window += 1
            s.last, s.ended_ts = summary, time.time()
            self._publish(s, summary)

    def _publish(self, s: _Session, summary: SessionSummary) -> None:
        if self._pub is None:
            return
        self._pub.emit(EmotionSession, session_id=s.id, **summary.to_dict())
        self.published += 1

    # -- bookkeeping ------------------------------------------------------------------------

    def _session(self, session_id: str, kind: Kind) -> _Session:
        s = self._sessions.get(session_id)
        if s is not None:
            return s
        while len(self._sessions) >= self.max_sessions:
            # Bounded: the oldest session is forgotten first (its summary, if any, went out).
            _, old = self._sessions.popitem(last=False)
            self._cancel(old)
            self.tracker.close(old.id)
        s = self._sessions[session_id] = _Session(session_id, kind)
        return s

    @staticmethod
    def _cancel(s: _Session) -> None:
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None

    def _attach(self, pub: Publisher) -> None:
        if self._pub is None:
            self._pub = pub
        if self._watcher is None and not self._closed:
            # Gate closes end push-to-talk sessions; only those are wanted from the bus.
            self._sub = pub.bus.subscribe(256, types=["state.changed"], name="emotion-sessions")
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(self._sub), name="emotion-sessions")

    async def _watch(self, sub: Subscription) -> None:
        async for ev in sub:
            if isinstance(ev, StateChanged) and ev.state == "closed" and ev.session_id:
                self.end(ev.session_id)

    def view(self, session_id: str) -> SessionView | None:
        """What `emotion/session` returns, or None for an unknown session."""
        s = self._sessions.get(session_id)
        if s is None:
            return None
        current = self.tracker.summary(s.id)
        state: State = s.state
        window = s.window if s.kind == "vad" else None
        if s.kind == "vad" and current is None and s.last is not None:
            # Between windows: the last window, closed.
            current, state, window = s.last, "closed", s.window - 1
        summary = current or s.last or summarize([])
        return SessionView(session_id=s.id, kind=s.kind, state=state, window=window,
                           pending=s.inflight, started_ts=s.started_ts,
                           ended_ts=s.ended_ts if state == "closed" else None,
                           **summary.to_dict())

    async def aclose(self) -> None:
        """The daemon stops: what is still open (a held gate, the vad window) is summarised."""
        if self._closed:
            return
        for s in self._sessions.values():
            self._cancel(s)
            if s.state == "closed":
                continue
            summary = self.tracker.close(s.id)
            if summary is not None:
                s.state, s.last, s.ended_ts = "closed", summary, time.time()
                self._publish(s, summary)
        self._closed = True
        if self._sub is not None:
            self._sub.close()
        if self._watcher is not None:
            self._watcher.cancel()


class SessionView(BaseModel):
    """A session's emotional summary (so far, or final)."""

    session_id: str
    kind: Kind  # ptt: a push-to-talk hold; vad: the daemon run, in windows; stream: /ws/asr
    state: State  # ending: closed, utterances still being analysed
    window: int | None = None  # vad: index of the window this summary covers
    pending: int = 0  # utterances still being analysed
    started_ts: float
    ended_ts: float | None = None
    utterances: int
    distribution: dict[str, float]
    dominant: str | None
    stability: float
    valence: float
