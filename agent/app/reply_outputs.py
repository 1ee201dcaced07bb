"""Where the daemon's replies are heard: the local speaker and every connected kiosk.

Both implement the reply session's `AudioOut` protocol (`begin`, `write`, `end`, `abort`).
`KioskHub` fans a reply's PCM out to the `/ws/tts` clients through one bounded queue each:
a client that cannot keep up is dropped, never waited for, and raw audio never goes on the
event bus. `SpeakerOut` wraps the sounddevice `Player` so that a box without a speaker
reports that once, not on every reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Literal

from agent.audio.playback import Player
from agent.constants import PIPELINE_RATE
from agent.errors import ReplyError

log = logging.getLogger(__name__)

# Audio queued for one kiosk before it counts as stuck: 60 s of 16 kHz s16 (replies are
# synthesised faster than real time and the browser schedules everything it gets at once).
KIOSK_MAX_QUEUED_BYTES = 60 * 2 * PIPELINE_RATE
# After the last sample was sent, how long the browser still plays: its scheduling lead and
# output latency. `end()` waits this long past real time so `speaking` covers the playout.
KIOSK_PLAYOUT_MARGIN_S = 0.15
SPEAKER_RETRY_S = 30.0  # a speaker that failed to open is tried again after this long

Kind = Literal["start", "audio", "end", "abort", "overflow"]


@dataclass(frozen=True)
class KioskMessage:
    """One item for a kiosk client: a reply starts, a piece of its audio, its end or abort."""

    kind: Kind
    reply_id: str
    pcm: bytes = b""
    sample_rate: int = PIPELINE_RATE
    audio_s: float = 0.0


class KioskClient:
    """One `/ws/tts` connection's queue; the WebSocket handler drains it."""

    def __init__(self, peer: str, max_bytes: int = KIOSK_MAX_QUEUED_BYTES) -> None:
        self.peer = peer
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.overflowed = False
        self.sent_bytes = 0  # taken off the queue by the handler
        self._queue: asyncio.Queue[KioskMessage] = asyncio.Queue()

    def put(self, msg: KioskMessage) -> None:
        """Queue a message; past `max_bytes` of audio the client is marked stuck."""
        if self.overflowed:
            return
        if msg.kind == "audio" and self.queued_bytes + len(msg.pcm) > self.max_bytes:
            self.overflowed = True
            self._clear()
            self._queue.put_nowait(KioskMessage("overflow", msg.reply_id))
            return
        self.queued_bytes += len(msg.pcm)
        self._queue.put_nowait(msg)

    def abort(self, reply_id: str) -> None:
        """Barge-in: what has not been sent yet is dropped, then the client hears `abort`."""
        self._clear()
        self.put(KioskMessage("abort", reply_id))

    def _clear(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self.queued_bytes = 0

    async def get(self) -> KioskMessage:
        """The next message to send."""
        msg = await self._queue.get()
        self.queued_bytes -= len(msg.pcm)
        self.sent_bytes += len(msg.pcm)
        return msg


class KioskHub:
    """The kiosks as one audio output: every reply goes to the clients connected at its start."""

    name = "kiosk"

    def __init__(self, max_client_bytes: int = KIOSK_MAX_QUEUED_BYTES,
                 playout_margin_s: float = KIOSK_PLAYOUT_MARGIN_S) -> None:
        self.max_client_bytes = max_client_bytes
        self.playout_margin_s = playout_margin_s
        self.clients: set[KioskClient] = set()
        self._active: list[KioskClient] = []
        self._reply_id = ""
        self._rate = PIPELINE_RATE
        self._t_begin = 0.0
        self._bytes = 0
        self.replies = 0  # replies that reached at least one kiosk
        self.dropped = 0  # clients closed for falling behind

    def connect(self, peer: str) -> KioskClient:
        """A kiosk connected: it hears the next reply from its start."""
        client = KioskClient(peer, self.max_client_bytes)
        self.clients.add(client)
        return client

    def disconnect(self, client: KioskClient) -> None:
        """A kiosk left (or was dropped)."""
        self.clients.discard(client)
        with contextlib.suppress(ValueError):
            self._active.remove(client)

    async def begin(self, reply_id: str, sample_rate: int) -> None:
        """A reply's first audio is coming: `start` to every connected kiosk."""
        self._active = list(self.clients)
        self._reply_id, self._rate = reply_id, sample_rate
        self._t_begin, self._bytes = time.monotonic(), 0
        if self._active:
            self.replies += 1
        for c in self._active:
            c.put(KioskMessage("start", reply_id, sample_rate=sample_rate))

    async def write(self, pcm: bytes) -> None:
        """A piece of the reply (never waits: a stuck kiosk is dropped instead)."""
        self._bytes += len(pcm)
        for c in list(self._active):
            c.put(KioskMessage("audio", self._reply_id, pcm=pcm))
            if c.overflowed:
                self.dropped += 1
                log.warning("kiosk %s fell %d s of audio behind: dropped", c.peer,
                            self.max_client_bytes // (2 * self._rate))
                self._active.remove(c)

    async def end(self) -> None:
        """`end` to the kiosks, then wait until they have played it out in real time."""
        if not self._active:
            return
        audio_s = self._bytes / (2 * self._rate)
        for c in self._active:
            c.put(KioskMessage("end", self._reply_id, audio_s=audio_s))
        left = self._t_begin + audio_s + self.playout_margin_s - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)

    def abort(self) -> None:
        """Barge-in: every kiosk stops at once."""
        for c in self._active:
            c.abort(self._reply_id)
        self._active = []


class SpeakerOut:
    """The local speaker: a `Player` that, once it failed to open, stays quiet for a while."""

    name = "speaker"

    def __init__(self, player: Player, retry_s: float = SPEAKER_RETRY_S) -> None:
        self.player = player
        self.retry_s = retry_s
        self.playing = False  # the current reply reaches the device
        self._failed_at: float | None = None

    async def begin(self, reply_id: str, sample_rate: int) -> None:
        """Open the device if needed; the first failure is raised (one error event)."""
        self.playing = False
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_s:
            return  # reported already: this reply goes to the other outputs only
        try:
            await self.player.begin(reply_id, sample_rate)
        except ReplyError:
            self._failed_at = time.monotonic()
            raise
        self._failed_at = None
        self.playing = True

    async def write(self, pcm: bytes) -> None:
        """Queue audio for the device (waits while its buffer is full)."""
        if self.playing:
            await self.player.write(pcm)

    async def end(self) -> None:
        """Play out what is queued."""
        if self.playing:
            await self.player.end()
        self.playing = False

    def abort(self) -> None:
        """Silence now."""
        self.playing = False
        self.player.abort()

    async def aclose(self) -> None:
        """Close the device (PortAudio's close can take tens of ms: not on the loop)."""
        await asyncio.to_thread(self.player.close)
