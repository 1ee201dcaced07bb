"""A private mosquitto broker for tests and benchmarks, and a recording MQTT subscriber.

The broker runs from Debian's `mosquitto` on a free port with its config in a temp dir.
Started as root, mosquitto drops to user `mosquitto`, so the dir must be readable (and, for
persistence, writable) by that user: it is made world-accessible.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def have_mosquitto() -> bool:
    """Whether the broker binary is installed."""
    return Path(MOSQUITTO).exists()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 / localhost and a client one."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, where: Path, name: str = "ca") -> TlsFiles:
        """Generate them with the openssl CLI (EC keys: fast)."""
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        ca, ca_key = where / f"{name}.crt", where / f"{name}.key"
        cert, key, csr = where / "server.crt", where / "server.key", where / "server.csr"
        ext = where / "server.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", f"/CN=voice-agent test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
        ccert, ckey, ccsr = where / "client.crt", where / "client.key", where / "client.csr"
        run("req", *ec, "-keyout", str(ckey), "-out", str(ccsr), "-subj", "/CN=voice-agent")
        run("x509", "-req", "-in", str(ccsr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(ccert), "-days", "2")
        for p in (ca, cert, key):
            p.chmod(0o644)  # read by the unprivileged broker
        return cls(ca, cert, key, ccert, ckey)


class Mosquitto:
    """One broker process; `kill()` + `start()` restart it on the same port."""

    def __init__(self, users: dict[str, str] | None = None, tls: bool = False,
                 require_certificate: bool = False, persistence: bool = True) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mosquitto-test-"))
        self.dir.chmod(0o777)
        self.port = free_port()
        self.users = users
        self.persistence = persistence
        self.require_certificate = require_certificate
        self.tls = TlsFiles.make(self.dir) if tls else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "mosquitto.log"
        self.starts = 0
        self._write_config()

    def _write_config(self) -> None:
        lines = [f"listener {self.port} 127.0.0.1"]
        if self.tls:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}",
                      f"keyfile {self.tls.key}"]
            if self.require_certificate:
                lines.append("require_certificate true")
        if self.users:
            pw = self.dir / "passwords"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True,
                               capture_output=True)
            pw.chmod(0o644)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.persistence:
            # Saved after every change: a SIGKILLed broker comes back with the subscribers'
            # persistent sessions (and their queued messages).
            lines += ["persistence true", f"persistence_location {self.dir}/",
                      "autosave_interval 1", "autosave_on_changes true"]
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o644)

    def start(self, timeout: float = 10.0) -> float:
        """Start and wait until the port accepts connections; returns that monotonic time."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")],
                                         stdout=log, stderr=log)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return time.monotonic()
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto not listening:\n{self.tail()}") from None
                time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone, the harshest way a broker can go."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and wait."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 30) -> str:
        """The end of the broker log, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        """Stop and remove the temp dir."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class Received:
    """One message as the subscriber got it; `t` is time.monotonic() on arrival."""

    topic: str
    payload: bytes
    retain: bool
    t: float

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return json.loads(self.payload)


class Subscriber:
    """Records every message on `topics`; reconnects by itself (persistent session if asked)."""

    def __init__(self, port: int, topics: Iterable[str] = ("#",), client_id: str | None = None,
                 persistent: bool = False, username: str | None = None,
                 password: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.topics = list(topics)
        self.client_id = client_id
        self.persistent = persistent
        self.auth = {"username": username, "password": password}
        self.tls = tls
        self.messages: list[Received] = []
        self.connects = 0
        self.client: aiomqtt.Client | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                        "127.0.0.1", self.port, identifier=self.client_id,
                        clean_session=not self.persistent, tls_context=self.tls,
                        **self.auth) as client:  # type: ignore[arg-type]
                    for t in self.topics:
                        await client.subscribe(t, qos=1)
                    self.client = client
                    self.connects += 1
                    self._ready.set()
                    async for m in client.messages:
                        raw = m.payload if isinstance(m.payload, bytes) else \
                            str(m.payload or "").encode()
                        self.messages.append(Received(m.topic.value, raw, m.retain,
                                                      time.monotonic()))
            except aiomqtt.MqttError:
                self.client = None
                await asyncio.sleep(0.05)

    async def publish(self, topic: str, payload: str | bytes = b"", qos: int = 1,
                      retain: bool = False) -> None:
        """Publish through this subscriber's connection."""
        await asyncio.wait_for(self._ready.wait(), 10)
        assert self.client is not None
        await self.client.publish(topic, payload, qos=qos, retain=retain)

    def on(self, topic: str) -> list[Received]:
        """Messages received on exactly `topic`."""
        return [m for m in self.messages if m.topic == topic]

    async def wait_for(self, pred: Callable[[], Any], within: float = 10.0) -> Any:
        """Poll until `pred()` is truthy; return its value (AssertionError after `within` s)."""
        deadline = time.monotonic() + within
        while True:
            value = pred()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within} s waiting for {pred}; "
                                     f"got {len(self.messages)} messages")
            await asyncio.sleep(0.02)
