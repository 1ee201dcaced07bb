"""Abuse: what an attacker or a broken client sends, against a real daemon.

One daemon (in this process, a silent source for a microphone) serves HTTP, both WebSockets
and MQTT on a real mosquitto for the whole module. Each test throws one class of bad input at
it, checks the answer is a clear error, then that every front-end still serves: a PTT round
trip over HTTP and MQTT, a `/ws/events` snapshot, health `ok` and MQTT `status` online.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf

from agent import models
from agent.api.server import ApiService
from agent.app.commands import Command, Empty
from agent.config import Config, load_config
from agent.daemon import Daemon
from agent.errors import ModelError
from agent.mqtt.service import MqttService

from .mosquitto import Mosquitto, Subscriber, have_mosquitto
from .sources import SilentSource

DEVICE = "abuse"
PREFIX = f"voice-agent/{DEVICE}"
ASR_MODEL = "whisper-tiny.en-int8"
module_loop = pytest.mark.asyncio(loop_scope="module")
# Guard settings the test daemon gets (small, so the limits are reachable in a test).
GUARD = {"max_connections": 40, "header_timeout_s": 1.0, "body_timeout_s": 1.5,
         "allowed_hosts": ["kiosk.lan"], "cors_origins": ["http://dash.example:3000"]}
DEEP = b"[" * 20_000 + b"]" * 20_000  # under /ws/events' 64 KiB frame limit


def have_asr() -> bool:
    """Whether the default ASR model is installed (decode-cost tests need it)."""
    try:
        models.path(ASR_MODEL)
    except ModelError:
        return False
    return True


def config(port: int, state_dir: Path, device: str = DEVICE, asr: bool = False,
           api: dict[str, Any] | None = None, mqtt: dict[str, Any] | None = None,
           **env: str) -> Config:
    """A daemon on the test broker; `api`/`mqtt` set keys the config may not have yet."""
    cfg = load_config(None, env={
        "VOICE_AGENT__DEVICE_ID": device, "VOICE_AGENT__STATE_DIR": str(state_dir),
        "VOICE_AGENT__ASR__ENABLED": str(asr).lower(), "VOICE_AGENT__EMOTION__ENABLED": "false",
        "VOICE_AGENT__MQTT__ENABLED": "true", "VOICE_AGENT__MQTT__HOST": "127.0.0.1",
        "VOICE_AGENT__MQTT__PORT": str(port), "VOICE_AGENT__API__PORT": "0",
        "VOICE_AGENT__MQTT__RECONNECT_INITIAL_S": "0.1", **env})
    return cfg.model_copy(update={"api": cfg.api.model_copy(update=api or {}),
                                  "mqtt": cfg.mqtt.model_copy(update=mqtt or {})})


@dataclass
class Live:
    """A running daemon and clients of each of its front-ends."""

    d: Daemon
    base: str
    sub: Subscriber
    http: aiohttp.ClientSession
    prefix: str = PREFIX
    trips: int = 0
    task: asyncio.Task[int] | None = field(default=None, repr=False)

    @property
    def api(self) -> ApiService:
        """The HTTP front-end."""
        return next(s for s in self.d.services if isinstance(s, ApiService))

    @property
    def mqtt(self) -> MqttService:
        """The MQTT front-end."""
        return next(s for s in self.d.services if isinstance(s, MqttService))

    async def command(self, name: str, payload: bytes | str = b"", rid: str | None = None,
                      retain: bool = False) -> dict[str, Any]:
        """Publish `cmd/<name>`; the reply (on reply/<rid>, else the next on `reply`)."""
        topic = f"{self.prefix}/reply/{rid}" if rid else f"{self.prefix}/reply"
        before = len(self.sub.on(topic))
        await self.sub.publish(f"{self.prefix}/cmd/{name}", payload, retain=retain)
        got = await self.sub.wait_for(lambda: self.sub.on(topic)[before:])
        return json.loads(got[0].payload)

    async def serving(self) -> None:
        """Every front-end answers and the status is right."""
        self.trips += 1
        for cmd, state in (("start", "open"), ("stop", "closed")):
            r = await self.http.post(f"{self.base}/api/ptt/{cmd}")
            assert r.status == 200, await r.text()
            assert (await r.json())["gate"]["state"] == state
            rid = f"rt-{self.trips}-{cmd}"
            reply = await self.command(f"ptt/{cmd}", json.dumps({"request_id": rid}), rid)
            assert reply["ok"], reply
        async with self.http.ws_connect(f"{self.base}/ws/events") as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
        health = await (await self.http.get(f"{self.base}/api/health")).json()
        assert (health["status"], health["ready"]) == ("ok", True), health
        status = self.sub.on(f"{self.prefix}/status")
        assert status and status[-1].payload == b"online" and self.mqtt.connected.is_set()


@contextlib.asynccontextmanager
async def running(cfg: Config, broker: Mosquitto) -> AsyncIterator[Live]:
    """Start a daemon on `cfg`; stop it (cleanly: exit 0) at the end."""
    d = Daemon(cfg, source=SilentSource())
    task = asyncio.create_task(d.run())
    prefix = f"voice-agent/{cfg.device_id}"
    try:
        svc = next(s for s in d.services if isinstance(s, ApiService))
        mq = next(s for s in d.services if isinstance(s, MqttService))
        await asyncio.wait_for(asyncio.gather(svc.bound.wait(), mq.connected.wait(),
                                              d.ready.wait()), 60)
        # No keep-alive: the test daemon's header timeout (1 s) closes idle connections, and
        # a pooled one reused at that moment is a reset no real client waits that long for.
        async with Subscriber(broker.port, [f"{prefix}/#"]) as sub, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            live = Live(d, f"http://127.0.0.1:{svc.port}", sub, http, prefix, task=task)
            await sub.wait_for(lambda: sub.on(f"{prefix}/status"))
            yield live
    finally:
        d.shutdown()
        assert await asyncio.wait_for(task, 30) == 0


@pytest.fixture(scope="module")
def broker() -> Iterator[Mosquitto]:
    if not have_mosquitto():
        pytest.skip("mosquitto not installed (apt-get install mosquitto mosquitto-clients)")
    with Mosquitto() as b:
        yield b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[Live]:
    cfg = config(broker.port, tmp_path_factory.mktemp("abuse"), asr=have_asr(), api=GUARD)
    async with running(cfg, broker) as lv:
        await lv.serving()
        yield lv


async def error_of(r: aiohttp.ClientResponse, status: int, code: str) -> str:
    """Assert a JSON error answer; its message."""
    body = await r.json(content_type=None)
    assert (r.status, body["error"]["code"]) == (status, code), body
    return str(body["error"]["message"])


# ---- untrusted JSON -------------------------------------------------------------------------


@module_loop
async def test_deep_and_broken_json_gets_clear_errors_everywhere(live: Live) -> None:
    json_body = {"Content-Type": "application/json"}
    for body, code in ((DEEP, "too_deep"), (b'{"a":' * 5000, "too_deep"),
                       (b'{"audio": "\xff\xfe"}', "bad_json"), (b"{nope", "bad_json")):
        for path in ("/api/ptt/start", "/api/asr/transcribe"):
            await error_of(await live.http.post(live.base + path, data=body, headers=json_body),
                           400, code)
    sockets = [("/ws/events", {"command": "start", "id": 1})]
    if live.d.app.asr_engine is not None:  # /ws/asr refuses sessions without a model
        sockets.append(("/ws/asr", {"type": "control", "command": "reset"}))
    for endpoint, follow_up in sockets:
        async with live.http.ws_connect(live.base + endpoint) as ws:
            await ws.receive_json(timeout=10)  # snapshot / ready
            await ws.send_str(DEEP.decode())
            err = await ws.receive_json(timeout=10)
            assert (err["type"], err["code"]) == ("error", "too_deep"), err
            await ws.send_json(follow_up)  # the session goes on
            assert (await ws.receive_json(timeout=10))["type"] != "close"
            assert not ws.closed
    reply = await live.command("ptt/start", DEEP, None)
    assert reply["error"]["code"] == "bad_payload" and "deep" in reply["error"]["message"]
    await live.http.post(f"{live.base}/api/ptt/stop")
    await live.serving()


@module_loop
async def test_a_failing_mqtt_command_is_reported_and_the_service_lives(live: Live) -> None:
    async def boom(payload: Empty, ctx: Any) -> Empty:
        raise RuntimeError("a bug in a handler")

    if "test/boom" not in live.d.app.commands:
        live.d.app.commands.add(Command("test/boom", Empty, Empty, boom, "fails",
                                        surfaces=frozenset({"mqtt"})))
    reply = await live.command("test/boom", '{"request_id": "b1"}', "b1")
    assert reply["error"]["code"] == "internal" and not reply["ok"]
    errors = await live.sub.wait_for(lambda: [m.json() for m in live.sub.on(
        f"{PREFIX}/event/error") if m.json()["code"] == "command_failed"])
    assert "RuntimeError" in errors[0]["message"]
    await live.serving()


@module_loop
async def test_mqtt_commands_without_a_name_or_with_huge_ids(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    for topic in (f"{PREFIX}/cmd/", f"{PREFIX}/cmd"):
        before = len(live.sub.on(f"{PREFIX}/reply"))
        await live.sub.publish(topic, b"")
        got = await live.sub.wait_for(
            lambda n=before: live.sub.on(f"{PREFIX}/reply")[n:])  # type: ignore[misc]
        assert got[0].json()["error"]["code"] == "unknown_command"
        assert "no command name" in got[0].json()["error"]["message"]
    long_name = "x" * 5000
    reply = await live.command(long_name, '{"request_id": "long1"}', "long1")
    assert reply["error"]["code"] == "unknown_command" and len(reply["command"]) <= 83
    assert len(json.dumps(reply)) < 2000
    reply = await live.command("ptt/start", json.dumps({"request_id": "r" * 500}))
    assert reply["error"]["code"] == "bad_request_id" and reply["request_id"] is None
    assert "r" * 100 not in reply["error"]["message"]
    assert not any("x" * 100 in r.getMessage() or "r" * 100 in r.getMessage()
                   for r in caplog.records)
    await live.serving()


# ---- decoding cost ------------------------------------------------------------------------


def silent_flac(path: Path, seconds: float = 299, rate: int = 384_000, channels: int = 8
                ) -> Path:
    """FLAC of silence (it compresses to ~1 MB for 299 s of 384 kHz, 8 channels)."""
    if not path.exists():
        block = np.zeros((rate * 2, channels), np.int16)
        with sf.SoundFile(path, "w", rate, channels, "PCM_16", format="FLAC") as f:
            left = int(seconds * rate)
            while left > 0:
                f.write(block[:min(left, len(block))])
                left -= len(block)
    return path


def unknown_length(flac: bytes) -> bytes:
    """The same stream with STREAMINFO's total-samples (and MD5) zeroed: length unknown."""
    b = bytearray(flac)
    assert b[:4] == b"fLaC" and b[4] & 0x7F == 0  # STREAMINFO first
    b[21] &= 0xF0
    b[22:26] = bytes(4)
    b[26:42] = bytes(16)
    return bytes(b)


@pytest.fixture(scope="module")
def bombs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, bytes]:
    # Encoding 918 M samples takes ~15 s: kept in pytest's cache between runs when it can be.
    cache = request.config.cache
    where = cache.mkdir("abuse") if cache is not None else tmp_path_factory.getbasetemp()
    flac = silent_flac(where / "silence-299s-384k-8ch.flac")
    data = flac.read_bytes()
    assert len(data) < 1.5 * 2**20
    return {"header": data, "stream": unknown_length(data)}


class RssPeak:
    """This process's RSS, sampled every 10 ms in a thread while in the `with` block."""

    def __init__(self) -> None:
        self.base = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        """Resident set size in bytes."""
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@module_loop
async def test_decoding_bombs_are_refused_cheaply(live: Live, bombs: dict[str, bytes]) -> None:
    if live.d.app.asr_engine is None:
        pytest.skip(f"ASR model {ASR_MODEL} not installed (voice-agent models install "
                    f"{ASR_MODEL}): transcribe refuses before decoding without it")
    url = f"{live.base}/api/asr/transcribe"
    with RssPeak() as rss:
        t0 = time.monotonic()
        r = await live.http.post(url, data=bombs["header"], headers={"Content-Type":
                                                                     "audio/flac"})
        assert "input samples" in await error_of(r, 413, "too_much_audio")
        header_s = time.monotonic() - t0
        form = aiohttp.FormData()
        form.add_field("file", bombs["stream"], filename="bomb.flac")
        three = [live.http.post(url, data=bombs["stream"], headers={"Content-Type":
                                                                     "audio/flac"}),
                 live.http.post(url, data=form),
                 live.http.post(url, json={"audio": __import__("base64").b64encode(
                     bombs["stream"]).decode()})]
        for r in await asyncio.gather(*three):
            await error_of(r, 413, "too_much_audio")
    assert header_s < 2.0  # refused on the header's word, nothing decoded
    assert rss.peak - rss.base < 300 * 2**20, (rss.base, rss.peak)
    await live.serving()


@module_loop
async def test_silence_transcribes_to_no_words(live: Live) -> None:
    if live.d.app.asr_engine is None:
        pytest.skip(f"ASR model {ASR_MODEL} not installed")
    buf = io.BytesIO()
    sf.write(buf, np.zeros(3 * 16000, np.int16), 16000, format="WAV")
    r = await live.http.post(f"{live.base}/api/asr/transcribe", data=buf.getvalue(),
                             headers={"Content-Type": "audio/wav"})
    body = await r.json()
    assert r.status == 200 and body["text"] == "" and "[" not in body["text"], body


# ---- connections ---------------------------------------------------------------------------


async def half_open(port: int, n: int) -> list[tuple[asyncio.StreamReader,
                                                      asyncio.StreamWriter]]:
    """`n` connections that start a request and never finish its headers."""
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        conns.append((r, w))
    await asyncio.gather(*(w.drain() for _, w in conns))
    return conns


@module_loop
async def test_half_open_and_slow_connections_neither_starve_nor_stay(live: Live) -> None:
    port = live.api.port
    assert port is not None and live.api.acceptor is not None
    cap = live.api.acceptor.limit
    async with live.http.ws_connect(f"{live.base}/ws/events") as ws:  # a long-lived one
        await ws.receive_json(timeout=10)
        conns = await half_open(port, cap + 20)
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as fresh:
            r = await fresh.get(f"{live.base}/api/health")
            assert r.status == 200 and time.monotonic() - t0 < 2.0
        # Room was made by closing the oldest idle ones; the header timeout closes the rest.
        closed = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in conns))
        assert all(c in (b"",) or c.startswith(b"HTTP/1.1 503") for c in closed)
        assert live.api.acceptor.evicted >= 20
        # A body that trickles in is cut off at api.body_timeout_s with a clear 408.
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"POST /api/ptt/start HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 1000\r\n\r\n{")
        answer = await asyncio.wait_for(r2.read(), 10)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
        w2.close()
        # The WebSocket outlived every one of those timeouts.
        await ws.send_json({"command": "start", "id": 7})
        assert (await ws.receive_json(timeout=10))["type"] in ("command.result", "state.changed")
    await live.http.post(f"{live.base}/api/ptt/stop")
    await live.serving()


@module_loop
async def test_client_hanging_up_mid_upload_is_a_499_not_a_500(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert live.api.port is not None
    _, w = await asyncio.open_connection("127.0.0.1", live.api.port)
    w.write(b"POST /api/asr/transcribe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"audio/wav\r\nContent-Length: 1000000\r\n\r\n" + b"\0" * 100_000)
    await w.drain()
    await asyncio.sleep(0.2)
    w.transport.abort()
    metrics = ""
    for _ in range(100):
        metrics = await (await live.http.get(f"{live.base}/metrics")).text()
        if 'status="499"' in metrics:
            break
        await asyncio.sleep(0.05)
    assert 'route="/api/asr/transcribe",status="499"' in metrics
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text
    assert [rec for rec in caplog.records if "went away" in rec.getMessage()]
    await live.serving()


# ---- cross-site requests -------------------------------------------------------------------


@module_loop
async def test_cross_site_requests_and_foreign_hosts_are_refused(live: Live) -> None:
    port, base = live.api.port, live.base
    assert port is not None
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    await error_of(await live.http.post(f"{base}/api/ptt/start", data="{}", headers=evil),
                   403, "cross_origin")
    await error_of(await live.http.post(f"{base}/api/ptt/start",
                                        headers={"Sec-Fetch-Site": "cross-site"}),
                   403, "cross_origin")
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await live.http.ws_connect(f"{base}/ws/events", origin="http://evil.example")
    assert exc.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await live.http.ws_connect(f"{base}/ws/asr", origin=f"http://localhost:{port + 1}")
    # DNS rebinding: a foreign name for this address.
    msg = await error_of(await live.http.get(f"{base}/api/health",
                                             headers={"Host": f"evil.example:{port}"}),
                         403, "bad_host")
    assert "allowed_hosts" in msg
    assert live.d.app.gate.state == "closed" and live.d.app.gate.commands >= 0
    # CORS stays closed for others: no Allow-Origin, and a preflight is no answer.
    r = await live.http.get(f"{base}/api/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = await live.http.options(f"{base}/api/ptt/start", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status >= 400 and "Access-Control-Allow-Origin" not in r.headers
    await live.serving()


@module_loop
async def test_own_pages_configured_hosts_and_cors_origins_work(live: Live) -> None:
    port, base = live.api.port, live.base
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"kiosk.lan:{port}"):
        page = await live.http.get(f"{base}/", headers={"Host": host})
        assert page.status == 200 and "<html" in (await page.text()).lower()
        same = {"Host": host, "Origin": f"http://{host}"}
        r = await live.http.post(f"{base}/api/ptt/toggle", headers=same)
        assert r.status == 200, await r.text()
        async with live.http.ws_connect(f"{base}/ws/events", headers=same) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
    if live.d.app.gate.state == "open":
        await live.http.post(f"{base}/api/ptt/stop")
    dash = "http://dash.example:3000"
    pre = await live.http.options(f"{base}/api/ptt/start", headers={
        "Origin": dash, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status == 204 and pre.headers["Access-Control-Allow-Origin"] == dash
    r = await live.http.post(f"{base}/api/ptt/start", json={}, headers={"Origin": dash})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == dash
    await live.http.post(f"{base}/api/ptt/stop")
    await live.serving()


# ---- MQTT: retained commands, a dying service, reconnects ----------------------------------


@module_loop
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_retained_commands_and_their_clearing_never_run(
        broker: Mosquitto, tmp_path: Path, protocol: str) -> None:
    device = f"retained-{protocol.replace('.', '')}"
    cmd = f"voice-agent/{device}/cmd/ptt/start"
    async with Subscriber(broker.port, ["none/#"]) as pub:
        await pub.publish(cmd, '{"request_id": "stale"}', retain=True)  # left by some client
        cfg = config(broker.port, tmp_path, device, mqtt={"protocol": protocol})
        async with running(cfg, broker) as lv:
            gate = lv.d.app.gate
            await pub.publish(cmd, b"", retain=True)  # clearing it
            if protocol == "5":  # v5 also tells a retained publish made while connected
                await pub.publish(cmd, '{"request_id": "later"}', retain=True)
                await pub.publish(cmd, b"", retain=True)
            await asyncio.sleep(0.5)  # room for what must not happen
            assert gate.state == "closed" and not lv.sub.on(f"{lv.prefix}/reply")
            assert not lv.sub.on(f"{lv.prefix}/reply/stale")
            # A live empty command still runs: empty payloads are valid commands.
            reply = await lv.command("ptt/toggle", b"")
            assert reply["ok"] and gate.state == "open"
            await lv.command("ptt/stop", b"")


@module_loop
async def test_a_dying_mqtt_service_says_offline_and_the_rest_serves(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with running(config(broker.port, tmp_path, "dying"), broker) as lv:
        def broken() -> str:
            raise RuntimeError("state snapshot bug")

        lv.mqtt.state_payload = broken  # type: ignore[method-assign]  # fault injection
        lv.d.app.gate.handle("start")  # a state change: the state loop hits the bug
        await lv.sub.wait_for(lambda: lv.sub.on(f"{lv.prefix}/status")[-1].payload ==
                              b"offline")
        health = await (await lv.http.get(f"{lv.base}/api/health")).json()
        assert health["status"] == "degraded" and any("mqtt" in p for p in
                                                        health["problems"]), health
        r = await lv.http.post(f"{lv.base}/api/ptt/stop")
        assert r.status == 200  # HTTP goes on
    async with Subscriber(broker.port, ["voice-agent/dying/status"]) as late:
        got = await late.wait_for(lambda: late.on("voice-agent/dying/status"))
        assert (got[-1].payload, got[-1].retain) == (b"offline", True)


@module_loop
async def test_reconnect_within_2_s_after_a_long_outage(tmp_path: Path) -> None:
    if not have_mosquitto():
        pytest.skip("mosquitto not installed (apt-get install mosquitto mosquitto-clients)")
    with Mosquitto(persistence=False) as b:
        cfg = config(b.port, tmp_path, "outage",
                     mqtt={"reconnect_initial_s": 0.5, "reconnect_max_s": 30.0})
        async with running(cfg, b) as lv:
            svc = lv.mqtt
            await asyncio.to_thread(b.kill)
            # Five failed attempts: the backoff is at 8-16 s now. The broker comes back right
            # after an attempt, the worst moment: the backoff alone would wait it all out.
            deadline = time.monotonic() + 30
            while svc.stats.failures < 5:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            up = await asyncio.to_thread(b.start)
            await asyncio.wait_for(svc.connected.wait(), 20)
            back = svc.stats.connected_at[-1] - up
            print(f"\nreconnected {back:.2f} s after the broker listened again "
                  f"(outage {svc.stats.offline_s[-1]:.1f} s)")
            assert back < 2.0, back
            assert svc.stats.connects == 2
            await lv.sub.wait_for(lambda: lv.sub.connects >= 2)
            await lv.serving()


@module_loop
async def test_health_says_what_is_missing_when_the_models_are(
        broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.ENV_MODELS_DIR, str(tmp_path / "no-models-here"))
    cfg = config(broker.port, tmp_path, "nomodels", asr=True)
    async with running(cfg, broker) as lv:
        health = await (await lv.http.get(f"{lv.base}/api/health")).json()
        assert health["status"] == "degraded" and health["ready"] is True, health
        assert health["models"]["asr"] is None
        # Every missing model is named (not only the last one to fail loading).
        assert any(ASR_MODEL in p and "not installed" in p for p in health["problems"]), \
            health["problems"]
        # `state` carries the status: one published while the models were still loading said
        # "starting", so the newest must come to say degraded (a timeout fails the test).
        await lv.sub.wait_for(lambda: (s := lv.sub.on(f"{lv.prefix}/state"))
                              and s[-1].json()["status"] == "degraded")
        r = await lv.http.post(f"{lv.base}/api/asr/transcribe", data=b"x",
                               headers={"Content-Type": "audio/wav"})
        await error_of(r, 503, "asr_unavailable")


@module_loop
async def test_a_kiosk_on_the_network_with_allowed_hosts(tmp_path: Path) -> None:
    cfg = load_config(None, env={
        "VOICE_AGENT__DEVICE_ID": "lan", "VOICE_AGENT__STATE_DIR": str(tmp_path),
        "VOICE_AGENT__ASR__ENABLED": "false", "VOICE_AGENT__EMOTION__ENABLED": "false",
        "VOICE_AGENT__API__HOST": "0.0.0.0", "VOICE_AGENT__API__PORT": "0",
        "VOICE_AGENT__API__KEY": "lan-key-1234"})
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={
        "allowed_hosts": ["kiosk.lan", "*.home.arpa"]})})
    d = Daemon(cfg, source=SilentSource())
    task = asyncio.create_task(d.run())
    try:
        svc = next(s for s in d.services if isinstance(s, ApiService))
        await asyncio.wait_for(asyncio.gather(svc.bound.wait(), d.ready.wait()), 60)
        base, key = f"http://127.0.0.1:{svc.port}", {"X-API-Key": "lan-key-1234"}
        async with aiohttp.ClientSession(headers=key) as http:
            for name in ("kiosk.lan", "hall.home.arpa", "192.168.1.20"):
                host = f"{name}:{svc.port}"
                same = {"Host": host, "Origin": f"http://{host}"}
                page = await http.get(f"{base}/?token=lan-key-1234", headers={"Host": host})
                assert page.status == 200
                assert (await http.post(f"{base}/api/ptt/toggle", headers=same)).status == 200
                async with http.ws_connect(f"{base}/ws/events", headers=same) as ws:
                    assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
            await error_of(await http.get(f"{base}/api/health",
                                          headers={"Host": f"other.lan:{svc.port}"}),
                           403, "bad_host")
            await error_of(await http.post(f"{base}/api/ptt/toggle", headers={
                "Host": f"kiosk.lan:{svc.port}", "Origin": "http://other.lan"}),
                403, "cross_origin")
    finally:
        d.shutdown()
        assert await asyncio.wait_for(task, 30) == 0
