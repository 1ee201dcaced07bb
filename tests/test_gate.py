"""The push-to-talk controller: modes, commands, state events and markers."""

from __future__ import annotations

import asyncio

import pytest

from agent.bus import EventBus, Publisher
from agent.errors import GateError
from agent.events import StateChanged
from agent.pipeline.gate import GateController


def make(mode: str, max_hold_s: float = 60.0) -> tuple[GateController, list[StateChanged]]:
    bus = EventBus()
    states: list[StateChanged] = []
    orig = bus.publish

    def capture(ev):  # type: ignore[no-untyped-def]
        if isinstance(ev, StateChanged):
            states.append(ev)
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
    gate, states = make("ptt", max_hold_s=0.05)
    gate.handle("start")
    await asyncio.sleep(0.15)
    assert not gate.is_open
    assert states[-1].reason == "max_hold"
