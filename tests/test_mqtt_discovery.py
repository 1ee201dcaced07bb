"""Home Assistant MQTT discovery: the device-based payload, migration, removals, the switch.

Home Assistant itself needs Python >= 3.13 and is not installable here, so `check_device` below
re-states the rules of HA's discovery schemas that our payload touches (required keys per
platform, the enum/timestamp sensor rules, entity categories, URLs, no deprecated
`object_id`), and the templates are rendered with jinja2 against the daemon's real `state`
payload and a real `asr.final` event, as HA renders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.app.capabilities import create_app
from agent.app.commands import CallContext
from agent.app.core import App
from agent.config import load_config
from agent.daemon import Daemon
from agent.errors import GateError
from agent.events import AsrFinal
from agent.mqtt.commands import parse_payload
from agent.mqtt.discovery import (
    LEGACY,
    Discovery,
    device_topic,
    discovery_messages,
    legacy_topics,
    state_path,
)
from agent.mqtt.service import MqttService
from agent.mqtt.topics import Topics

from .mosquitto import Mosquitto, Subscriber, have_mosquitto
from .sources import SilentSource

DEVICE = "disc-dev"
PREFIX = f"voice-agent/{DEVICE}"
T = Topics(PREFIX)
PLATFORMS = {"sensor", "binary_sensor", "button", "switch", "event", "number", "select", "text"}
SENSOR_CLASSES = {"enum", "timestamp", "duration", "data_size", None}
STATE_CLASSES = {"measurement", "total", "total_increasing", None}


def make_app(tmp_path: Path, mode: str = "ptt", **env: str) -> App:
    cfg = load_config(None, env={"VOICE_AGENT__DEVICE_ID": DEVICE, "VOICE_AGENT__GATE__MODE": mode,
                                 "VOICE_AGENT__STATE_DIR": str(tmp_path), **env})
    return create_app(cfg)


def is_topic(t: Any) -> bool:
    return isinstance(t, str) and bool(t) and not any(c in t for c in "+#\0")


def check_device(payload: dict[str, Any]) -> None:
    """HA's device-based discovery rules, as far as our payload uses them."""
    assert set(payload) >= {"dev", "o", "cmps"}
    dev, origin, cmps = payload["dev"], payload["o"], payload["cmps"]
    assert isinstance(dev["identifiers"], list) and dev["identifiers"]
    assert isinstance(origin.get("name"), str) and origin["name"]
    for url in (dev.get("configuration_url"), origin.get("support_url")):
        assert url is None or url.startswith(("http://", "https://", "homeassistant://"))
    assert is_topic(payload["availability_topic"]) and payload["qos"] in (0, 1, 2)
    ids = []
    for obj, c in cmps.items():
        assert obj.replace("_", "").replace("-", "").isalnum(), obj  # HA's object id pattern
        assert c["p"] in PLATFORMS, c
        if set(c) == {"p"}:
            continue  # a removal
        assert "object_id" not in c  # deprecated in HA: entity ids come from the names
        ids.append(c["unique_id"])
        assert isinstance(c["name"], str) and c["name"]
        assert c.get("entity_category") in (None, "diagnostic", "config")
        assert c.get("icon") is None or c["icon"].startswith("mdi:")
        for k, v in c.items():
            if k.endswith("_topic"):
                assert is_topic(v), (obj, k)
        if c["p"] in ("button", "switch"):
            assert is_topic(c["command_topic"])
        if c["p"] == "event":
            assert is_topic(c["state_topic"]) and c["event_types"]
        if c["p"] == "sensor":
            assert c.get("device_class") in SENSOR_CLASSES and c.get("state_class") in STATE_CLASSES
            if c.get("device_class") == "enum":
                assert c["options"] and "state_class" not in c and "unit_of_measurement" not in c
    assert len(ids) == len(set(ids))


def render(template: str, value_json: Any) -> str:
    """A template as Home Assistant renders it (with its `now()` and `timedelta`)."""
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    env.filters["tojson"] = json.dumps
    env.globals.update(now=lambda: dt.datetime.now(dt.UTC), timedelta=dt.timedelta)
    return str(env.from_string(template).render(value_json=value_json))


def state_payload(app: App) -> dict[str, Any]:
    """What the MQTT service publishes on `state`: the snapshot plus its counters."""
    snap: dict[str, Any] = app.snapshot().model_dump(mode="json")
    snap["mqtt"] = {"outbox": 0, "dropped": 3, "connects": 1}
    return snap


def final_event(text: str) -> AsrFinal:
    return AsrFinal(device_id=DEVICE, session_id="s", utterance_id="u1", text=text,
                    language="en", model="whisper-tiny.en-int8", audio_s=1.0, decode_ms=1.0,
                    eos_to_final_ms=1.0, partials=0)


# ---------------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------------


def test_device_payload_follows_home_assistant_schema(tmp_path: Path) -> None:
    app = make_app(tmp_path, VOICE_AGENT__API__ENABLED="true", VOICE_AGENT__API__KEY="sekrit")
    msgs = Discovery(app, T).messages()
    topic, raw = msgs[len(LEGACY)]
    assert topic == f"homeassistant/device/voice-agent-{DEVICE}/config"
    payload = json.loads(raw)
    check_device(payload)
    assert payload["dev"]["identifiers"] == [f"voice-agent-{DEVICE}"]
    assert payload["state_topic"] == T.state and payload["availability_topic"] == T.status
    assert (payload["payload_available"], payload["payload_not_available"]) == ("online",
                                                                                "offline")
    url = payload["dev"]["configuration_url"]
    assert url.startswith("http://") and url.endswith(":8765/") and "sekrit" not in raw
    assert payload["o"]["support_url"]
    cmps = payload["cmps"]
    diagnostic = {o for o, c in cmps.items() if c.get("entity_category") == "diagnostic"}
    assert diagnostic == {"health", "models", "up_since", "audio", "outbox_dropped"}
    assert {o: c["p"] for o, c in cmps.items() if o not in diagnostic} == {
        "last_transcript": "sensor", "transcript": "event", "gate_state": "sensor",
        "listening": "switch", "push_to_talk": "button"}
    # No speaker or emotion analyser: no sensors for them.
    assert "last_speaker" not in cmps and "last_emotion" not in cmps


async def test_templates_render_the_real_state(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    app.tracker.apply(final_event("x" * 300))
    state = state_payload(app)
    cmps = json.loads(discovery_messages(T, DEVICE, speaker=True, emotion=True,
                                         migrate=False)[0][1])["cmps"]
    shown = {o: render(c["value_template"], state) for o, c in cmps.items()
             if c["p"] in ("sensor", "switch")}
    started = dt.datetime.fromisoformat(shown.pop("up_since"))
    assert started.tzinfo is not None and started.second == 0
    assert abs((dt.datetime.now(dt.UTC) - started).total_seconds()) < 120
    assert shown == {"last_transcript": "x" * 255, "gate_state": "closed", "listening": "closed",
                     "health": "starting", "models": "none", "audio": "unavailable",
                     "outbox_dropped": "3", "last_speaker": "None", "last_emotion": "None"}
    for o, c in cmps.items():
        if "options" in c:
            assert shown[o] in c["options"], o  # an enum's state is one of its options
        if "json_attributes_template" in c:
            assert isinstance(json.loads(render(c["json_attributes_template"], state)), dict)
    attrs = json.loads(render(cmps["last_transcript"]["json_attributes_template"], state))
    assert attrs["utterance_id"] == "u1" and len(attrs["text"]) == 300
    # HA shows `unknown` for "None": before the first final, and without speaker/emotion.
    assert render(cmps["last_transcript"]["value_template"], {"last_final": None}) == "None"
    # The event entity: one event per final, from the event topic's own JSON.
    ev = json.loads(render(cmps["transcript"]["value_template"],
                           json.loads(final_event("hello").model_dump_json())))
    assert ev["event_type"] in cmps["transcript"]["event_types"]
    assert (ev["text"], ev["utterance_id"]) == ("hello", "u1")
    assert cmps["transcript"]["state_topic"] == T.event("asr.final")


async def test_switch_and_button_payloads_are_valid_commands(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    cmps = json.loads(discovery_messages(T, DEVICE, migrate=False)[0][1])["cmps"]
    sw, button = cmps["listening"], cmps["push_to_talk"]
    ctx = CallContext(surface="mqtt", client="mqtt", loopback=False)
    name = T.command_name(sw["command_topic"])
    assert name == "listening"
    for payload, state in ((sw["payload_on"], "open"), (sw["payload_on"], "open"),
                           (sw["payload_off"], "closed"), (sw["payload_off"], "closed")):
        data, _ = parse_payload(payload.encode())
        result = await app.commands.dispatch(name, data, ctx)
        # Idempotent: "on" twice stays on (a toggle would have closed it).
        assert result.model_dump()["gate"]["state"] == state == app.gate.state
        shown = render(sw["value_template"], state_payload(app))
        assert shown == (sw["state_on"] if state == "open" else sw["state_off"])
    data, _ = parse_payload(button["payload_press"].encode())
    await app.commands.dispatch(T.command_name(button["command_topic"]) or "", data, ctx)
    assert app.gate.state == "open"  # the button toggles


async def test_listening_command_in_each_gate_mode(tmp_path: Path) -> None:
    ctx = CallContext(surface="internal")
    toggle = make_app(tmp_path, "ptt_toggle")
    for on, state, done in ((True, "open", "start"), (True, "open", "none"),
                            (False, "closed", "stop"), (False, "closed", "none")):
        r = (await toggle.commands.dispatch("listening", {"on": on}, ctx)).model_dump()
        assert (r["gate"]["state"], r["command"]) == (state, done)
    vad = make_app(tmp_path, "vad")
    with pytest.raises(GateError) as e:
        await vad.commands.dispatch("listening", {"on": False}, ctx)
    assert e.value.code == "wrong_mode" and vad.gate.state == "open"
    with pytest.raises(Exception, match="on: "):
        await toggle.commands.dispatch("listening", {"on": "maybe"}, ctx)


def test_an_entity_that_goes_away_is_removed_once(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    disc = Discovery(app, T, state_path(app.cfg))
    # The last run had a speaker analyser; this one (now loaded: ready) has none.
    disc.state.published = {"last_speaker": "sensor", "last_transcript": "sensor"}
    disc.state.migrated, disc.state.prefix = True, "homeassistant"
    app.ready.set()
    (topic, raw), = disc.messages()  # migrated already: the device config alone
    assert topic == device_topic("homeassistant", DEVICE)
    assert json.loads(raw)["cmps"]["last_speaker"] == {"p": "sensor"}
    # Before the models are loaded, an analyser's entity is kept, not flapped away.
    app.ready.clear()
    assert "unique_id" in json.loads(disc.messages()[0][1])["cmps"]["last_speaker"]


# ---------------------------------------------------------------------------------------------
# Against a real mosquitto
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    if not have_mosquitto():
        pytest.skip("mosquitto not installed (apt-get install mosquitto mosquitto-clients)")
    b = Mosquitto(persistence=False)
    b.start()
    try:
        yield b
    finally:
        b.close()


@contextlib.asynccontextmanager
async def mqtt(port: int) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", port) as c:
        yield c


async def retained(port: int, topic: str = "homeassistant/#") -> dict[str, bytes]:
    """What a client connecting now gets: the retained messages (non-empty ones)."""
    async with Subscriber(port, [topic]) as s:
        await asyncio.sleep(0.4)
        return {m.topic: m.payload for m in s.messages if m.retain and m.payload}


async def test_migration_then_removal_on_a_real_broker(broker: Mosquitto,
                                                       tmp_path: Path) -> None:
    app = make_app(tmp_path)
    app.ready.set()
    # What the per-entity release left retained.
    async with mqtt(broker.port) as c:
        for t in legacy_topics("homeassistant", DEVICE):
            await c.publish(t, json.dumps({"unique_id": t, "state_topic": T.state}), qos=1,
                            retain=True)
    assert set(await retained(broker.port)) == set(legacy_topics("homeassistant", DEVICE))
    async with Subscriber(broker.port, ["homeassistant/#"]) as ha, mqtt(broker.port) as c:
        await Discovery(app, T, state_path(app.cfg)).sync(c)
        await ha.wait_for(lambda: len(ha.messages) >= len(LEGACY) * 3 + 1)
    live = [m for m in ha.messages if not m.retain]
    n = len(LEGACY)
    # HA's documented order: migrate each old topic, the device config, then clear them.
    assert [m.topic for m in live[:n]] == legacy_topics("homeassistant", DEVICE)
    assert [m.json() for m in live[:n]] == [{"migrate_discovery": True}] * n
    assert live[n].topic == device_topic("homeassistant", DEVICE)
    assert [(m.topic, m.payload) for m in live[n + 1:]] == [
        (t, b"") for t in legacy_topics("homeassistant", DEVICE)]
    now = await retained(broker.port)
    assert list(now) == [device_topic("homeassistant", DEVICE)]
    check_device(json.loads(now[device_topic("homeassistant", DEVICE)]))
    # The next start migrates nothing again: one message, the device config.
    async with mqtt(broker.port) as c:
        again = Discovery(app, T, state_path(app.cfg))
        await again.sync(c)
        assert again.published == 1

    # Discovery turned off: the device is removed (an empty retained config), once.
    off = make_app(tmp_path, VOICE_AGENT__MQTT__DISCOVERY="false")
    async with mqtt(broker.port) as c:
        d = Discovery(off, T, state_path(off.cfg))
        await d.sync(c)
        assert d.published == 1 + n
    assert await retained(broker.port) == {}
    async with mqtt(broker.port) as c:
        d = Discovery(off, T, state_path(off.cfg))
        await d.sync(c)
        assert d.published == 0  # nothing of ours is left to remove


async def test_daemon_publishes_the_device_and_the_switch_works(broker: Mosquitto,
                                                                tmp_path: Path) -> None:
    env = {"VOICE_AGENT__DEVICE_ID": DEVICE, "VOICE_AGENT__STATE_DIR": str(tmp_path),
           "VOICE_AGENT__ASR__ENABLED": "false", "VOICE_AGENT__MQTT__ENABLED": "true",
           "VOICE_AGENT__MQTT__HOST": "127.0.0.1", "VOICE_AGENT__MQTT__PORT": str(broker.port)}
    d = Daemon(load_config(None, env=env), source=SilentSource())
    svc = next(s for s in d.services if isinstance(s, MqttService))
    task = asyncio.create_task(d.run())
    try:
        await asyncio.wait_for(svc.connected.wait(), 10)
        # The entities follow the loaded models: once they are, the config is published again
        # if it changed (a speaker or emotion model adds a sensor).
        await asyncio.wait_for(d.app.ready.wait(), 60)
        wanted = set(svc.discovery.wanted())
        for _ in range(100):
            configs = await retained(broker.port)
            payload = json.loads(configs[device_topic("homeassistant", DEVICE)])
            if set(payload["cmps"]) == wanted:
                break
            await asyncio.sleep(0.1)
        assert set(payload["cmps"]) == wanted
        check_device(payload)
        sw = payload["cmps"]["listening"]
        # Home Assistant restarted (its birth message): the device config comes again.
        async with Subscriber(broker.port, ["homeassistant/#"]) as ha:
            await ha.publish("homeassistant/status", "online")
            again = await ha.wait_for(lambda: [m for m in ha.messages if not m.retain and
                                               m.topic == device_topic("homeassistant", DEVICE)])
            assert json.loads(again[-1].payload)["cmps"].keys() == payload["cmps"].keys()
        async with Subscriber(broker.port, [f"{PREFIX}/#"]) as sub:
            await sub.publish(sw["command_topic"], sw["payload_on"])
            state = await sub.wait_for(lambda: [m.json() for m in sub.on(T.state) if m.payload
                                                if m.json()["gate"]["state"] == "open"])
            assert render(sw["value_template"], state[-1]) == sw["state_on"]
            reply = await sub.wait_for(lambda: sub.on(f"{PREFIX}/reply"))
            assert reply[0].json()["ok"] is True
    finally:
        d.shutdown()
        assert await asyncio.wait_for(task, 20) == 0


async def test_entities_follow_the_models_once_loaded(broker: Mosquitto, tmp_path: Path) -> None:
    app = make_app(tmp_path)
    path = state_path(app.cfg)
    # The last run had a speaker analyser; this one will have none once loaded.
    disc = Discovery(app, T, path)
    disc.state.published = {"last_speaker": "sensor"}
    disc.state.migrated, disc.state.prefix = True, "homeassistant"
    topic = device_topic("homeassistant", DEVICE)
    async with Subscriber(broker.port, [topic]) as ha, mqtt(broker.port) as c:
        await disc.sync(c)  # at connect, models still loading: the sensor stays
        first = json.loads((await ha.wait_for(lambda: ha.on(topic)))[0].payload)
        assert "unique_id" in first["cmps"]["last_speaker"]
        follower = asyncio.create_task(disc.follow(c))
        await asyncio.sleep(0.2)
        assert len(ha.on(topic)) == 1 and not follower.done()  # waits for the models
        app.ready.set()
        msgs = await ha.wait_for(lambda: ha.on(topic)[1:])
        assert json.loads(msgs[0].payload)["cmps"]["last_speaker"] == {"p": "sensor"}
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    # Remembered: the next start does not remove it again.
    assert "last_speaker" not in Discovery(app, T, path).state.published
