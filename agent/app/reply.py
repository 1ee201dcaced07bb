"""Spoken replies in the daemon: the reply session built from config, its triggers and barge-in.

`Replies` (one per App, `replies_of(app)`) owns a `ReplySession` (DashScope qwen -> sentence
chunks -> CosyVoice, the local Piper voice for `say`, cloud faults and the offline notice) and
its outputs: the local speaker and the kiosks on `/ws/tts`. `ReplyService` follows the bus:

- an `asr.final` with words starts a reply when `reply.enabled` (a new one supersedes the
  last), unless the speaker gate refuses it: with `speaker.gate_actions`, the utterance's
  `speaker.identified` judged by `speaker_gate.decide` (refusals published as
  `access.denied`); any `access.denied` for that utterance; or one of `Replies.gates`;
- push-to-talk opening the gate (or, with `reply.duplex: full`, detected speech) is a
  barge-in: the reply's LLM stream and TTS are cancelled and playback flushed at once;
- half duplex (the default): while the local speaker plays a reply, audio past the gate
  reaches the VAD as silence (`GateController.mute`), until `reply.echo_tail_ms` after the last
  sample, so the daemon's own voice never becomes an utterance. Only live sources (not
  files) are muted: a recording cannot hear the speaker.

Piper synthesis runs in the daemon-wide decode runner (priority FINAL: a reply is what the
user is waiting for), never on the event loop. The commands (and the capability's
`register`) are in `reply_commands`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent.app import speaker_gate
from agent.app.reply_outputs import KioskHub, SpeakerOut
from agent.app.reply_voice import cloud_llm, cloud_tts, local_voice
from agent.app.service import Service
from agent.asr.base import has_words
from agent.audio.playback import Player
from agent.config import Config
from agent.errors import AgentError, CloudError, ReplyError
from agent.events import (
    AccessDenied,
    AsrFinal,
    BaseEvent,
    CloudUnavailable,
    ErrorEvent,
    SpeakerIdentified,
    SpeechStarted,
    StateChanged,
)
from agent.reply.chunker import SentenceChunker
from agent.reply.history import ConversationStore
from agent.reply.session import AudioOut, ReplyResult, ReplySession
from agent.reply.tts import Tts, synthesize_all

if TYPE_CHECKING:
    from agent.app.core import App

log = logging.getLogger(__name__)

# After the speaker's last sample, the mic stays muted this long: the device's output
# latency, the capture path's own latency (the mic delivers what it heard tens of ms ago)
# and the room's reverberation.
# reply.conversation = speaker (and no speaker gate): how long a final waits for its speaker.
SPEAKER_GRACE_S = 0.5
WATCHED = ("asr.final", "state.changed", "speech.started", "access.denied",
           "speaker.identified", "error")
REMEMBERED = 256  # utterances whose speaker / denial is kept for the trigger

#: A speaker gate: refuses a reply to this final by returning why (None: allowed).
ReplyGate = Callable[[AsrFinal], Awaitable[str | None]]
Listener = Callable[[BaseEvent], None]

_REPLIES: weakref.WeakKeyDictionary[App, Replies] = weakref.WeakKeyDictionary()


def replies_of(app: App) -> Replies:
    """The App's replies; ReplyError `replies_unavailable` (503) when it has none."""
    r = _REPLIES.get(app)
    if r is None:
        raise ReplyError("replies_unavailable", "this daemon has no reply capability",
                         status=503)
    return r


class Replies:
    """The reply capability of one App: session, outputs, triggers, barge-in, half duplex."""

    def __init__(self, app: App) -> None:
        self.app = app
        cfg, rc = app.cfg, app.cfg.reply
        self.kiosk = KioskHub()
        pb = cfg.playback
        self.speaker = SpeakerOut(Player(pb.device, sample_rate=pb.sample_rate,
                                         block_ms=pb.block_ms, latency_s=pb.latency_s,
                                         buffer_s=pb.buffer_s)) if pb.enabled else None
        self.local = local_voice(app)
        if self.local is not None:
            app.tts_model = app.cfg.reply.piper.model
        outputs: list[AudioOut] = [self.kiosk] if self.speaker is None else \
            [self.speaker, self.kiosk]
        self.session = ReplySession(
            self._emit, llm=cloud_llm(cfg), tts=cloud_tts(cfg), local_tts=self.local,
            outputs=outputs,
            conversations=ConversationStore(rc.history_turns, rc.history_idle_s),
            chunk_min_weight=rc.chunk_min_weight, chunk_max_weight=rc.chunk_max_weight,
            offline_text=rc.offline_text, on_speaking=self._on_speaking)
        self.half_duplex = rc.duplex == "half"
        self.gates: list[ReplyGate] = []  # more refusals, beyond speaker.gate_actions
        self._listeners: dict[str, Listener] = {}  # session_id -> the chat call awaiting it
        self._denied: collections.OrderedDict[str, str] = collections.OrderedDict()
        # utterance -> its speaker.identified (None: the speaker analysis failed)
        self._speakers: collections.OrderedDict[str, SpeakerIdentified | None] = \
            collections.OrderedDict()
        self._verdicts: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Future[Any]] = set()  # every task of ours (strong refs)
        self._waiting: set[asyncio.Future[Any]] = set()  # finals not yet replied to
        self._tail: asyncio.TimerHandle | None = None
        self.triggered = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.barge_ins = 0
        self.muted_replies = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Warm the local voice up (in the runner) so the first offline reply is not late."""
        try:
            await self.session.warm_up()
        except AgentError as e:
            self.app.problems["tts"] = e.message
            self.app.report(e)

    async def aclose(self) -> None:
        """Shutdown: cancel what runs, close the clients and the speaker."""
        for t in list(self._tasks):
            t.cancel()
        if self._tail is not None:
            self._tail.cancel()
        await self.session.aclose()
        if self.speaker is not None:
            await self.speaker.aclose()

    # ---------------------------------------------------------------- events

    def _emit(self, cls: type[BaseEvent], **fields: Any) -> BaseEvent:
        ev = self.app.pub.emit(cls, **fields)
        listener = self._listeners.get(fields.get("session_id") or "")
        if listener is not None:
            listener(ev)
        return ev

    def handle(self, ev: BaseEvent) -> None:
        """One bus event: a trigger, a barge-in, or what the speaker gate needs to know."""
        if isinstance(ev, AsrFinal):
            if self.app.cfg.reply.enabled and not self.app.stopping:
                self._waiting.add(self._spawn(self._on_final(ev)))
        elif isinstance(ev, StateChanged):
            if ev.state == "open" and ev.mode != "vad":
                self.barge_in("barge_in")
        elif isinstance(ev, SpeechStarted):
            if not self.half_duplex:
                self.barge_in("barge_in")
        elif isinstance(ev, AccessDenied):
            if ev.utterance_id and ev.action in ("reply", "*"):
                self._remember(self._denied, ev.utterance_id, ev.reason)
                self._verdict(ev.utterance_id)
        elif isinstance(ev, SpeakerIdentified) and ev.utterance_id:
            self._remember(self._speakers, ev.utterance_id, ev)
            self._verdict(ev.utterance_id)
        elif isinstance(ev, ErrorEvent) and ev.stage == "speaker" and ev.utterance_id:
            self._remember(self._speakers, ev.utterance_id, None)  # no verdict will come
            self._verdict(ev.utterance_id)

    def barge_in(self, reason: str) -> bool:
        """Cut the reply short (and drop finals still waiting to start one)."""
        for t in list(self._waiting):
            t.cancel()
        if not self.session.busy:
            return False
        self.barge_ins += 1
        # cancel() silences every output before its first await: the flush happens now.
        self._spawn(self.session.cancel(reason))
        return True

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._waiting.discard)
        return task

    @staticmethod
    def _remember(d: collections.OrderedDict[str, Any], key: str, value: Any) -> None:
        d[key] = value
        while len(d) > REMEMBERED:
            d.popitem(last=False)

    def _verdict(self, utterance_id: str) -> None:
        ev = self._verdicts.pop(utterance_id, None)
        if ev is not None:
            ev.set()

    # ---------------------------------------------------------------- the trigger

    async def _on_final(self, ev: AsrFinal) -> None:
        text = ev.text.strip()
        if not has_words(text):
            self.skipped["no_words"] += 1
            return
        if reason := await self._refused(ev):
            self.skipped["denied"] += 1
            log.info("no reply to utterance %s: %s", ev.utterance_id, reason)
            return
        self.triggered += 1
        # From here the session's own cancel (barge-in, a newer reply) ends it, with its reason.
        self._waiting.discard(asyncio.current_task())
        res = await self.session.reply(text, session_id=ev.session_id,
                                       utterance_id=ev.utterance_id,
                                       conversation=self.conversation(ev.utterance_id),
                                       trigger_mono=ev.mono)
        self.observe(res)

    async def _refused(self, ev: AsrFinal) -> str | None:
        """Why the speaker gate refuses a reply to `ev`, or None.

        With `speaker.gate_actions` the speaker recognition's policy decides (fail closed:
        `agent.app.speaker_gate.decide`) and a refusal is published as `access.denied`;
        any `access.denied` for the utterance and any of `gates` refuse it too.
        """
        uid = ev.utterance_id or ""
        spk = self.app.cfg.speaker
        running = "speaker" in self.app.analysers
        if spk.gate_actions:
            if running:
                identified = await self._speaker_of(uid, speaker_gate.WAIT_S)
                ok, why = speaker_gate.decide(spk, identified)
            else:
                identified, ok = None, False
                why = "speaker recognition is not running (speaker.gate_actions needs it)"
            if not ok:
                self.app.pub.emit(AccessDenied, session_id=ev.session_id, utterance_id=uid,
                                  action="reply", reason=why,
                                  speaker_id=identified.speaker_id if identified else None,
                                  name=identified.name if identified else "unknown")
                return why
        elif running and self.app.cfg.reply.conversation == "speaker":
            await self._speaker_of(uid, SPEAKER_GRACE_S)
        await asyncio.sleep(0)  # an access.denied published right behind the final
        if uid in self._denied:
            return f"access denied: {self._denied[uid]}"
        for gate in self.gates:
            if refusal := await gate(ev):
                return refusal
        return None

    async def _speaker_of(self, uid: str, timeout_s: float) -> SpeakerIdentified | None:
        """The utterance's speaker.identified, waiting up to `timeout_s` for it."""
        if uid and uid not in self._speakers and uid not in self._denied:
            waiter = self._verdicts.setdefault(uid, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), timeout_s)
            self._verdicts.pop(uid, None)
        return self._speakers.get(uid)

    def conversation(self, utterance_id: str | None) -> str:
        """Whose history a reply continues: the device's, or the identified speaker's."""
        if self.app.cfg.reply.conversation == "speaker" and utterance_id:
            speaker = self._speakers.get(utterance_id)
            if speaker is not None and speaker.speaker_id:
                return f"speaker:{speaker.speaker_id}"
        return "device"

    def observe(self, res: ReplyResult) -> None:
        """Reply latencies for the metrics (from the trigger)."""
        if res.first_text_ms is not None:
            self.app.observe("reply_first_text", res.first_text_ms / 1000)
        if res.first_audio_ms is not None:
            self.app.observe("reply_first_audio", res.first_audio_ms / 1000)

    # ---------------------------------------------------------------- half duplex

    def _on_speaking(self, on: bool) -> None:
        if not self.half_duplex or self.speaker is None:
            return  # full duplex, or nothing audible here: the mic stays as it is
        src = self.app.source
        if src is not None and src.name == "file":
            return
        gate = self.app.gate
        if self._tail is not None:
            self._tail.cancel()
            self._tail = None
        if on:
            self.muted_replies += 1
            gate.mute(True)
        else:
            self._tail = asyncio.get_running_loop().call_later(
                self.app.cfg.reply.echo_tail_ms / 1000, gate.mute, False)

    # ---------------------------------------------------------------- for the commands

    async def speak(self, text: str, *, local: bool = False, chat: bool = False,
                    conversation: str | None = None,
                    listener: Listener | None = None) -> ReplyResult:
        """`say` (text out loud) or `chat` (an LLM reply out loud); events go to `listener`."""
        sid = f"{'chat' if chat else 'say'}-{uuid.uuid4().hex[:12]}"
        if listener is not None:
            self._listeners[sid] = listener
        try:
            if chat:
                res = await self.session.reply(text, session_id=sid,
                                               conversation=conversation or "device")
            else:
                res = await self.session.say(text, session_id=sid, local=local)
        finally:
            self._listeners.pop(sid, None)
        self.observe(res)
        return res

    async def synthesize(self, text: str, local: bool = False) -> tuple[bytes, Tts]:
        """All of `text` as 16 kHz PCM (no playback): the cloud voice, else the local one."""
        rc = self.app.cfg.reply
        chunker = SentenceChunker(rc.chunk_min_weight, rc.chunk_max_weight)
        parts = [*chunker.push(text), *chunker.flush()]
        tts = None if local else self.session.tts
        if tts is not None:
            try:
                return await synthesize_all(tts, parts), tts
            except CloudError as e:
                self.app.pub.emit(CloudUnavailable, service="tts", code=e.code,
                                  message=e.message, retry_in_s=e.retry_after_s)
                if self.local is None:
                    raise
        if self.local is None:
            raise ReplyError("no_tts", "no TTS: the local voice is not installed (voice-agent "
                             "models install piper-joe-us) and reply.tts is piper",
                             status=503)
        return await synthesize_all(self.local, parts), self.local


class ReplyService(Service):
    """Follows the bus for the reply triggers and barge-in; warms up and closes the session."""

    name = "reply"

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self.replies = replies_of(app)
        # Subscribed here, before the daemon's first event; an App without this service
        # (the CLI, tests of other parts) queues nothing for replies.
        self.sub = app.bus.subscribe(app.cfg.events.queue_size, types=WATCHED, name="reply")

    async def run(self) -> None:
        """Until the bus closes (the daemon stops)."""
        r = self.replies
        warm = asyncio.create_task(r.start(), name="reply-warm-up")
        try:
            async for ev in self.sub:
                r.handle(ev)
        finally:
            warm.cancel()
            await r.aclose()

    def describe(self) -> str | None:
        """One banner line: whether finals get replies, and with which voices."""
        rc = self.app.cfg.reply
        voice = "cosyvoice" if rc.tts == "cosyvoice" else "piper"
        local = "piper" if self.replies.local is not None else "no local voice"
        trig = "replies on" if rc.enabled else "replies off (say/chat/tts commands only)"
        return f"{trig}; voice {voice}, {local}; {rc.duplex} duplex"


# Read from app.cfg whenever they are used; everything else in reply/playback/dashscope is
# built into the session, the player or the cloud clients at start.
_LIVE = ("reply.enabled", "reply.conversation", "reply.echo_tail_ms")


def restart_paths(old: Config, new: Config) -> list[str]:
    """The reply, playback and DashScope settings a reload changed that need a restart."""
    out = []
    for section in ("reply", "playback", "dashscope"):
        a, b = getattr(old, section), getattr(new, section)
        for name in type(a).model_fields:
            path = f"{section}.{name}"
            if path not in _LIVE and getattr(a, name) != getattr(b, name):
                out.append(path)
    return out


def attach(app: App) -> Replies:
    """Build the App's replies (once); `replies_of(app)` finds them from then on."""
    if app not in _REPLIES:
        _REPLIES[app] = Replies(app)
        app.reload_hooks.append(restart_paths)
    return _REPLIES[app]
