"""MQTT front-end: outbox, commands, discovery, and the daemon against a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agent import models
from agent.app.capabilities import create_app
from agent.app.core import App
from agent.config import MqttConfig, load_config
from agent.daemon import Daemon
from agent.errors import ConfigError, ModelError
from agent.events import (
    AsrFinal,
    AsrPartial,
    BaseEvent,
    ErrorEvent,
    UtteranceEnded,
    parse_event,
)
from agent.mqtt.client import Backoff
from agent.mqtt.commands import CommandRouter
from agent.mqtt.outbox import Outbox
from agent.mqtt.service import MqttService, outbox_path
from agent.mqtt.topics import RANK_EVENT, RANK_FINAL, RANK_PARTIAL, Topics, event_qos, event_rank

from .conftest import REPO
from .mosquitto import Mosquitto, Subscriber, TlsFiles, have_mosquitto
from .sources import SilentSource

DEVICE = "test-dev"
PREFIX = f"voice-agent/{DEVICE}"
T = Topics(PREFIX)
Spans = list[tuple[float, float]]

# ---------------------------------------------------------------------------------------------
# Pure parts: topics, outbox, commands, discovery, backoff, config
# ---------------------------------------------------------------------------------------------


def test_topic_scheme_and_qos_policy() -> None:
    cfg = MqttConfig()
    t = Topics.for_config(cfg, "kitchen")
    assert t.event("asr.final") == "voice-agent/kitchen/event/asr.final"
    assert (t.status, t.state) == ("voice-agent/kitchen/status", "voice-agent/kitchen/state")
    assert t.commands == "voice-agent/kitchen/cmd/#"
    assert t.command_name("voice-agent/kitchen/cmd/ptt/start") == "ptt/start"
    assert t.command_name("voice-agent/kitchen/cmd/") is None
    assert t.command_name("voice-agent/other/cmd/ptt/start") is None
    assert t.reply("r1") == "voice-agent/kitchen/reply/r1"
    assert t.reply(None) == "voice-agent/kitchen/reply"
    assert Topics.for_config(MqttConfig(topic_prefix="/home/va/"), "x").status == "home/va/status"
    assert (event_qos(cfg, "asr.final"), event_qos(cfg, "asr.partial")) == (1, 0)
    assert event_qos(MqttConfig(partial_qos=1), "asr.partial") == 1
    assert [event_rank(x) for x in ("asr.partial", "state.changed", "asr.final")] == \
        [RANK_PARTIAL, RANK_EVENT, RANK_FINAL]


def test_mqtt_config_checks_and_secrets(tmp_path: Path) -> None:
    cfg = load_config(None, env={"VOICE_AGENT__MQTT__PASSWORD": "hunter2",
                                 "VOICE_AGENT__MQTT__PARTIAL_QOS": "1"})
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(cfg) and cfg.mqtt.partial_qos == 1
    p = tmp_path / "c.yaml"
    p.write_text("mqtt:\n  topic_prefix: a/+/b\n  key_file: k.pem\n  event_qos: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    msg = e.value.message
    assert "mqtt.topic_prefix: must be a non-empty MQTT topic without wildcards" in msg
    assert "mqtt.event_qos:" in msg
    p.write_text("mqtt:\n  key_file: k.pem\n")
    with pytest.raises(ConfigError, match="key_file needs cert_file"):
        load_config(p, env={})


def test_outbox_hands_out_in_order_and_forgets_only_acked() -> None:
    ob = Outbox(100)
    for i in range(5):
        ob.put(f"t/{i}", str(i), 1, RANK_EVENT, "e")
    taken = [ob.take() for _ in range(5)]
    assert [e.payload for e in taken if e] == ["0", "1", "2", "3", "4"]
    assert ob.take() is None
    ob.ack(taken[0].seq)  # type: ignore[union-attr]
    ob.ack(taken[2].seq)  # type: ignore[union-attr]
    assert len(ob) == 3
    ob.rewind()  # the connection dropped: everything unacknowledged again, in order
    assert [ob.take().payload for _ in range(3)] == ["1", "3", "4"]  # type: ignore[union-attr]


def test_outbox_drops_partials_first_finals_last_and_counts() -> None:
    ob = Outbox(4)
    ob.put("f", "F1", 1, RANK_FINAL, "asr.final")
    ob.put("p", "P1", 0, RANK_PARTIAL, "asr.partial")
    ob.put("e", "E1", 1, RANK_EVENT, "utterance.ended")
    ob.put("p", "P2", 0, RANK_PARTIAL, "asr.partial")
    got = []
    for i in range(2, 6):
        ob.put("f", f"F{i}", 1, RANK_FINAL, "asr.final")
        got.append([e.payload for e in ob.entries()])
    assert got == [["F1", "E1", "P2", "F2"],  # oldest partial first
                   ["F1", "E1", "F2", "F3"],  # then the other partial
                   ["F1", "F2", "F3", "F4"],  # then other events
                   ["F2", "F3", "F4", "F5"]]  # finals last, oldest first
    # A partial cannot push out a final: it is the one dropped.
    assert ob.put("p", "P3", 0, RANK_PARTIAL, "asr.partial") is None
    assert [e.payload for e in ob.entries()] == ["F2", "F3", "F4", "F5"]
    assert ob.dropped == {"asr.partial": 3, "utterance.ended": 1, "asr.final": 1}
    assert ob.dropped_total == 5


def test_outbox_persists_across_restarts_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.jsonl"
    ob = Outbox(100, path)
    for i in range(4):
        ob.put(f"t/{i}", json.dumps({"i": i}), 1, RANK_FINAL, "asr.final")
    ob.ack(ob.take().seq)  # type: ignore[union-attr]
    # No close(): the process died. Line buffering put every record in the file already.
    with path.open("a") as f:
        f.write('{"a":{"seq":99,"topic":"t/x","payl')  # torn by the crash
    again = Outbox(100, path)
    assert [e.topic for e in again.entries()] == ["t/1", "t/2", "t/3"]
    assert again.corrupt_lines == 1
    nxt = again.put("t/4", "{}", 1, RANK_FINAL, "asr.final")
    assert nxt is not None and nxt.seq == 5  # sequence numbers go on
    again.close()
    # close() compacts the journal to the live entries.
    assert len(path.read_text().splitlines()) == 4
    assert [e.topic for e in Outbox(2, path).entries()] == ["t/3", "t/4"]  # smaller now


def test_outbox_journal_stays_small(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    ob = Outbox(100, path)
    for i in range(10_000):
        e = ob.put("t", "x" * 100, 1, RANK_EVENT, "e")
        assert e is not None
        if i % 2:
            ob.ack(e.seq - 1)
            ob.ack(e.seq)
    assert len(ob) == 0
    assert path.stat().st_size < 2 * 2000 * 200  # compacted, not 10 000 adds + deletes


def _app(mode: str = "ptt") -> App:
    return create_app(load_config(None, env={"VOICE_AGENT__GATE__MODE": mode}))


@pytest.mark.parametrize("raw,rid,code", [
    (b"", None, None),
    (b"  ", None, None),
    (b'{"request_id": "abc-1"}', "abc-1", None),
    (b"{not json", None, "bad_payload"),
    (b"[1, 2]", None, "bad_payload"),
    (b"\xff\xfe", None, "bad_payload"),
    (b'{"request_id": "abc", "bogus": 1}', "abc", "bad_payload"),
    (b'{"request_id": "a/b"}', None, "bad_request_id"),
    (b'{"request_id": 7}', None, "bad_request_id"),
])
async def test_command_payloads(raw: bytes, rid: str | None, code: str | None) -> None:
    reply = await CommandRouter(_app().commands).handle("ptt/start", raw)
    assert reply.request_id == rid
    assert (reply.error.code if reply.error else None) == code
    assert (reply.result is None) == (code is not None)


async def test_router_runs_gate_commands_and_refuses_clearly() -> None:
    app = _app()
    gate = app.gate
    router = CommandRouter(app.commands)
    r = await router.handle("ptt/start", b'{"request_id": "r1"}')
    assert r.ok and r.request_id == "r1"
    assert r.result == {"ok": True, "command": "start",
                        "gate": app.gate_status().model_dump(mode="json")}
    assert gate.state == "open"
    bad = await router.handle("ptt/stop", b'{"request_id": "r2", "extra": true}')
    assert not bad.ok and bad.error and bad.error.code == "bad_payload"
    assert "extra: unknown field" in bad.error.message
    assert gate.state == "open"  # a malformed command changes nothing
    unknown = await router.handle("no/such/command", b"{}")
    assert unknown.error and unknown.error.code == "unknown_command"
    assert "ptt/start" in unknown.error.message
    assert (await router.handle("ptt/stop", b"")).ok and gate.state == "closed"
    vad = CommandRouter(_app("vad").commands)
    wrong = await vad.handle("ptt/start", b"")
    assert wrong.error and wrong.error.code == "wrong_mode"


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    b = Backoff(0.5, 4.0, random.Random(1))
    delays = [b.next() for _ in range(7)]
    for d, cap in zip(delays, [0.5, 1, 2, 4, 4, 4, 4], strict=True):
        assert cap / 2 <= d <= cap
    assert len(set(delays)) == len(delays)  # jittered, not in step
    b.reset()
    assert b.next() <= 0.5


# ---------------------------------------------------------------------------------------------
# Against a real broker
# ---------------------------------------------------------------------------------------------

need_broker = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto not installed "
                                 "(apt-get install mosquitto mosquitto-clients)")


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    if not have_mosquitto():
        pytest.skip("mosquitto not installed (apt-get install mosquitto mosquitto-clients)")
    b = Mosquitto()
    b.start()
    try:
        yield b
    finally:
        b.close()


def mqtt_env(port: int, state_dir: Path, **extra: str) -> dict[str, str]:
    """A daemon on the test broker, ASR off, fast reconnects, its outbox under `state_dir`."""
    return {
        "VOICE_AGENT__DEVICE_ID": DEVICE, "VOICE_AGENT__STATE_DIR": str(state_dir),
        "VOICE_AGENT__ASR__ENABLED": "false", "VOICE_AGENT__MQTT__ENABLED": "true",
        "VOICE_AGENT__API__ENABLED": "false",
        "VOICE_AGENT__MQTT__HOST": "127.0.0.1", "VOICE_AGENT__MQTT__PORT": str(port),
        "VOICE_AGENT__MQTT__RECONNECT_INITIAL_S": "0.1",
        "VOICE_AGENT__MQTT__RECONNECT_MAX_S": "1.0", **extra,
    }


def mqtt_service(d: Daemon) -> MqttService:
    svc = next(s for s in d.services if isinstance(s, MqttService))
    return svc


@contextlib.asynccontextmanager
async def running(env: dict[str, str], connect: bool = True) -> AsyncIterator[Daemon]:
    """An in-process daemon on an idle source; stopped (and checked) on exit."""
    d = Daemon(load_config(None, env=env), source=SilentSource())
    task = asyncio.create_task(d.run())
    try:
        if connect:
            await asyncio.wait_for(mqtt_service(d).connected.wait(), 10)
        yield d
    finally:
        d.shutdown()
        assert await asyncio.wait_for(task, 20) == 0


@need_broker
async def test_every_bus_event_arrives_as_json(broker: Mosquitto, tmp_path: Path,
                                               joined_recording: tuple[Path, Spans]) -> None:
    path, spans = joined_recording
    env = mqtt_env(broker.port, tmp_path, VOICE_AGENT__GATE__MODE="vad",
                   VOICE_AGENT__AUDIO__SOURCE="file", VOICE_AGENT__AUDIO__FILE=str(path),
                   VOICE_AGENT__AUDIO__REALTIME="false")
    async with Subscriber(broker.port, [f"{PREFIX}/event/#"]) as sub:
        d = Daemon(load_config(None, env=env))
        mine = d.bus.subscribe(100_000, name="test")
        assert await d.run() == 0
        sent = [e async for e in mine]
        await sub.wait_for(lambda: len(sub.messages) >= len(sent))
    assert len([e for e in sent if isinstance(e, UtteranceEnded)]) == len(spans)
    got = [parse_event(m.payload) for m in sub.messages]
    assert got == sent  # every event, in order, the same serialization as everywhere
    assert all(m.topic == T.event(parse_event(m.payload).type) for m in sub.messages)
    assert all(not m.retain for m in sub.messages)
    assert len(mqtt_service(d).outbox) == 0


@need_broker
async def test_status_and_state_are_retained(broker: Mosquitto, tmp_path: Path) -> None:
    async with running(mqtt_env(broker.port, tmp_path)) as d:
        async with Subscriber(broker.port, [T.state]) as first:
            await first.wait_for(lambda: first.on(T.state))  # published once at least
        # A subscriber that comes later still learns that the device is up, and its state.
        async with Subscriber(broker.port, [T.status, T.state]) as late:
            status = await late.wait_for(lambda: late.on(T.status))
            state = await late.wait_for(lambda: late.on(T.state))
            assert (status[0].payload, status[0].retain) == (b"online", True)
            snap = state[0].json()
            assert state[0].retain and snap["device_id"] == DEVICE
            assert snap["gate"]["state"] == "closed" and snap["mqtt"]["connects"] == 1
            d.gate.handle("start")
            await late.wait_for(lambda: late.on(T.state)[-1].json()["gate"]["state"] == "open")
            d.gate.handle("stop")
    # Clean shutdown: `offline`, retained for whoever asks next.
    async with Subscriber(broker.port, [T.status]) as after:
        last = await after.wait_for(lambda: after.on(T.status))
        assert (last[0].payload, last[0].retain) == (b"offline", True)


@need_broker
def test_last_will_says_offline_when_the_daemon_is_killed(broker: Mosquitto,
                                                          tmp_path: Path) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub not installed (apt-get install mosquitto-clients)")
    env = {**os.environ, **mqtt_env(broker.port, tmp_path)}
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--source", "stdin"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env, cwd=REPO)

    def status() -> list[str]:
        out = subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-t", T.status, "-C",
                              "1", "-W", "2"], capture_output=True, text=True)
        return out.stdout.split()

    try:
        deadline = time.monotonic() + 30
        while status() != ["online"]:
            assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
            assert time.monotonic() < deadline, "daemon never came online"
            time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        # The broker noticed the dead connection and published the Last Will, retained.
        deadline = time.monotonic() + 10
        while status() != ["offline"]:
            assert time.monotonic() < deadline, "no Last Will"
            time.sleep(0.1)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


async def test_password_accepted_and_rejected(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    if not have_mosquitto():
        pytest.skip("mosquitto not installed")
    caplog.set_level(logging.DEBUG)
    with Mosquitto(users={"agent": "s3cret-pw", "watcher": "w"}) as b:
        async with Subscriber(b.port, [T.status], username="watcher", password="w") as sub:
            ok_env = mqtt_env(b.port, tmp_path, VOICE_AGENT__MQTT__USERNAME="agent",
                              VOICE_AGENT__MQTT__PASSWORD="s3cret-pw")
            async with running(ok_env):
                await sub.wait_for(lambda: [m.payload for m in sub.on(T.status)] == [b"online"])
            # Client id, keepalive and user as the broker saw them.
            assert f"as voice-agent-{DEVICE} (p5, c1, k30, u'agent')" in b.tail(200)
            bad_env = {**ok_env, "VOICE_AGENT__MQTT__PASSWORD": "wrong-pw",
                       "VOICE_AGENT__MQTT__SHUTDOWN_FLUSH_S": "0.5"}
            async with running(bad_env, connect=False) as d:
                mine = d.bus.subscribe(1000, types=["error"], name="test")
                svc = mqtt_service(d)
                await sub.wait_for(lambda: svc.stats.failures >= 3)  # keeps trying, politely
                assert not svc.connected.is_set() and not d.stopped.is_set()
    errors = [e async for e in mine]
    assert [(e.stage, e.code) for e in errors if isinstance(e, ErrorEvent)] == \
        [("mqtt", "auth_failed")]  # once, not once per attempt
    assert [m.payload for m in sub.on(T.status)] == [b"online", b"offline"]
    assert "s3cret-pw" not in caplog.text and "wrong-pw" not in caplog.text


@need_broker
async def test_commands_get_replies(broker: Mosquitto, tmp_path: Path) -> None:
    async with running(mqtt_env(broker.port, tmp_path)) as d, \
            Subscriber(broker.port, [f"{PREFIX}/reply/#", T.event("state.changed")]) as sub:
        await sub.publish(T.command("ptt/start"), '{"request_id": "r1"}')
        r1 = (await sub.wait_for(lambda: sub.on(f"{PREFIX}/reply/r1")))[0].json()
        assert r1["ok"] and r1["command"] == "ptt/start"
        assert r1["result"]["gate"]["state"] == "open" and d.gate.state == "open"
        await sub.publish(T.command("ptt/stop"), '{"request_id": "r2"}')
        r2 = (await sub.wait_for(lambda: sub.on(f"{PREFIX}/reply/r2")))[0].json()
        assert r2["ok"] and r2["result"]["gate"]["state"] == "closed"
        await sub.publish(T.command("ptt/toggle"))  # no request id: the reply goes to `reply`
        r3 = (await sub.wait_for(lambda: sub.on(f"{PREFIX}/reply")))[0].json()
        assert r3["ok"] and r3["request_id"] is None and d.gate.state == "open"
        states = await sub.wait_for(lambda: len(sub.on(T.event("state.changed"))) >= 3 and
                                    sub.on(T.event("state.changed")))
        assert [(m.json()["state"], m.json()["reason"]) for m in states] == \
            [("open", "mqtt"), ("closed", "mqtt"), ("open", "mqtt")]


@need_broker
async def test_malformed_commands_get_error_replies_and_change_nothing(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with Subscriber(broker.port, [f"{PREFIX}/reply/#", T.event("state.changed")]) as sub:
        # Left retained by some client: it must not run at every (re)connect.
        await sub.publish(T.command("ptt/start"), '{"request_id": "stale"}', retain=True)
        async with running(mqtt_env(broker.port, tmp_path)) as d:
            await sub.publish(T.command("ptt/start"), b"{not json")
            await sub.publish(T.command("ptt/start"), '{"request_id": "r1", "bogus": 1}')
            await sub.publish(T.command("ptt/start"), '{"request_id": "a+b"}')
            await sub.publish(T.command("fly/away"), '{"request_id": "r2"}')
            await sub.wait_for(lambda: len(sub.messages) >= 4)
            await asyncio.sleep(0.3)  # room for anything that should not happen
            assert d.gate.state == "closed" and d.gate.commands == 0
    replies = {m.topic.removeprefix(f"{PREFIX}/"): m.json() for m in sub.messages}
    assert {k: (v["ok"], v["error"]["code"]) for k, v in replies.items()} == {
        "reply": (False, "bad_request_id"), "reply/r1": (False, "bad_payload"),
        "reply/r2": (False, "unknown_command")}
    bare = [m.json() for m in sub.on(f"{PREFIX}/reply")]
    assert [r["error"]["code"] for r in bare] == ["bad_payload", "bad_request_id"]
    assert "not JSON" in bare[0]["error"]["message"]
    assert "bogus: unknown field" in replies["reply/r1"]["error"]["message"]
    assert not sub.on(T.event("state.changed")) and not sub.on(f"{PREFIX}/reply/stale")


@need_broker
async def test_tls_with_ca_file_and_client_certificate(tmp_path: Path) -> None:
    other = TlsFiles.make(tmp_path, name="other-ca")
    with Mosquitto(tls=True, require_certificate=True) as b:
        assert b.tls is not None
        tls = {"VOICE_AGENT__MQTT__CA_FILE": str(b.tls.ca),
               "VOICE_AGENT__MQTT__CERT_FILE": str(b.tls.client_cert),
               "VOICE_AGENT__MQTT__KEY_FILE": str(b.tls.client_key)}
        async with running(mqtt_env(b.port, tmp_path, **tls)) as d:
            assert mqtt_service(d).stats.connects == 1
        async with running(mqtt_env(b.port, tmp_path, VOICE_AGENT__MQTT__CA_FILE=str(other.ca),
                                    VOICE_AGENT__MQTT__SHUTDOWN_FLUSH_S="0.5"),
                           connect=False) as d:
            mine = d.bus.subscribe(1000, types=["error"], name="test")
            svc = mqtt_service(d)
            await asyncio.wait_for(_until(lambda: svc.stats.failures >= 2), 10)
            assert not svc.connected.is_set()
        ctx = ssl.create_default_context(cafile=str(b.tls.ca))
        ctx.load_cert_chain(str(b.tls.client_cert), str(b.tls.client_key))
        async with Subscriber(b.port, [T.status], tls=ctx) as sub:
            assert (await sub.wait_for(lambda: sub.on(T.status)))[0].payload == b"offline"
    codes = [e.code for e in [e async for e in mine] if isinstance(e, ErrorEvent)]
    assert codes == ["tls"]


async def _until(pred: Callable[[], bool]) -> None:
    while not pred():  # noqa: ASYNC110 (polling counters the service keeps, no event for them)
        await asyncio.sleep(0.02)


@need_broker
async def test_outbox_survives_outage_and_daemon_restart(
        tmp_path: Path, joined_recording: tuple[Path, Spans]) -> None:
    path, _ = joined_recording
    b = Mosquitto()  # not started: the broker is unreachable during the first run
    try:
        env = mqtt_env(b.port, tmp_path, VOICE_AGENT__GATE__MODE="vad",
                       VOICE_AGENT__AUDIO__SOURCE="file", VOICE_AGENT__AUDIO__FILE=str(path),
                       VOICE_AGENT__AUDIO__REALTIME="false",
                       VOICE_AGENT__MQTT__SHUTDOWN_FLUSH_S="0.3")
        d1 = Daemon(load_config(None, env=env))
        mine = d1.bus.subscribe(100_000, name="test")
        assert await d1.run() == 0  # the pipeline never waited for the broker
        sent = [e async for e in mine]
        assert len(sent) > 40
        errors = [(e.stage, e.code) for e in sent if isinstance(e, ErrorEvent)]
        assert errors == [("mqtt", "unreachable")]  # once, and queued like any event
        journal = outbox_path(d1.cfg)
        assert len(journal.read_text().splitlines()) == len(sent)
        b.start()
        async with Subscriber(b.port, [f"{PREFIX}/event/#"]) as sub:
            async with running(mqtt_env(b.port, tmp_path)) as d2:
                await sub.wait_for(lambda: len(sub.messages) >= len(sent))
        assert mqtt_service(d2).stats.published >= len(sent)
        assert [parse_event(m.payload) for m in sub.messages[:len(sent)]] == sent
        assert journal.read_text() == ""
    finally:
        b.close()


def _final(d: Daemon, n: int) -> AsrFinal:
    return d.pub.emit(AsrFinal, utterance_id=f"in-flight-{n}", text=f"final {n}",
                      language="en", model="m", audio_s=1, decode_ms=1, eos_to_final_ms=1,
                      partials=0)


@need_broker
async def test_finals_in_flight_when_the_broker_dies_arrive_exactly_once(
        broker: Mosquitto, tmp_path: Path) -> None:
    """Finals handed to a frozen broker (sent, never acknowledged) are sent again after it is
    killed and restarted; finals made during the outage follow; each arrives once."""
    env = mqtt_env(broker.port, tmp_path, VOICE_AGENT__MQTT__RECONNECT_MAX_S="0.5")
    topic = T.event("asr.final")
    async with Subscriber(broker.port, [topic], client_id="in-flight", persistent=True) as sub:
        async with running(env) as d:
            svc = mqtt_service(d)
            await asyncio.wait_for(svc.outbox.wait_empty(), 10)
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGSTOP)
            try:
                frozen = [_final(d, i) for i in range(5)]
                # Every one of them handed to the connection, none acknowledged.
                await asyncio.wait_for(_until(lambda: not svc.outbox._unsent), 5)
                assert len(svc.outbox) == len(frozen)
                published = svc.stats.published
                await asyncio.sleep(0.2)  # a frozen broker acknowledges nothing, ever
                assert svc.stats.published == published and len(svc.outbox) == len(frozen)
            finally:
                await asyncio.to_thread(broker.kill)  # SIGKILL works on a stopped process
            await asyncio.wait_for(_until(lambda: not svc.connected.is_set()), 10)
            during = [_final(d, i) for i in range(5, 8)]  # while the broker is down
            assert not svc.connected.is_set()
            await asyncio.to_thread(broker.start)
            want = {e.utterance_id for e in frozen + during}
            await sub.wait_for(lambda: {parse_event(m.payload).utterance_id
                                        for m in sub.on(topic)} >= want, within=20)
            await asyncio.wait_for(svc.outbox.wait_empty(), 10)
    got = Counter(parse_event(m.payload).utterance_id for m in sub.on(topic))
    assert got == Counter(want), got  # every final once: none lost, none twice
    assert [parse_event(m.payload) for m in sub.on(topic)] == frozen + during  # in order
    # At the reconnect the outbox held them all, and the outage's own error event.
    assert svc.stats.connects == 2 and svc.stats.backlog[1] == len(want) + 1


@need_broker
async def test_overflow_drops_partials_first_and_is_reported(tmp_path: Path) -> None:
    b = Mosquitto()
    try:
        # Leave a persistent session in the broker's database: after the restart below it
        # queues for this subscriber whatever the daemon publishes before it reconnects.
        b.start()
        async with Subscriber(b.port, [f"{PREFIX}/event/#"], client_id="ov", persistent=True):
            pass
        b.stop()
        env = mqtt_env(b.port, tmp_path, VOICE_AGENT__MQTT__OUTBOX_SIZE="12")
        async with running(env, connect=False) as d:
            svc = mqtt_service(d)
            await asyncio.wait_for(_until(lambda: svc.stats.failures >= 1), 10)
            for u in range(4):
                for seq in range(1, 6):
                    d.pub.emit(AsrPartial, utterance_id=f"u{u}", text="x" * seq, seq=seq)
                d.pub.emit(UtteranceEnded, utterance_id=f"u{u}", audio_start_s=0,
                           audio_end_s=1, duration_s=1, reason="silence")
                d.pub.emit(AsrFinal, utterance_id=f"u{u}", text=f"final {u}", language="en",
                           model="m", audio_s=1, decode_ms=1, eos_to_final_ms=1, partials=5)
            await asyncio.wait_for(_until(lambda: svc.outbox.dropped_total >= 17), 5)
            await asyncio.to_thread(b.start)
            async with Subscriber(b.port, [f"{PREFIX}/event/#"], client_id="ov",
                                  persistent=True) as sub:
                await asyncio.wait_for(svc.connected.wait(), 10)
                got = await sub.wait_for(lambda: [
                    m.json() for m in sub.messages if m.topic == T.event("error")
                    and m.json()["code"] == "outbox_overflow"])
        kinds = Counter(m.topic.rsplit("/", 1)[1] for m in sub.messages)
        # 12 slots: the unreachable error, 4 finals, 4 utterance ends, and the 3 newest
        # partials; 17 older partials were dropped (and said so).
        assert kinds["asr.final"] == 4 and kinds["utterance.ended"] == 4
        assert kinds["asr.partial"] == 3
        partials = [m.json() for m in sub.messages if m.topic == T.event("asr.partial")]
        assert [(p["utterance_id"], p["seq"]) for p in partials] == \
            [("u3", 3), ("u3", 4), ("u3", 5)]
        assert svc.outbox.dropped == {"asr.partial": 17}
        assert "17 messages dropped" in got[0]["message"] and "asr.partial 17" in \
            got[0]["message"]
    finally:
        b.close()


# ---------------------------------------------------------------------------------------------
# Broker restarts while the daemon transcribes a recording in real time
# ---------------------------------------------------------------------------------------------

ASR_MODEL = "whisper-tiny.en-int8"
RESTARTS = 10


@pytest.fixture(scope="module")
def asr_model() -> Path:
    try:
        return models.path(ASR_MODEL)
    except ModelError as e:
        pytest.skip(f"ASR model {ASR_MODEL} not installed ({e.message})")


def _received(sub: Subscriber, event_type: str) -> list[BaseEvent]:
    return [parse_event(m.payload) for m in sub.on(T.event(event_type))]


@need_broker
async def test_broker_restarts_lose_no_final(broker: Mosquitto, tmp_path: Path, asr_model: Path,
                                             joined_recording: tuple[Path, Spans]) -> None:
    path, spans = joined_recording
    env = mqtt_env(broker.port, tmp_path, VOICE_AGENT__ASR__ENABLED="true",
                   VOICE_AGENT__GATE__MODE="vad", VOICE_AGENT__AUDIO__SOURCE="file",
                   VOICE_AGENT__AUDIO__FILE=str(path), VOICE_AGENT__AUDIO__REALTIME="true")
    d = Daemon(load_config(None, env=env))
    svc = mqtt_service(d)
    mine = d.bus.subscribe(100_000, name="test")
    rng = random.Random(10)
    outages: list[tuple[float, float]] = []  # (killed, listening again), monotonic
    # A persistent session (restored by the broker's autosave): what the daemon publishes
    # while this subscriber is still reconnecting is kept for it.
    async with Subscriber(broker.port, [f"{PREFIX}/event/#"], client_id="restart-sub",
                          persistent=True) as sub:
        run = asyncio.create_task(d.run())
        await asyncio.wait_for(svc.connected.wait(), 30)
        for _ in range(RESTARTS):
            await asyncio.sleep(rng.uniform(2.8, 3.4))
            await asyncio.to_thread(broker.kill)
            killed = time.monotonic()
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            outages.append((killed, await asyncio.to_thread(broker.start)))
        # The restarts happened while the recording played (the daemon was still at it).
        assert not run.done()
        assert await run == 0
        sent = [e async for e in mine]
        finals = [e for e in sent if isinstance(e, AsrFinal)]
        ended = [e for e in sent if isinstance(e, UtteranceEnded)]
        want = {e.utterance_id for e in finals}
        await sub.wait_for(lambda: {e.utterance_id for e in _received(sub, "asr.final")} >= want,
                           within=15)
    assert len(finals) == len(ended) == len(spans) == 10
    got_finals = Counter(e.utterance_id for e in _received(sub, "asr.final"))
    got_ended = Counter(e.utterance_id for e in _received(sub, "utterance.ended"))
    # Every final at least once; a redelivered one is the same event (dedupe by utterance_id).
    assert set(got_finals) == want and set(got_ended) == {e.utterance_id for e in ended}
    by_id = {e.utterance_id: e for e in finals}
    assert all(by_id[e.utterance_id] == e for e in _received(sub, "asr.final"))
    # The daemon came back after every restart, within the backoff cap plus a connect.
    reconnect = []
    for killed, up in outages:
        back = min(t for t in svc.stats.connected_at if t > killed)
        reconnect.append(max(0.0, back - up))
    assert len(svc.stats.connected_at) == RESTARTS + 1
    # Events were held back during the outages and delivered afterwards.
    assert sum(svc.stats.backlog[1:]) > 0, svc.stats.backlog
    in_outage = sum(any(k < f.mono < svc_back for k, svc_back in
                        ((k, min(t for t in svc.stats.connected_at if t > k)) for k, _ in outages))
                    for f in finals)
    # How fast it came back is measured by bench/mqtt_reconnect.py, not asserted here.
    dup_f = sum(got_finals.values()) - len(got_finals)
    dup_e = sum(got_ended.values()) - len(got_ended)
    print(f"\nbroker restarts: {RESTARTS}; finals {len(got_finals)}/{len(finals)} "
          f"(+{dup_f} duplicates), utterance.ended {len(got_ended)}/{len(ended)} "
          f"(+{dup_e} duplicates); reconnect after broker up: "
          f"p50 {sorted(reconnect)[len(reconnect) // 2]:.3f} s, max {max(reconnect):.3f} s; "
          f"offline per outage: {[round(x, 2) for x in svc.stats.offline_s]}; "
          f"outbox at reconnect: {svc.stats.backlog[1:]}; finals created while "
          f"disconnected: {in_outage}")
