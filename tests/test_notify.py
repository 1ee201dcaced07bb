"""sd_notify over a real datagram socket bound as NOTIFY_SOCKET, and the audio-loop watchdog.

The daemon-level tests (READY after the API answers, WATCHDOG while audio flows and not
while it stalls, STOPPING on SIGTERM, SIGHUP reloads) run the real `voice-agent run`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent import notify
from tests.conftest import ASR_EN
from tests.mosquitto import free_port

EXE = Path(sys.executable).parent / "voice-agent"


class Listener:
    """A bound AF_UNIX datagram socket: what systemd listens on."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # the NOTIFY_SOCKET value

    def recv(self, timeout: float = 5.0) -> dict[str, str]:
        """The next message as a dict of its assignments."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def drain(self, seconds: float) -> list[tuple[float, dict[str, str]]]:
        """Every message received during `seconds`, with its arrival time."""
        out = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                msg = self.recv(left)
            except TimeoutError:
                break
            out.append((time.monotonic(), msg))
        return out

    def wait_for(self, key: str, timeout: float) -> tuple[dict[str, str], list[dict[str, str]]]:
        """Messages until one carrying `key`; that one and those before it."""
        seen: list[dict[str, str]] = []
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                msg = self.recv(left)
            except TimeoutError:
                break
            if key in msg:
                return msg, seen
            seen.append(msg)
        raise AssertionError(f"no {key} within {timeout} s; got {seen}")


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[Listener]:
    """A notify socket on the file system."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield Listener(sock, str(path))
    sock.close()


def test_ready_status_stopping_arrive_as_systemd_reads_them(listener: Listener) -> None:
    """Each call is one datagram of newline-separated assignments."""
    n = notify.Notifier(listener.address)
    assert n.ready("listening on :8765")
    assert listener.recv() == {"READY": "1", "STATUS": "listening on :8765"}
    assert n.status("ok; utterances 3;\naudio flowing")
    assert listener.recv() == {"STATUS": "ok; utterances 3; audio flowing"}
    assert n.watchdog()
    assert listener.recv() == {"WATCHDOG": "1"}
    assert n.stopping("shutting down")
    assert listener.recv() == {"STOPPING": "1", "STATUS": "shutting down"}
    assert n.extend_timeout(2.5)
    assert listener.recv() == {"EXTEND_TIMEOUT_USEC": "2500000"}
    assert n.sent == 5


def test_reloading_carries_the_monotonic_clock(listener: Listener) -> None:
    """MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds, taken when the reload starts."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.Notifier(listener.address).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = listener.recv()
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_abstract_socket_address() -> None:
    """`@name` is the abstract-namespace socket `\\0name` (what systemd usually passes)."""
    name = f"va-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert notify.Notifier("@" + name).ready()
        sock.settimeout(5)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    """Not under systemd: nothing is sent and nothing fails."""
    n = notify.Notifier.from_env({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()
    assert n.sent == 0


def test_a_vanished_socket_is_logged_once_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A notification is never worth crashing the daemon for."""
    n = notify.Notifier(str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.WARNING, logger="agent.notify"):
        assert not n.ready()
        assert not n.watchdog()
    assert len([r for r in caplog.records if "sd_notify" in r.message]) == 1


def test_from_env_reads_the_watchdog_and_can_hide_it_from_children(listener: Listener) -> None:
    """Half of WATCHDOG_USEC; WATCHDOG_PID of another process means no watchdog for us."""
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "10000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "x"}
    n = notify.Notifier.from_env(env, unset=True)
    assert n.address == listener.address and n.watchdog_s == 5.0
    assert env == {"OTHER": "x"}
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "4000000"}) == 2.0


def test_status_text_lists_state_and_counts() -> None:
    """STATUS= reads like `systemctl status` expects: short, one line."""
    text = notify.status_text("ok", utterances=12, audio="flowing", broker="connected",
                              api=None)
    assert text == "ok; utterances 12; audio flowing; broker connected"


async def test_watchdog_pings_only_while_the_audio_loop_beats(listener: Listener) -> None:
    """A real loop task beats a Heartbeat; stalling it stops the pings, resuming restarts them."""
    beat = notify.Heartbeat(stall_s=0.15)
    running = asyncio.Event()
    running.set()

    async def audio_loop() -> None:
        while True:
            await running.wait()
            beat.beat()
            await asyncio.sleep(0.01)

    dog = notify.Watchdog(notify.Notifier(listener.address), beat.alive, interval_s=0.05,
                          describe=lambda: f"no audio for {beat.age_s():.1f} s")
    tasks = [asyncio.create_task(audio_loop()), asyncio.create_task(dog.run())]
    try:
        alive = await asyncio.to_thread(listener.drain, 0.5)
        running.clear()  # the stall
        # Past stall_s the pings must have stopped (those before it are read and dropped).
        await asyncio.to_thread(listener.drain, 0.3)
        stalled = await asyncio.to_thread(listener.drain, 0.5)
        running.set()
        resumed = await asyncio.to_thread(listener.drain, 0.5)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert len(alive) >= 5 and all(m == {"WATCHDOG": "1"} for _, m in alive)
    assert stalled == []
    assert len(resumed) >= 5
    assert dog.withheld == 0 and dog.pings >= 10


async def test_a_blocked_event_loop_stops_the_pings_too(listener: Listener) -> None:
    """The watchdog runs on the loop: blocking the loop (model work on it) silences it."""
    dog = notify.Watchdog(notify.Notifier(listener.address), lambda: True, interval_s=0.05)
    task = asyncio.create_task(dog.run())
    await asyncio.sleep(0.2)
    before = dog.pings
    time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop on purpose: nothing may ping
    assert dog.pings == before
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert before >= 3


async def test_watchdog_ends_when_the_daemon_stops(listener: Listener) -> None:
    """`run(until=stopped)` returns promptly once the event is set (no task to cancel)."""
    stopped = asyncio.Event()
    dog = notify.Watchdog(notify.Notifier(listener.address), lambda: True, interval_s=10)
    task = asyncio.create_task(dog.run(until=stopped))
    await asyncio.sleep(0.05)
    stopped.set()
    await asyncio.wait_for(task, 1)
    assert dog.pings == 1 and listener.recv() == {"WATCHDOG": "1"}


def test_watchdog_does_nothing_without_systemd_asking() -> None:
    """No WATCHDOG_USEC: run() returns at once."""
    dog = notify.Watchdog(notify.Notifier(None, None), lambda: True)
    assert not dog.enabled
    asyncio.run(asyncio.wait_for(dog.run(), 1))


# --- the daemon ---------------------------------------------------------------------------


@pytest.fixture()
def speech_pcm() -> bytes:
    """A shared English clip as 16 kHz s16le, the stdin source's format."""
    clip = ASR_EN / "cards-005.wav"
    if not clip.exists():
        pytest.skip(f"shared speech not found at {clip}")
    x, sr = sf.read(clip, dtype="int16")
    assert sr == 16000
    return np.asarray(x, dtype="<i2").tobytes()


def _health(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
        return dict(json.loads(r.read()))


@pytest.mark.slow
def test_daemon_ready_watchdog_stall_and_stopping(listener: Listener, tmp_path: Path,
                                                  speech_pcm: bytes) -> None:
    """READY once the API answers; WATCHDOG while stdin audio flows, none while it stalls;
    STOPPING on SIGTERM, then exit 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT")}
    env.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000",
               VOICE_AGENT__AUDIO__STALL_TIMEOUT_S="2", VOICE_AGENT__API__ENABLED="true",
               VOICE_AGENT__API__PORT=str(port),
               VOICE_AGENT__STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen([str(EXE), "run", "--source", "stdin", "--mode", "vad"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    try:
        listener.wait_for("READY", 60)
        assert _health(port)["ready"] is True  # sockets were bound before READY
        chunk = 16000 * 2 // 10  # 100 ms of audio
        pings = 0
        for i in range(0, min(len(speech_pcm), chunk * 20), chunk):  # 2 s in real time
            proc.stdin.write(speech_pcm[i:i + chunk])
            proc.stdin.flush()
            pings += sum("WATCHDOG" in m for _, m in listener.drain(0.1))
        assert pings >= 2, "no periodic WATCHDOG while audio flowed"
        # stdin goes silent: the audio loop stalls; after audio.stall_timeout_s (2 s) the
        # pings must stop.
        t0 = time.monotonic()
        stalled = listener.drain(4.5)
        late = [round(t - t0, 2) for t, m in stalled if "WATCHDOG" in m and t - t0 > 3.0]
        assert late == [], f"WATCHDOG kept coming while the audio loop stalled: {late}"
        proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING", 15)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sighup_reload_good_then_bad_config(listener: Listener, tmp_path: Path) -> None:
    """SIGHUP: RELOADING=1 (with MONOTONIC_USEC) then READY=1; a bad config is rejected with
    its errors, the daemon keeps the old one and keeps running."""
    port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("log_level: info\ngate: {mode: ptt}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT")}
    env.update(NOTIFY_SOCKET=listener.address, VOICE_AGENT__API__ENABLED="true",
               VOICE_AGENT__API__PORT=str(port), VOICE_AGENT__STATE_DIR=str(tmp_path / "s"))
    proc = subprocess.Popen([str(EXE), "run", "-c", str(cfg), "--source", "stdin"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        listener.wait_for("READY", 60)
        cfg.write_text("log_level: debug\ngate: {mode: ptt}\nplayback: {block_ms: 20}\n")
        proc.send_signal(signal.SIGHUP)
        reloading, _ = listener.wait_for("RELOADING", 10)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        listener.wait_for("READY", 10)
        cfg.write_text("log_level: loud\nvad: {aggressiveness: 9}\n")
        proc.send_signal(signal.SIGHUP)
        listener.wait_for("RELOADING", 10)
        listener.wait_for("READY", 10)
        assert proc.poll() is None, "a bad config on reload must not stop the daemon"
        assert _health(port)["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert "log_level" in err and "vad.aggressiveness" in err, err[-2000:]
        # The player is built at start: the reload says so rather than ignoring it silently.
        assert "need a restart to apply: playback.block_ms" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
