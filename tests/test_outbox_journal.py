"""The MQTT outbox journal: damaged journals never stop a start, and it stays small.

The reader validates every line on its own (topic, qos, seq, rank), skips and counts what is
bad, keeps a copy of a damaged journal aside and says so; compaction runs during an outage
too, in a worker thread. The last test starts a real daemon on a damaged journal.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from pathlib import Path

import pytest

from agent.mqtt import outbox as outbox_module
from agent.mqtt.journal import MAX_LINE, read_journal
from agent.mqtt.outbox import COMPACT_MIN_DEAD, Outbox
from agent.mqtt.service import outbox_path
from agent.mqtt.topics import RANK_EVENT, RANK_FINAL

from .mosquitto import Mosquitto, Subscriber, have_mosquitto
from .test_abuse import config, running


def add(seq: int, topic: str = "voice-agent/j/event/asr.final", qos: object = 1,
        rank: object = RANK_FINAL, payload: object = None, kind: str = "asr.final") -> bytes:
    rec = {"seq": seq, "topic": topic, "payload": payload if payload is not None else
           json.dumps({"type": kind, "n": seq}), "qos": qos, "rank": rank, "kind": kind}
    return json.dumps({"a": rec}).encode() + b"\n"


def damaged_journal(rng: random.Random) -> tuple[bytes, list[int]]:
    """A journal as a crash, a bad disk and a stray editor leave it; the seqs that are valid."""
    noise = bytes(rng.randrange(256) for _ in range(4000)).replace(b"\n", b"")
    body = (add(1) + add(2) + b'{"d":1}\n'
            + noise[:1500] + b"\n"  # random bytes (not UTF-8 either)
            + add(3, topic="voice-agent/j/event/#")  # valid JSON, a wildcard topic
            + add(4, qos=7) + add(5, rank=9) + add(6, qos=True) + add(7, payload=["x"])
            + add(2)  # a duplicate seq
            + b'{"d": "x"}\n' + b"[1, 2]\n" + b"[" * 10_000 + b"\n"
            + add(8) + noise[1500:3000] + b"\n" + add(9)
            + add(10)[:40])  # torn by the crash
    return body, [2, 8, 9]


def test_every_line_is_validated_on_its_own(tmp_path: Path) -> None:
    body, valid = damaged_journal(random.Random(9))
    path = tmp_path / "j.jsonl"
    path.write_bytes(body)
    loaded = read_journal(path)
    assert list(loaded.entries) == valid
    assert loaded.skipped == {"not JSON": 3, "bad topic": 1, "bad qos": 2, "bad rank": 1,
                              "bad payload": 1, "duplicate seq": 1, "bad seq": 1,
                              "not a record": 1, "truncated last line": 1}
    assert loaded.max_seq == 9 and "12 unreadable lines skipped" in loaded.describe()


def test_random_bytes_and_huge_lines_never_stop_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.jsonl"
    path.parent.mkdir()
    rng = random.Random(4)
    blob = bytes(rng.randrange(256) for _ in range(200_000))
    path.write_bytes(blob + b"\0" * (MAX_LINE + 10))  # and one line over the limit
    ob = Outbox(100, path)
    assert len(ob) == 0 and ob.corrupt_lines > 100
    assert ob.damage is not None and "too long" in ob.damage
    assert ob.corrupt_copy is not None and ob.corrupt_copy.read_bytes()[:len(blob)] == blob
    assert path.read_bytes() == b""  # rewritten to what was live: nothing
    e = ob.put("voice-agent/j/event/x", "{}", 1, RANK_EVENT, "x")
    assert e is not None and e.seq == 1
    ob.close()
    for _ in range(5):  # damaged again and again: only the newest copies are kept
        path.write_bytes(b"\xff\n")
        Outbox(100, path).close()
    assert len(list(path.parent.glob("outbox.jsonl.corrupt-*"))) == 3


async def test_compacted_during_a_long_outage_off_the_loop(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    threads: list[str] = []
    real = outbox_module.write_snapshot

    def spy(tmp: Path, entries: list[object]) -> None:
        threads.append(threading.current_thread().name)
        real(tmp, entries)  # type: ignore[arg-type]

    monkeypatch.setattr(outbox_module, "write_snapshot", spy)
    path = tmp_path / "outbox.jsonl"
    ob = Outbox(10, path, offload=True)  # outbox_size 10, the broker gone for good
    longest = 0
    for i in range(5000):
        ob.put(f"voice-agent/j/event/e{i}", json.dumps({"i": i}), 1, RANK_EVENT, "e")
        if i % 50 == 0:
            await asyncio.sleep(0.001)  # the loop turns: compactions finish
            longest = max(longest, len(path.read_bytes().splitlines()))
    assert ob.compactions >= 10 and ob.dropped_total == 4990
    # Without compaction it would reach 10 000 lines (an add and a delete per message); with it,
    # the dead lines before a compaction plus those written while one runs in its thread.
    assert longest < 3 * COMPACT_MIN_DEAD, longest
    assert threads and threading.main_thread().name not in threads[1:]
    await ob.aclose()
    again = Outbox(10, path)
    assert [e.payload for e in again.entries()] == [json.dumps({"i": i})
                                                    for i in range(4990, 5000)]
    assert again.corrupt_lines == 0


async def test_the_daemon_starts_on_a_damaged_journal(tmp_path: Path) -> None:
    if not have_mosquitto():
        pytest.skip("mosquitto not installed (apt-get install mosquitto mosquitto-clients)")
    device = "journal"
    prefix = f"voice-agent/{device}"
    with Mosquitto(persistence=False) as broker:
        cfg = config(broker.port, tmp_path, device)
        journal = outbox_path(cfg)
        journal.parent.mkdir(parents=True, exist_ok=True)
        body, valid = damaged_journal(random.Random(2))
        body = body.replace(b"voice-agent/j/", f"{prefix}/".encode())
        journal.write_bytes(body)
        async with Subscriber(broker.port, [f"{prefix}/event/#"]) as sub, \
                running(cfg, broker) as live:
            got = await sub.wait_for(lambda: [m.json()["n"] for m in sub.on(
                f"{prefix}/event/asr.final")] == valid and sub.messages)
            assert not [m for m in got if "#" in m.topic]
            errors = await sub.wait_for(lambda: [m.json() for m in sub.on(
                f"{prefix}/event/error") if m.json()["code"] == "outbox_corrupt"])
            assert "12 unreadable lines skipped" in errors[0]["message"]
            assert "bad topic" in errors[0]["message"] and "corrupt-" in errors[0]["message"]
            copies = list(journal.parent.glob(journal.name + ".corrupt-*"))
            assert len(copies) == 1 and copies[0].read_bytes() == body
            await live.serving()
