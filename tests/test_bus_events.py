"""Typed events and the bounded fan-out bus."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.bus import EventBus, Publisher
from agent.events import EVENT_TYPES, ErrorEvent, SpeechStarted, UtteranceEnded, parse_event


def test_events_round_trip_through_json() -> None:
    ev = UtteranceEnded(device_id="d1", session_id="s", utterance_id="u", audio_start_s=1.0,
                        audio_end_s=2.5, duration_s=1.5, reason="silence")
    back = parse_event(ev.model_dump_json())
    assert back == ev
    assert isinstance(back, UtteranceEnded)
    assert {"state.changed", "speech.started", "speech.ended", "utterance.started",
            "utterance.ended", "error"} <= set(EVENT_TYPES)


def test_events_are_frozen_and_strict() -> None:
    ev = SpeechStarted(device_id="d", audio_offset_s=0.5)
    with pytest.raises(ValidationError):
        ev.audio_offset_s = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        parse_event({"type": "speech.started", "device_id": "d", "audio_offset_s": 1, "pcm": []})
    with pytest.raises(ValidationError):
        parse_event({"type": "no.such.event", "device_id": "d"})


async def test_fan_out_to_every_subscriber_in_order() -> None:
    bus = EventBus()
    pub = Publisher(bus, "dev")
    a, b = bus.subscribe(name="a"), bus.subscribe(name="b", types=["error"])
    for i in range(5):
        pub.emit(SpeechStarted, audio_offset_s=float(i))
    pub.emit(ErrorEvent, stage="x", code="y", message="z")
    bus.close()
    got_a = [e async for e in a]
    got_b = [e async for e in b]
    assert [e.type for e in got_a] == ["speech.started"] * 5 + ["error"]
    assert [getattr(e, "audio_offset_s", None) for e in got_a[:5]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(e.device_id == "dev" for e in got_a)
    assert [e.type for e in got_b] == ["error"]


async def test_slow_subscriber_loses_oldest_and_counts_it() -> None:
    bus = EventBus()
    pub = Publisher(bus, "dev")
    slow = bus.subscribe(maxsize=10, name="slow")
    fast = bus.subscribe(maxsize=1000, name="fast")
    for i in range(25):
        pub.emit(SpeechStarted, audio_offset_s=float(i))
    bus.close()
    kept = [e async for e in slow]
    assert slow.dropped == 16  # 25 events + close marker into 10 slots
    assert [e.audio_offset_s for e in kept] == [float(i) for i in range(16, 25)]  # type: ignore[attr-defined]
    assert len([e async for e in fast]) == 25 and fast.dropped == 0


