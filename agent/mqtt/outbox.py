"""Messages not yet acknowledged by the broker: bounded, ordered, persisted, counted drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter, deque
from pathlib import Path
from typing import IO

from agent.mqtt.journal import (
    Entry,
    Loaded,
    add_line,
    del_line,
    read_journal,
    set_aside,
    write_snapshot,
)

__all__ = ["Entry", "Outbox"]

log = logging.getLogger(__name__)

# Rewrite the journal once it holds this many dead lines (and at least twice the outbox size,
# so the rewrite, O(live entries), costs O(1) per message on average). A long outage with a
# small outbox drops a message per event: the journal stays near this size, not unbounded.
COMPACT_MIN_DEAD = 256


class Outbox:
    """A bounded, ordered queue of outgoing messages, removed only once the broker has them.

    With a `path` it is journalled as JSON lines (one `add` per message, one `del` per
    acknowledgement or drop), so a daemon restart (or crash) loses nothing either. Writes go
    to the page cache, not to disk (no fsync per message): a daemon crash is survived, a power
    cut may lose the last seconds. When full, the oldest entry of the lowest rank is dropped
    (partials, then other events, finals last) and counted per kind.

    `offload=True` (the daemon) compacts in a worker thread while appends go on; otherwise
    compaction is inline. `load=False` defers reading the journal to `open()`, so that a
    caller on an event loop can run it in a thread.
    """

    def __init__(self, maxsize: int, path: Path | None = None, *, offload: bool = False,
                 load: bool = True) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.path = path
        self.offload = offload
        self._entries: dict[int, Entry] = {}  # insertion (= seq) order
        self._by_rank: dict[int, dict[int, None]] = {}  # rank -> seqs, oldest first
        self._unsent: deque[int] = deque()
        self._seq = 0
        self._ready = asyncio.Event()  # something to hand out
        self._empty = asyncio.Event()  # nothing waiting for an acknowledgement
        self._empty.set()
        self._file: IO[str] | None = None
        self._dead = 0  # journal lines that no longer describe a live entry
        self._compacting: asyncio.Future[None] | None = None
        self._pending: list[str] | None = None  # lines written while a compaction runs
        self._closed = False
        self.compactions = 0
        self.dropped: Counter[str] = Counter()
        self.corrupt_lines = 0
        self.damage: str | None = None  # what was wrong with the journal at start
        self.corrupt_copy: Path | None = None  # where the damaged journal was copied
        self.persist_error: str | None = None
        if path is not None and load:
            self.open()

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
        self._journal(add_line(entry))
        self._unsent.append(entry.seq)
        self._ready.set()
        self._empty.clear()
        self._maybe_compact()
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
        self._journal(del_line(seq))
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

    def open(self) -> None:
        """Load the journal (skipping what is damaged), then compact it (blocking I/O)."""
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._load(self.path)
            self._rewrite()
        except OSError as e:
            self._persist_failed(e)

    def _load(self, path: Path) -> None:
        loaded = read_journal(path)
        self.corrupt_lines = loaded.bad
        if loaded.bad:
            # Keep the evidence before the rewrite below replaces it.
            self.corrupt_copy = set_aside(path)
            self.damage = f"{path}: {loaded.describe()}" + (
                f"; the damaged journal is kept as {self.corrupt_copy.name}"
                if self.corrupt_copy else "")
            log.warning("MQTT outbox journal %s", self.damage)
        self._restore(loaded)

    def _restore(self, loaded: Loaded) -> None:
        for entry in loaded.entries.values():
            self._add(entry)
        self._seq = max(self._seq, loaded.max_seq)
        overflow = len(self._entries) - self.maxsize
        for _ in range(max(0, overflow)):  # outbox_size was lowered since
            lowest = min(r for r, seqs in self._by_rank.items() if seqs)
            victim = self._entries.pop(next(iter(self._by_rank[lowest])))
            del self._by_rank[lowest][victim.seq]
            self._count_drop(victim.kind)
        self._unsent = deque(self._entries)
        if self._entries:
            self._ready.set()
            self._empty.clear()
            log.info("MQTT outbox: %d messages from the last run to deliver", len(self._entries))

    def _tmp(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".tmp")

    def _rewrite(self) -> None:
        """Replace the journal by the live entries (atomically), then append to it."""
        assert self.path is not None
        if self._file is not None:
            self._file.close()
            self._file = None
        write_snapshot(self._tmp(), list(self._entries.values()))
        os.replace(self._tmp(), self.path)
        self._dead = 0
        self.compactions += 1
        self._reopen()

    def _reopen(self) -> None:
        assert self.path is not None
        # Line-buffered: every record reaches the OS at once, so a daemon crash loses none.
        self._file = self.path.open("a", encoding="utf-8", buffering=1)

    def _journal(self, line: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(line)
        except OSError as e:
            self._persist_failed(e)
            return
        if self._pending is not None:
            self._pending.append(line)

    def _maybe_compact(self) -> None:
        if self._file is None or self._compacting is not None or \
                self._dead < max(COMPACT_MIN_DEAD, 2 * self.maxsize):
            return
        loop = None
        if self.offload:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
        if loop is None:
            try:
                self._rewrite()
            except OSError as e:
                self._persist_failed(e)
            return
        # Snapshot now (entries are immutable); the thread writes and fsyncs it while appends
        # go on to the old file, and are replayed onto the new one before it takes over.
        self._pending = []
        snapshot = list(self._entries.values())
        self._compacting = loop.run_in_executor(None, write_snapshot, self._tmp(), snapshot)
        self._compacting.add_done_callback(self._compacted)

    def _compacted(self, fut: asyncio.Future[None]) -> None:
        pending, self._pending, self._compacting = self._pending or [], None, None
        if fut.cancelled() or self._file is None or self._closed:
            return
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, OSError):
                self._persist_failed(exc)
            else:
                log.error("MQTT outbox compaction failed: %r", exc)
            return
        assert self.path is not None
        try:
            with self._tmp().open("a", encoding="utf-8") as f:
                f.writelines(pending)
            os.replace(self._tmp(), self.path)
        except OSError as e:
            self._persist_failed(e)
            return
        self._file.close()
        self._reopen()
        self._dead = 2 * sum(1 for line in pending if line.startswith('{"d"'))
        self.compactions += 1

    def _persist_failed(self, e: OSError) -> None:
        # Delivery matters more than the journal: go on in memory, say so once.
        self.persist_error = f"{self.path}: {e.strerror or e}"
        log.error("MQTT outbox not persisted: %s", self.persist_error)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None

    async def aclose(self) -> None:
        """`close()` in a worker thread, after any compaction in flight (for the daemon)."""
        if self._compacting is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._compacting)
        self._closed = True
        snapshot = list(self._entries.values())
        await asyncio.to_thread(self._close, snapshot)

    def close(self) -> None:
        """Compact the journal to what is still waiting and sync it to disk."""
        self._closed = True
        self._close(list(self._entries.values()))

    def _close(self, snapshot: list[Entry]) -> None:
        f, self._file = self._file, None  # later puts stay in memory: we are leaving
        if f is None:
            return
        f.close()
        assert self.path is not None
        try:
            write_snapshot(self._tmp(), snapshot)
            os.replace(self._tmp(), self.path)
        except OSError as e:
            self._persist_failed(e)
