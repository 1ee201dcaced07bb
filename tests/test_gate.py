"""The push-to-talk controller: modes, commands, state events and markers."""

from __future__ import annotations

import asyncio

import pytest

from agent.bus import EventBus, Publisher
from agent.errors import GateError
from agent.events import BaseEvent, ErrorEvent, StateChanged
from agent.pipeline.gate import GateController


def make(mode: str, max_hold_s: float = 60.0, events: list[BaseEvent] | None = None
         ) -> tuple[GateController, list[StateChanged]]:
    """A gate whose published events are captured (state changes returned, all in `events`)."""
    bus = EventBus()
    states: list[StateChanged] = []
    orig = bus.publish

    def capture(ev):  # type: ignore[no-untyped-def]
        if isinstance(ev, StateChanged):
            states.append(ev)
        if events is not None:
            events.append(ev)
        orig(ev)

    bus.publish = capture  # type: ignore[method-assign]
    return GateController(mode, Publisher(bus, "d"), max_hold_s), states  # type: ignore[arg-type]


async def test_ptt_start_stop_changes_state_and_queues_markers() -> None:
    gate, states = make("ptt")
    assert gate.state == "closed"
    gate.handle("start")
    sid = gate.session_id
    gate.handle("start")  # idempotent while held
    gate.handle("stop")
    assert gate.state == "closed"
    assert [(s.previous, s.state) for s in states] == [("closed", "open"), ("open", "closed")]
    assert [(m.kind, m.session_id) for m in gate.drain()] == [("open", sid), ("close", sid)]
    assert gate.drain() == []
    gate.handle("start")
    assert gate.session_id != sid  # every hold is a new session


async def test_ptt_toggle_start_toggles() -> None:
    gate, states = make("ptt_toggle")
    gate.handle("start")
    assert gate.is_open
    gate.handle("start")
    assert not gate.is_open
    gate.handle("toggle")
    assert gate.is_open
    assert len(states) == 3


async def test_vad_mode_refuses_start_stop_but_accepts_reset() -> None:
    gate, _ = make("vad")
    assert gate.is_open
    with pytest.raises(GateError) as e:
        gate.handle("start")
    assert e.value.code == "wrong_mode"
    gate.handle("reset")
    assert gate.is_open
    assert [m.kind for m in gate.drain()] == ["open", "reset"]


async def test_unknown_command_is_a_clear_error() -> None:
    gate, states = make("ptt")
    with pytest.raises(GateError) as e:
        gate.handle("launch")
    assert e.value.code == "unknown_command" and "start" in e.value.message
    assert states == [] and gate.drain() == []


async def test_reset_closes_and_abandons() -> None:
    gate, _ = make("ptt")
    gate.handle("start")
    gate.handle("reset")
    assert not gate.is_open
    assert [m.kind for m in gate.drain()] == ["open", "reset", "close"]


async def test_gate_left_open_closes_itself() -> None:
    events: list[BaseEvent] = []
    gate, states = make("ptt", max_hold_s=0.05, events=events)
    closed = asyncio.Event()
    orig = gate._set

    def watch(state, reason):  # type: ignore[no-untyped-def]
        orig(state, reason)
        if state == "closed":
            closed.set()

    gate._set = watch  # type: ignore[method-assign]
    gate.handle("start")
    sid = gate.session_id
    await asyncio.wait_for(closed.wait(), 5)
    assert not gate.is_open
    assert states[-1].reason == "max_hold" and states[-1].session_id == sid
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert [(e.stage, e.code, e.session_id) for e in errors] == [("gate", "max_hold", sid)]
    assert errors[0].message == "gate open longer than 0.05 s"
    assert [(m.kind, m.reason) for m in gate.drain()] == [("open", "command"),
                                                          ("close", "max_hold")]


async def test_a_stop_in_time_disarms_the_hold_timer() -> None:
    gate, states = make("ptt", max_hold_s=0.05)
    gate.handle("start")
    gate.handle("stop")
    gate.handle("start")  # a new hold gets its own full timer
    timer = gate._hold_timer
    assert timer is not None and not timer.cancelled()
    gate.handle("stop")
    assert timer.cancelled() and gate._hold_timer is None
    assert [s.reason for s in states] == ["command"] * 4


def test_the_default_hold_limit_is_a_minute() -> None:
    assert GateController("ptt", Publisher(EventBus(), "d")).max_hold_s == 60.0


def test_works_without_an_event_loop() -> None:
    # Synchronous callers (the CLI, tools) get no hold timer, and nothing breaks.
    gate, states = make("ptt")
    gate.start()
    assert gate.is_open and gate._hold_timer is None
    gate.stop()
    assert not gate.is_open and len(states) == 2


async def test_snapshot_sessions_and_reasons() -> None:
    gate, states = make("ptt")
    assert gate.snapshot() == {"mode": "ptt", "state": "closed", "session_id": None}
    assert gate.session_id is None and gate.commands == 0
    gate.start()  # called directly: the default reason
    sid = gate.session_id
    assert sid and gate.snapshot() == {"mode": "ptt", "state": "open", "session_id": sid}
    gate.handle("reset", reason="mqtt")
    assert [(m.kind, m.session_id, m.reason) for m in gate.drain()] == [
        ("open", sid, "command"), ("reset", sid, "mqtt"), ("close", sid, "mqtt")]
    assert [(s.session_id, s.state, s.previous, s.mode, s.reason) for s in states] == [
        (sid, "open", "closed", "ptt", "command"), (sid, "closed", "open", "ptt", "mqtt")]
    for name in ("start", "stop", "toggle"):
        getattr(gate, name)()
    assert [s.reason for s in states[2:]] == ["command"] * 3
    assert gate.commands == 1  # only handle() counts
    gate.handle("toggle")
    gate.handle("toggle")
    assert gate.commands == 3 and gate.is_open


async def test_toggle_in_ptt_mode_opens_and_closes() -> None:
    gate, states = make("ptt")
    assert gate.toggle()["state"] == "open"
    assert gate.toggle()["state"] == "closed"
    assert [s.state for s in states] == ["open", "closed"]


async def test_vad_mode_has_a_session_from_the_start() -> None:
    gate, _ = make("vad")
    assert gate.session_id and gate.is_open
    assert [(m.kind, m.session_id, m.reason) for m in gate.drain()] == [
        ("open", gate.session_id, "vad_mode")]
    for cmd in ("start", "stop", "toggle"):
        with pytest.raises(GateError) as e:
            gate.handle(cmd)
        assert e.value.message == (f"{cmd!r} needs gate.mode ptt or ptt_toggle; the gate is "
                                   "in vad mode (always listening)")


async def test_mute_is_half_duplex_and_an_explicit_open_unmutes() -> None:
    gate, _ = make("ptt")
    assert gate.muted is False and gate.muted_samples == 0
    gate.mute(True)
    assert gate.muted is True
    gate.handle("start")  # the user talks over the daemon: barge-in
    assert gate.muted is False
    gate.mute(True)
    gate.handle("stop")
    assert gate.muted is True  # closing does not unmute


def test_unknown_command_lists_the_known_ones() -> None:
    gate, _ = make("ptt")
    with pytest.raises(GateError) as e:
        gate.handle("launch")
    assert e.value.message == ("unknown command 'launch'; expected one of start, stop, reset, "
                               "toggle")


def test_reset_called_directly_and_ids() -> None:
    gate, states = make("ptt")
    gate.start()
    sid = gate.session_id
    assert sid is not None and len(sid) == 16 and int(sid, 16) >= 0  # 16 hex characters
    gate.reset()
    assert [(m.kind, m.reason) for m in gate.drain()] == [
        ("open", "command"), ("reset", "command"), ("close", "command")]
    assert states[-1].reason == "command"
