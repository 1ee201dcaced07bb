"""Messages not yet acknowledged by the broker: bounded, ordered, persisted, counted drops."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

# Rewrite the journal once it holds this many dead lines and they outnumber the live ones.
COMPACT_MIN_DEAD = 2000


@dataclass(frozen=True)
class Entry:
    """One message waiting for the broker; `seq` orders delivery."""

    seq: int
    topic: str
    payload: str
    qos: int
    rank: int  # drop order when full: lowest first (topics.RANK_*)
    kind: str  # event type, or "reply"

    def record(self) -> dict[str, Any]:
        """The journal form (dataclasses.asdict deep-copies: too slow per message)."""
        return {"seq": self.seq, "topic": self.topic, "payload": self.payload, "qos": self.qos,
                "rank": self.rank, "kind": self.kind}


class Outbox:
    """A bounded, ordered queue of outgoing messages, removed only once the broker has them.

    With a `path` it is journalled as JSON lines (one `add` per message, one `del` per
    acknowledgement or drop), so a daemon restart (or crash) loses nothing either. Writes go
    to the page cache, not to disk (no fsync per message): a daemon crash is survived, a power
    cut may lose the last seconds. When full, the oldest entry of the lowest rank is dropped
    (partials, then other events, finals last) and counted per kind.
    """

    def __init__(self, maxsize: int, path: Path | None = None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.path = path
        self._entries: dict[int, Entry] = {}  # insertion (= seq) order
        self._by_rank: dict[int, dict[int, None]] = {}  # rank -> seqs, oldest first
        self._unsent: deque[int] = deque()
        self._seq = 0
        self._ready = asyncio.Event()  # something to hand out
        self._empty = asyncio.Event()  # nothing waiting for an acknowledgement
        self._empty.set()
        self._file: IO[str] | None = None
        self._dead = 0  # journal lines that no longer describe a live entry
        self.dropped: Counter[str] = Counter()
        self.corrupt_lines = 0
        self.persist_error: str | None = None
        if path is not None:
            self._open(path)

    # -- queue ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dropped_total(self) -> int:
        """Entries lost to overflow since this outbox was created."""
        return sum(self.dropped.values())

    def entries(self) -> list[Entry]:
        """Everything waiting, oldest first."""
        return list(self._entries.values())

    def put(self, topic: str, payload: str, qos: int, rank: int, kind: str) -> Entry | None:
        """Queue one message; None when it was itself the one dropped to make room."""
        if len(self._entries) >= self.maxsize:
            lowest = min(r for r, seqs in self._by_rank.items() if seqs)
            if rank < lowest:
                # Everything held matters more than this message.
                self._count_drop(kind)
                return None
            victim = self._entries[next(iter(self._by_rank[lowest]))]
            self._remove(victim.seq)
            self._count_drop(victim.kind)
        self._seq += 1
        entry = Entry(self._seq, topic, payload, qos, rank, kind)
        self._add(entry)
        self._journal({"a": entry.record()})
        self._unsent.append(entry.seq)
        self._ready.set()
        self._empty.clear()
        return entry

    def ack(self, seq: int) -> None:
        """The broker has the message: forget it (a no-op if it was dropped meanwhile)."""
        if seq in self._entries:
            self._remove(seq)
            self._maybe_compact()

    def rewind(self) -> None:
        """A new connection: everything not acknowledged is sent again, in order."""
        self._unsent = deque(self._entries)
        if self._unsent:
            self._ready.set()

    def take(self) -> Entry | None:
        """The next entry to send, or None when everything has been handed out."""
        while self._unsent:
            entry = self._entries.get(self._unsent.popleft())
            if entry is not None:  # dropped since it was queued otherwise
                return entry
        self._ready.clear()
        return None

    async def next(self) -> Entry:
        """Wait for the next entry to send."""
        while True:
            entry = self.take()
            if entry is not None:
                return entry
            await self._ready.wait()

    async def wait_empty(self) -> None:
        """Wait until every entry has been acknowledged (or dropped)."""
        while self._entries:
            await self._empty.wait()

    def _add(self, entry: Entry) -> None:
        self._entries[entry.seq] = entry
        self._by_rank.setdefault(entry.rank, {})[entry.seq] = None

    def _remove(self, seq: int) -> None:
        entry = self._entries.pop(seq)
        del self._by_rank[entry.rank][seq]
        self._journal({"d": seq})
        self._dead += 2  # the add and this delete
        if not self._entries:
            self._empty.set()

    def _count_drop(self, kind: str) -> None:
        self.dropped[kind] += 1
        n = self.dropped_total
        if n == 1 or n % 100 == 0:
            log.warning("MQTT outbox full (%d): %d messages dropped (%s)", self.maxsize, n,
                        ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))

    # -- journal ----------------------------------------------------------------------------

    def _open(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                self._load(path)
            self._rewrite()
        except OSError as e:
            self._persist_failed(e)

    def _load(self, path: Path) -> None:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    if "a" in rec:
                        entry = Entry(**rec["a"])
                        self._add(entry)
                        self._seq = max(self._seq, entry.seq)
                    elif "d" in rec and rec["d"] in self._entries:
                        seq = rec["d"]
                        e = self._entries.pop(seq)
                        del self._by_rank[e.rank][seq]
                except (ValueError, TypeError, KeyError):
                    # A crash mid-write leaves a torn last line: skip it, keep the rest.
                    self.corrupt_lines += 1
        if self.corrupt_lines:
            log.warning("%s: %d unreadable lines skipped", path, self.corrupt_lines)
        overflow = len(self._entries) - self.maxsize
        for _ in range(max(0, overflow)):  # outbox_size was lowered since
            lowest = min(r for r, seqs in self._by_rank.items() if seqs)
            victim = self._entries[next(iter(self._by_rank[lowest]))]
            e = self._entries.pop(victim.seq)
            del self._by_rank[e.rank][victim.seq]
            self._count_drop(e.kind)
        self._unsent = deque(self._entries)
        if self._entries:
            self._ready.set()
            self._empty.clear()
            log.info("MQTT outbox: %d messages from the last run to deliver", len(self._entries))

    def _rewrite(self) -> None:
        """Replace the journal by the live entries (atomically), then append to it."""
        assert self.path is not None
        if self._file is not None:
            self._file.close()
            self._file = None
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for entry in self._entries.values():
                f.write(json.dumps({"a": entry.record()}, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._dead = 0
        # Line-buffered: every record reaches the OS at once, so a daemon crash loses none.
        self._file = self.path.open("a", encoding="utf-8", buffering=1)

    def _journal(self, rec: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
        except OSError as e:
            self._persist_failed(e)

    def _maybe_compact(self) -> None:
        if self._file is not None and self._dead >= COMPACT_MIN_DEAD and \
                self._dead > 2 * len(self._entries):
            try:
                self._rewrite()
            except OSError as e:
                self._persist_failed(e)

    def _persist_failed(self, e: OSError) -> None:
        # Delivery matters more than the journal: go on in memory, say so once.
        self.persist_error = f"{self.path}: {e.strerror or e}"
        log.error("MQTT outbox not persisted: %s", self.persist_error)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None

    def close(self) -> None:
        """Compact the journal to what is still waiting and sync it to disk."""
        if self._file is None:
            return
        try:
            self._rewrite()
        except OSError as e:
            self._persist_failed(e)
        if self._file is not None:
            self._file.close()
            self._file = None
