"""The outbox journal on disk: one JSON record per line, read defensively, written atomically.

The journal is a file the daemon wrote itself, but a crash, a full disk or a stray editor can
leave anything in it: a torn last line, random bytes, valid JSON describing a message that
cannot be published (a wildcard topic). Reading never raises for its content: every line is
parsed and validated on its own, what is bad is skipped and counted by reason, and a damaged
journal is copied aside before it is rewritten, so the evidence survives the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent import jsonsafe
from agent.errors import AgentError
from agent.mqtt.topics import RANK_EVENT, RANK_FINAL, RANK_PARTIAL

log = logging.getLogger(__name__)

# A record holds one MQTT message; replies and events are far below this.
MAX_LINE = 4 * 2**20
MAX_TOPIC_BYTES = 65_535  # the MQTT limit on a topic name
RANKS = frozenset({RANK_PARTIAL, RANK_EVENT, RANK_FINAL})
# Copies of damaged journals kept beside it (older ones are removed).
KEEP_CORRUPT = 3
_READ = 1 << 16


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


class BadRecord(ValueError):
    """A journal line that is not a valid record; `reason` is a short category."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def valid_topic(topic: object) -> bool:
    """Whether `topic` can be published: non-empty, no wildcards or NUL, <= 65535 bytes."""
    if not isinstance(topic, str) or not topic or any(c in topic for c in "+#\0"):
        return False
    try:
        return len(topic.encode("utf-8")) <= MAX_TOPIC_BYTES
    except UnicodeEncodeError:  # lone surrogates
        return False


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_record(line: bytes) -> Entry | int:
    """An `add` record as its Entry, a `del` record as its seq; BadRecord otherwise."""
    try:
        rec = jsonsafe.loads(line, max_bytes=MAX_LINE, max_depth=4, what="journal line")
    except AgentError as e:
        raise BadRecord("not JSON" if e.code != "too_large" else "too long") from None
    if not isinstance(rec, dict) or len(rec) != 1:
        raise BadRecord("not a record")
    if "d" in rec:
        seq = rec["d"]
        if not _int(seq) or seq < 1:
            raise BadRecord("bad seq")
        return int(seq)
    a = rec.get("a")
    if not isinstance(a, dict) or set(a) != {"seq", "topic", "payload", "qos", "rank", "kind"}:
        raise BadRecord("not a record")
    if not _int(a["seq"]) or a["seq"] < 1:
        raise BadRecord("bad seq")
    if not valid_topic(a["topic"]):
        raise BadRecord("bad topic")
    if a["qos"] not in (0, 1, 2) or not _int(a["qos"]):
        raise BadRecord("bad qos")
    if a["rank"] not in RANKS or not _int(a["rank"]):
        raise BadRecord("bad rank")
    if not isinstance(a["payload"], str) or not isinstance(a["kind"], str) or \
            len(a["kind"]) > 128:
        raise BadRecord("bad payload")
    return Entry(int(a["seq"]), a["topic"], a["payload"], int(a["qos"]), int(a["rank"]),
                 a["kind"])


def _lines(f: IO[bytes]) -> Iterator[tuple[bytes | None, bool]]:
    """(line, complete) pairs; a line longer than MAX_LINE comes back as None."""
    buf = b""
    overlong = False
    while chunk := f.read(_READ):
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line, buf = buf[:nl], buf[nl + 1:]
            yield (None if overlong else line), True
            overlong = False
        if len(buf) > MAX_LINE:
            # Drop what we hold: a line this long is never a record, and must not fill memory.
            buf, overlong = b"", True
    if buf or overlong:
        yield (None if overlong else buf), False


@dataclass
class Loaded:
    """What a journal held: the live entries, in seq order, and what was skipped and why."""

    entries: dict[int, Entry] = field(default_factory=dict)
    max_seq: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def bad(self) -> int:
        """Lines skipped."""
        return sum(self.skipped.values())

    def describe(self) -> str:
        """`3 lines skipped (1 bad topic, 1 not JSON, 1 truncated last line)`."""
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return f"{self.bad} unreadable line{'s' if self.bad != 1 else ''} skipped ({why})"


def read_journal(path: Path) -> Loaded:
    """Replay a journal: adds and deletes, every line validated; never raises for content."""
    out = Loaded()
    with path.open("rb") as f:
        for line, complete in _lines(f):
            if line is None:
                out.skipped["too long"] += 1
                continue
            if not line.strip():
                continue
            try:
                rec = parse_record(line)
            except BadRecord as e:
                # A crash mid-write tears the last line: a category of its own.
                out.skipped["truncated last line" if not complete else e.reason] += 1
                continue
            if isinstance(rec, Entry):
                if rec.seq in out.entries or rec.seq <= out.max_seq:
                    out.skipped["duplicate seq"] += 1
                    continue
                out.entries[rec.seq] = rec
                out.max_seq = rec.seq
            else:
                out.entries.pop(rec, None)
    return out


def set_aside(path: Path) -> Path | None:
    """Copy a damaged journal to `<name>.corrupt-<time>` (the newest KEEP_CORRUPT kept)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    copy = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while copy.exists():
        n += 1
        copy = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        shutil.copyfile(path, copy)
    except OSError as e:
        log.error("cannot keep a copy of the damaged journal %s: %s", path, e.strerror or e)
        return None
    old = sorted(path.parent.glob(f"{path.name}.corrupt-*"), key=lambda p: p.stat().st_mtime)
    for p in old[:-KEEP_CORRUPT]:
        with contextlib.suppress(OSError):
            p.unlink()
    return copy


def add_line(entry: Entry) -> str:
    """The journal line of an add."""
    return json.dumps({"a": entry.record()}, separators=(",", ":")) + "\n"


def del_line(seq: int) -> str:
    """The journal line of a delete (acknowledged or dropped)."""
    return f'{{"d":{seq}}}\n'


def write_snapshot(tmp: Path, entries: Iterable[Entry]) -> None:
    """Write `entries` as a fresh journal to `tmp` and fsync it (blocking: run it off-loop)."""
    with tmp.open("w", encoding="utf-8") as f:
        for entry in entries:
            f.write(add_line(entry))
        f.flush()
        os.fsync(f.fileno())
