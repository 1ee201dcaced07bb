"""The MQTT outbox and its journal parser at their edges: limits, failures, compaction, and
every reason a journal line is skipped. Pure (no broker); each test pins a decision that
mutation testing (bench/mutants.py) found unguarded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from agent.mqtt import journal
from agent.mqtt.journal import (
    MAX_LINE,
    MAX_TOPIC_BYTES,
    BadRecord,
    Entry,
    add_line,
    parse_record,
    read_journal,
    set_aside,
)
from agent.mqtt.outbox import COMPACT_MIN_DEAD, Outbox
from agent.mqtt.topics import RANK_EVENT, RANK_FINAL, RANK_PARTIAL

# ---- the outbox ------------------------------------------------------------------------------


def test_size_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match=r"^maxsize must be >= 1$"):
        Outbox(0)
    ob = Outbox(1)
    assert ob.put("t", "a", 1, RANK_FINAL, "asr.final") is not None
    ob.put("t", "b", 1, RANK_FINAL, "asr.final")
    assert [e.payload for e in ob.entries()] == ["b"] and ob.dropped == {"asr.final": 1}


def test_a_new_journal_and_its_directories(tmp_path: Path) -> None:
    path = tmp_path / "state" / "deep" / "outbox.jsonl"
    ob = Outbox(5, path)
    assert path.exists() and path.read_text() == ""
    assert (ob.corrupt_lines, ob.damage, ob.corrupt_copy, ob.persist_error) == (0, None, None,
                                                                                None)
    assert ob.compactions == 1  # opening rewrites the journal once
    assert Outbox(5).compactions == 0 and Outbox(5).persist_error is None
    assert [p.name for p in path.parent.iterdir()] == ["outbox.jsonl"]  # no temp file left


def test_an_unusable_journal_directory_goes_on_in_memory(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    path = tmp_path / "a-file" / "outbox.jsonl"
    ob = Outbox(5, path)
    assert ob.persist_error is not None and ob.persist_error.startswith(f"{path}: ")
    e = ob.put("t", "x", 1, RANK_FINAL, "asr.final")
    assert e is not None and ob.take() == e
    ob.ack(e.seq)
    assert len(ob) == 0
    ob.close()


def test_a_failing_journal_write_goes_on_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    ob = Outbox(5, path)
    assert ob._file is not None
    ob._file.close()
    ob._file = path.open("r", encoding="utf-8")  # writes now fail, as on a broken disk
    e = ob.put("t", "x", 1, RANK_FINAL, "asr.final")
    assert e is not None and ob.persist_error is not None and str(path) in ob.persist_error
    assert ob._file is None  # stops trying: one error, not one per message
    ob.put("t", "y", 1, RANK_FINAL, "asr.final")
    assert len(ob) == 2 and path.read_text() == ""


def test_drops_are_logged_once_then_every_hundred(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.mqtt.outbox")
    ob = Outbox(1)
    ob.put("t", "final", 1, RANK_FINAL, "asr.final")
    for i in range(250):
        assert ob.put("t", f"p{i}", 0, RANK_PARTIAL, "asr.partial") is None
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [f"MQTT outbox full (1): {n} messages dropped (asr.partial {n})"
                    for n in (1, 100, 200)]


def cycle(ob: Outbox, n: int) -> None:
    """`n` messages queued and acknowledged: 2n dead journal lines."""
    for _ in range(n):
        e = ob.put("t", "x", 1, RANK_EVENT, "e")
        assert e is not None
        ob.ack(e.seq)


async def test_compaction_at_the_threshold_inline(tmp_path: Path) -> None:
    # maxsize 200: the threshold is 2 x 200 = 400 dead lines (over COMPACT_MIN_DEAD).
    assert 2 * 200 > COMPACT_MIN_DEAD
    path = tmp_path / "outbox.jsonl"
    ob = Outbox(200, path)  # not offloaded: compacts inline even on a running loop
    cycle(ob, 199)
    assert ob.compactions == 1 and len(path.read_text().splitlines()) == 398
    cycle(ob, 1)
    assert ob.compactions == 2 and path.read_text() == ""
    cycle(ob, 199)
    assert ob.compactions == 2
    cycle(ob, 1)
    assert ob.compactions == 3
    small = Outbox(10, tmp_path / "small.jsonl")  # then COMPACT_MIN_DEAD rules
    cycle(small, COMPACT_MIN_DEAD // 2 - 1)
    assert small.compactions == 1
    cycle(small, 1)
    assert small.compactions == 2


def test_no_journal_no_compaction() -> None:
    ob = Outbox(10)
    cycle(ob, COMPACT_MIN_DEAD)
    assert ob.compactions == 0 and len(ob) == 0


async def test_offloaded_compaction_replays_what_came_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    ob = Outbox(200, path, offload=True)
    keep = ob.put("t", "kept", 1, RANK_FINAL, "asr.final")
    cycle(ob, 200)  # the threshold: a snapshot is written in a thread ...
    assert ob._compacting is not None and ob.compactions == 1
    # ... while these go to the old file, to be replayed onto the new one.
    during = [ob.put("t", f"d{i}", 1, RANK_EVENT, "e") for i in range(3)]
    assert during[0] is not None
    ob.ack(during[0].seq)
    cycle(ob, 2)
    await asyncio.wait_for(asyncio.shield(ob._compacting), 10)
    assert ob.compactions == 2 and ob._compacting is None
    live = {e.seq for e in ob.entries()}
    assert keep is not None and live == {keep.seq, during[1].seq, during[2].seq}  # type: ignore
    assert set(read_journal(path).entries) == live
    # The deletes replayed onto the new file count as dead lines: 3 of them, 6 lines.
    cycle(ob, 196)
    assert ob.compactions == 2
    cycle(ob, 1)
    await asyncio.wait_for(asyncio.shield(ob._compacting), 10)  # type: ignore[arg-type]
    assert ob.compactions == 3
    await ob.aclose()


async def test_aclose_waits_for_a_compaction_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    ob = Outbox(200, path, offload=True)
    keep = ob.put("t", "kept", 1, RANK_FINAL, "asr.final")
    cycle(ob, 200)
    assert ob._compacting is not None
    await ob.aclose()
    assert ob.compactions == 2  # the compaction finished (and was applied) first
    assert keep is not None and set(read_journal(path).entries) == {keep.seq}
    assert sorted(os.listdir(tmp_path)) == ["outbox.jsonl"]


def test_compaction_and_close_failures_go_on_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    ob = Outbox(200, path)
    ob._tmp().mkdir()  # the snapshot cannot be written: its temp name is a directory
    cycle(ob, 200)
    assert ob.persist_error is not None and str(path) in ob.persist_error
    assert ob.compactions == 1 and len(ob) == 0
    ob2 = Outbox(5, tmp_path / "b.jsonl")
    ob2.put("t", "x", 1, RANK_FINAL, "asr.final")
    ob2._tmp().mkdir()
    ob2.close()
    assert ob2.persist_error is not None and "b.jsonl" in ob2.persist_error


def test_a_lowered_size_drops_by_rank_and_counts_kinds(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    ob = Outbox(10, path)
    ob.put("t", "p", 0, RANK_PARTIAL, "asr.partial")
    ob.put("t", "e", 1, RANK_EVENT, "utterance.ended")
    ob.put("t", "f", 1, RANK_FINAL, "asr.final")
    again = Outbox(1, path)
    assert [e.payload for e in again.entries()] == ["f"]
    assert again.dropped == {"asr.partial": 1, "utterance.ended": 1}


def test_damage_says_where_the_evidence_is(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    path.write_bytes(add_line(Entry(1, "t", "x", 1, RANK_FINAL, "asr.final")).encode()
                     + b"garbage\n")
    ob = Outbox(5, path)
    assert ob.corrupt_lines == 1 and ob.corrupt_copy is not None and ob.corrupt_copy.exists()
    assert ob.damage == (f"{path}: 1 unreadable line skipped (1 not JSON); the damaged "
                         f"journal is kept as {ob.corrupt_copy.name}")
    assert [e.payload for e in ob.entries()] == ["x"]


# ---- the journal parser ----------------------------------------------------------------------

GOOD = {"seq": 7, "topic": "voice-agent/X/event/asr.final", "payload": "{}", "qos": 1,
        "rank": RANK_FINAL, "kind": "asr.final"}


def line(**changes: object) -> bytes:
    """An add record with some fields changed."""
    return json.dumps({"a": {**GOOD, **changes}}).encode()


@pytest.mark.parametrize("raw,reason", [
    (b"{", "not JSON"),
    (b"\xff\xfe{}", "not JSON"),
    (b'{"a": {"seq": [[[1]]]}}', "not JSON"),  # nested 5 deep: over the journal's 4
    (b"{" + b" " * MAX_LINE + b"}", "too long"),
    (b"[1]", "not a record"),
    (b'{"a": 1}', "not a record"),
    (b'{"d": 1, "a": 2}', "not a record"),
    (b'{"x": 1}', "not a record"),
    (json.dumps({"a": {k: v for k, v in GOOD.items() if k != "kind"}}).encode(), "not a record"),
    (b'{"d": 0}', "bad seq"), (b'{"d": true}', "bad seq"), (b'{"d": "3"}', "bad seq"),
    (line(seq=0), "bad seq"), (line(seq=1.5), "bad seq"), (line(seq=True), "bad seq"),
    (line(topic=""), "bad topic"), (line(topic="a/+/b"), "bad topic"),
    (line(topic="a/#"), "bad topic"), (line(topic="a\0b"), "bad topic"),
    (line(topic=5), "bad topic"),
    (line(topic="x" * (MAX_TOPIC_BYTES + 1)), "bad topic"),
    (line(qos=3), "bad qos"), (line(qos=-1), "bad qos"), (line(qos=True), "bad qos"),
    (line(qos=1.0), "bad qos"),
    (line(rank=99), "bad rank"), (line(rank=True), "bad rank"),
    (line(payload=5), "bad payload"), (line(kind=5), "bad payload"),
    (line(kind="k" * 129), "bad payload"),
])
def test_every_bad_record_has_its_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(BadRecord) as e:
        parse_record(raw)
    assert e.value.reason == reason and str(e.value) == reason


def test_a_lone_surrogate_topic_is_bad() -> None:
    with pytest.raises(BadRecord, match="bad topic"):
        parse_record(b'{"a": {"seq": 1, "topic": "a\\ud800", "payload": "", "qos": 1, '
                     b'"rank": 2, "kind": "e"}}')


@pytest.mark.parametrize("changes", [
    {}, {"qos": 0}, {"qos": 2}, {"kind": "k" * 128}, {"topic": "x" * MAX_TOPIC_BYTES},
    {"payload": "p" * (2 << 20)},  # 2 MiB: over the JSON default limit, under the journal's
])
def test_good_records_at_the_limits(changes: dict[str, object]) -> None:
    e = parse_record(line(**changes))
    assert isinstance(e, Entry) and e.record() == {**GOOD, **changes}
    assert parse_record(b'{"d": 9}') == 9


def test_add_lines_are_compact() -> None:
    e = Entry(1, "t", "p", 1, RANK_FINAL, "k")
    assert add_line(e) == ('{"a":{"seq":1,"topic":"t","payload":"p","qos":1,"rank":'
                           f'{RANK_FINAL},"kind":"k"}}}}\n')


def test_read_journal_skips_each_bad_line_and_reads_on(tmp_path: Path) -> None:
    def add(seq: int) -> bytes:
        return line(seq=seq, payload=f"m{seq}") + b"\n"

    overlong = b'{"a": "' + b"x" * (MAX_LINE + 10) + b'"}\n'
    path = tmp_path / "j.jsonl"
    path.write_bytes(
        b"\n" + add(1) + add(2) + b"\n" + b"not json\n" + b'{"d": 1}\n'
        + add(2)  # a duplicate of a live entry
        + add(1)  # an old seq again (deleted already): also a duplicate
        + b'{"d": 99}\n'  # a delete of something never added: nothing to do
        + overlong + add(3) + overlong + add(4) + b'{"d": 4}\n' + add(4)  # the newest again
        + b'{"a": {"seq": 5, "top')  # torn by a crash
    got = read_journal(path)
    assert sorted(got.entries) == [2, 3] and got.max_seq == 4
    assert got.skipped == {"duplicate seq": 3, "not JSON": 1, "too long": 2,
                           "truncated last line": 1}
    assert got.describe() == ("7 unreadable lines skipped (3 duplicate seq, 1 not JSON, "
                              "2 too long, 1 truncated last line)")
    path.write_bytes(add(1) + b"nope\n")
    assert read_journal(path).describe() == "1 unreadable line skipped (1 not JSON)"


def test_a_line_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    base = len(line(payload=""))
    record = line(payload="p" * (MAX_LINE - base))
    assert len(record) == MAX_LINE
    path = tmp_path / "j.jsonl"
    path.write_bytes(record + b"\n")
    got = read_journal(path)
    assert list(got.entries) == [7] and not got.skipped


def test_damaged_journals_are_kept_newest_three(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "outbox.jsonl"
    path.write_text("damaged\n")
    fixed = time.struct_time((2026, 12, 1, 9, 30, 5, 1, 335, 0))
    monkeypatch.setattr(journal.time, "gmtime", lambda *a: fixed)
    # An older copy whose name sorts last: age is by time, not by name.
    stale = tmp_path / "outbox.jsonl.corrupt-29991231T235959"
    stale.write_text("old")
    os.utime(stale, (1_000_000, 1_000_000))
    names = []
    for _ in range(3):
        copy = set_aside(path)
        assert copy is not None and copy.read_text() == "damaged\n"
        names.append(copy.name)
    assert names == ["outbox.jsonl.corrupt-20261201T093005",
                     "outbox.jsonl.corrupt-20261201T093005-2",
                     "outbox.jsonl.corrupt-20261201T093005-3"]
    kept = sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert kept == sorted(names) and not stale.exists()
    assert all(re.fullmatch(r"outbox\.jsonl\.corrupt-\d{8}T\d{6}(-\d+)?", n) for n in kept)
