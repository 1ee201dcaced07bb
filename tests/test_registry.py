"""One registry entry, every surface: HTTP, MQTT, /ws/events and the terminal run the same
command, refuse it the same way, are rate-limited the same way, and OpenAPI describes it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.api.server import ApiService
from agent.app.commands import CallContext
from agent.config import load_config
from agent.daemon import Daemon
from agent.errors import CommandError
from agent.mqtt.service import MqttService
from agent.mqtt.topics import Topics

from .mosquitto import Mosquitto, Subscriber, have_mosquitto
from .sources import SilentSource

DEVICE = "registry-test"
EXE = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "voice-agent"
T = Topics(f"voice-agent/{DEVICE}")


@pytest.fixture
def broker() -> Any:
    if not have_mosquitto():
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    b = Mosquitto()
    b.start()
    try:
        yield b
    finally:
        b.close()


def env_for(tmp: Path, mqtt_port: int | None, **extra: str) -> dict[str, str]:
    env = {"VOICE_AGENT__DEVICE_ID": DEVICE, "VOICE_AGENT__STATE_DIR": str(tmp),
           "VOICE_AGENT__ASR__ENABLED": "false", "VOICE_AGENT__EMOTION__ENABLED": "false",
           "VOICE_AGENT__API__PORT": "0", "VOICE_AGENT__GATE__MODE": "ptt"}
    if mqtt_port is not None:
        env.update({"VOICE_AGENT__MQTT__ENABLED": "true", "VOICE_AGENT__MQTT__HOST": "127.0.0.1",
                    "VOICE_AGENT__MQTT__PORT": str(mqtt_port),
                    "VOICE_AGENT__MQTT__RECONNECT_INITIAL_S": "0.1",
                    "VOICE_AGENT__MQTT__RECONNECT_MAX_S": "1.0"})
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[tuple[Daemon, str]]:
    """A real daemon (idle source) with its API on a free port; yields it and its base URL."""
    d = Daemon(load_config(None, env=env), source=SilentSource())
    task = asyncio.create_task(d.run())
    try:
        api = next(s for s in d.services if isinstance(s, ApiService))
        await asyncio.wait_for(api.bound.wait(), 20)
        mqtt = [s for s in d.services if isinstance(s, MqttService)]
        if mqtt:
            await asyncio.wait_for(mqtt[0].connected.wait(), 20)
        yield d, f"http://127.0.0.1:{api.port}"
    finally:
        d.shutdown()
        assert await asyncio.wait_for(task, 20) == 0


async def test_one_ptt_entry_serves_http_mqtt_ws_and_the_terminal(broker: Mosquitto,
                                                                  tmp_path: Path) -> None:
    async with running(env_for(tmp_path, broker.port)) as (d, base), \
            Subscriber(broker.port, [f"{T.prefix}/reply/#"]) as sub, \
            aiohttp.ClientSession() as http:
        calls = d.app.commands.calls
        # HTTP
        r = await (await http.post(f"{base}/api/ptt/start")).json()
        assert r["gate"]["state"] == "open" and d.gate.state == "open"
        await http.post(f"{base}/api/ptt/stop")
        assert d.gate.state == "closed"
        # MQTT
        await sub.publish(T.command("ptt/start"), '{"request_id": "m1"}')
        m1 = (await sub.wait_for(lambda: sub.on(f"{T.prefix}/reply/m1")))[0].json()
        assert m1["ok"] and m1["result"]["gate"]["state"] == "open" and d.gate.state == "open"
        await sub.publish(T.command("ptt/stop"), '{"request_id": "m2"}')
        await sub.wait_for(lambda: sub.on(f"{T.prefix}/reply/m2"))
        assert d.gate.state == "closed"
        # /ws/events, with the registry's name and the protocol's old alias
        async with http.ws_connect(f"{base}/ws/events?types=state.changed") as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
            await ws.send_json({"command": "ptt/start", "id": 1})
            got = [await ws.receive_json(timeout=10) for _ in range(2)]
            result = next(m for m in got if m["type"] == "command.result")
            assert result["ok"] and result["id"] == 1 and result["gate"]["state"] == "open"
            await ws.send_json({"command": "stop", "id": 2})
            got = [await ws.receive_json(timeout=10) for _ in range(2)]
            assert any(m.get("command") == "ptt/stop" for m in got)
        assert d.gate.state == "closed"
        # The terminal (CLI surface) dispatches the same entry in-process.
        await d.app.commands.dispatch("ptt/start", {}, CallContext(surface="cli"))
        assert d.gate.state == "open"
        await d.app.commands.dispatch("ptt/stop", {}, CallContext(surface="cli"))
        for surface in ("http", "mqtt", "ws", "cli"):
            assert calls[("ptt/start", surface)] == 1, (surface, calls)
            assert calls[("ptt/stop", surface)] == 1, (surface, calls)


async def test_the_same_refusal_on_every_surface(broker: Mosquitto, tmp_path: Path) -> None:
    env = env_for(tmp_path, broker.port, VOICE_AGENT__GATE__MODE="vad")
    async with running(env) as (_d, base), \
            Subscriber(broker.port, [f"{T.prefix}/reply/#"]) as sub, \
            aiohttp.ClientSession() as http:
        r = await http.post(f"{base}/api/ptt/start")
        assert r.status == 409 and (await r.json())["error"]["code"] == "wrong_mode"
        await sub.publish(T.command("ptt/start"), '{"request_id": "x"}')
        reply = (await sub.wait_for(lambda: sub.on(f"{T.prefix}/reply/x")))[0].json()
        assert not reply["ok"] and reply["error"]["code"] == "wrong_mode"
        async with http.ws_connect(f"{base}/ws/events") as ws:
            await ws.receive_json(timeout=10)
            await ws.send_json({"command": "ptt/start", "id": "w"})
            err = await ws.receive_json(timeout=10)
            assert err["type"] == "error" and err["code"] == "wrong_mode" and err["id"] == "w"
        # Unknown payload fields: one validation, one code, on every surface.
        r = await http.post(f"{base}/api/ptt/stop", json={"force": True})
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_payload"
        await sub.publish(T.command("ptt/stop"), '{"request_id": "y", "force": true}')
        reply = (await sub.wait_for(lambda: sub.on(f"{T.prefix}/reply/y")))[0].json()
        assert reply["error"]["code"] == "bad_payload"
        assert "force: unknown field" in reply["error"]["message"]


async def test_rate_limits_answer_429_with_retry_after(broker: Mosquitto,
                                                       tmp_path: Path) -> None:
    # 1 per second, bursts of 2, and no loopback bonus: the third call in a row is refused.
    env = env_for(tmp_path, broker.port, VOICE_AGENT__LIMITS__LOOPBACK_FACTOR="1",
                  VOICE_AGENT__LIMITS__DEFAULT__RATE_PER_S="1",
                  VOICE_AGENT__LIMITS__DEFAULT__BURST="2")
    async with running(env) as (d, base), \
            Subscriber(broker.port, [f"{T.prefix}/reply/#"]) as sub, \
            aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(3):
            r = await http.post(f"{base}/api/ptt/toggle")
            statuses.append(r.status)
        assert statuses == [200, 200, 429]
        body = await r.json()
        assert body["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
        for i in range(3):
            await sub.publish(T.command("ptt/toggle"), f'{{"request_id": "t{i}"}}')
        def toggles() -> list[Any]:
            return [m for m in sub.messages if m.topic.startswith(f"{T.prefix}/reply/t")]

        replies = await sub.wait_for(lambda: len(toggles()) >= 3 and toggles())
        codes = sorted((m.json()["error"] or {}).get("code", "ok") for m in replies)
        assert codes == ["ok", "ok", "rate_limited"]
        # The terminal on this machine is not rate-limited.
        for _ in range(5):
            await d.app.commands.dispatch("ptt/toggle", {}, CallContext(surface="cli"))


async def test_openapi_is_generated_from_the_registry(tmp_path: Path) -> None:
    async with running(env_for(tmp_path, None)) as (d, base), aiohttp.ClientSession() as http:
        spec = await (await http.get(f"{base}/api/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    for cmd in d.app.commands:
        op = spec["paths"][cmd.path][cmd.http.method.lower()]
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{cmd.result.__name__}"}
        assert schemas[cmd.result.__name__]["properties"].keys() == \
            cmd.result.model_json_schema()["properties"].keys()
        if cmd.http.method != "GET":
            body = op["requestBody"]["content"]["application/json"]["schema"]
            assert body == {"$ref": f"#/components/schemas/{cmd.payload.__name__}"}


async def test_unknown_and_surface_restricted_commands(tmp_path: Path) -> None:
    async with running(env_for(tmp_path, None)) as (d, _):
        with pytest.raises(CommandError) as e:
            await d.app.commands.dispatch("no/such", {}, CallContext(surface="cli"))
        assert e.value.code == "unknown_command" and e.value.status == 404
        assert "ptt/start" in e.value.message


async def test_cli_call_runs_a_command_on_the_running_daemon(tmp_path: Path) -> None:
    exe = EXE
    async with running(env_for(tmp_path, None)) as (d, base):
        async def call(*args: str) -> tuple[int, str]:
            p = await asyncio.create_subprocess_exec(
                str(exe), "call", *args, "--url", base, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await p.communicate()
            return p.returncode or 0, out.decode()

        rc, out = await call("ptt/start")
        assert rc == 0 and '"state": "open"' in out and d.gate.state == "open"
        rc, out = await call("ptt/stop", "force=true")  # refused by the same registry
        assert rc == 1 and "bad_payload" in out and d.gate.state == "open"
        rc, out = await call("no/such")
        assert rc != 0 and "ptt/start" in out
        assert d.app.commands.calls[("ptt/start", "http")] == 1
