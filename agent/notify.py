"""systemd's sd_notify protocol over raw datagrams, and a watchdog tied to the audio loop.

systemd passes the address of a datagram socket in `NOTIFY_SOCKET` (a path, or an abstract
socket written with a leading `@`); the service sends newline-separated `KEY=VALUE`
assignments to it (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `RELOADING=1`, `STOPPING=1`). This
is the whole protocol, so no libsystemd binding is needed. Without `NOTIFY_SOCKET` (not under
systemd, or `Type=` is not `notify`) every call is a no-op.

A notification is never worth crashing or stalling the daemon for: sends are non-blocking
and failures are logged once, not raised.

`Watchdog` pings `WATCHDOG=1` at half of `WATCHDOG_USEC`, but only while a liveness callback
says the audio loop is alive (`Heartbeat.alive`). It runs on the event loop, so a blocked
loop stops the pings too; either way systemd sees the silence and restarts the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"

# systemd keeps only the first line of STATUS= per message; long lines are cut for readability.
MAX_STATUS = 200


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd expects in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(value: str) -> str | bytes:
    """`NOTIFY_SOCKET` as an AF_UNIX address: `@name` is the abstract socket `\\0name`."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of `WATCHDOG_USEC` in seconds (systemd's advice), or None when no watchdog is set
    for this process (`WATCHDOG_PID` names another one, or the value is missing or bad)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get(ENV_WATCHDOG_USEC, ""))
    except ValueError:
        return None
    pid = env.get(ENV_WATCHDOG_PID)
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


class Notifier:
    """One process's channel to systemd; every method is a no-op without `NOTIFY_SOCKET`."""

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        """`address` is the value of `NOTIFY_SOCKET` (path or `@abstract`), or None;
        `watchdog_s` the ping interval systemd asked for (None: no watchdog)."""
        self.address = address or None
        self.watchdog_s = watchdog_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # the watchdog and the loop may send at once
        self._failed = False
        self.sent = 0

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None,
                 unset: bool = False) -> Notifier:
        """From `NOTIFY_SOCKET`; `unset=True` removes it (and the watchdog variables) from
        `env` so that child processes (ffmpeg, pip) do not inherit it."""
        env = os.environ if env is None else env
        notifier = cls(env.get(ENV_SOCKET), watchdog_interval_s(env))
        if unset:
            for key in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines as one datagram; True when it was delivered."""
        if self.address is None:
            return False
        payload = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # Non-blocking: a full receive queue must not stall the event loop.
                    sock.setblocking(False)
                    self._sock = sock
                self._sock.sendto(payload, socket_address(self.address))
            except OSError as e:
                if not self._failed:
                    log.warning("sd_notify to %s failed: %s (further failures not logged)",
                                self.address, e)
                    self._failed = True
                return False
            self.sent += 1
            return True

    def ready(self, status: str | None = None) -> bool:
        """`READY=1`: startup (or a reload) is complete."""
        return self.send("READY=1", *self._status_line(status))

    def status(self, text: str) -> bool:
        """`STATUS=text`: shown by `systemctl status`."""
        return self.send(*self._status_line(text))

    def watchdog(self) -> bool:
        """`WATCHDOG=1`: the daemon is alive."""
        return self.send("WATCHDOG=1")

    def reloading(self, status: str | None = None) -> bool:
        """`RELOADING=1` with `MONOTONIC_USEC` (required by `Type=notify-reload`)."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                         *self._status_line(status))

    def stopping(self, status: str | None = None) -> bool:
        """`STOPPING=1`: shutdown has begun."""
        return self.send("STOPPING=1", *self._status_line(status))

    def extend_timeout(self, seconds: float) -> bool:
        """`EXTEND_TIMEOUT_USEC`: a slow start or stop needs `seconds` more."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def close(self) -> None:
        """Close the socket (sends after this reopen it)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    @staticmethod
    def _status_line(text: str | None) -> list[str]:
        if text is None:
            return []
        line = " ".join(text.split())  # one line: newlines would start new assignments
        return [f"STATUS={line[:MAX_STATUS]}"]


def status_text(state: str, **counts: object) -> str:
    """`STATUS=` text: the state, then `key value` pairs, e.g. `ok; utterances 12; audio
    flowing; broker connected` (None values are left out)."""
    parts = [state] + [f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if v is not None]
    return "; ".join(parts)


class Heartbeat:
    """Liveness of a loop: `beat()` on every iteration, `alive()` while the last beat is recent.

    Safe to beat from any thread (a float assignment); `age_s()` is how long ago it beat.
    """

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """A loop that has not beaten for `stall_s` seconds is stalled."""
        self.stall_s = stall_s
        self._clock = clock
        self._last = clock()
        self.beats = 0

    def beat(self) -> None:
        """The loop made progress."""
        self._last = self._clock()
        self.beats += 1

    def age_s(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last

    def alive(self) -> bool:
        """Whether the loop beat within `stall_s`."""
        return self.age_s() < self.stall_s


class Watchdog:
    """Pings `WATCHDOG=1` every `interval_s` while `alive()` is true; `run()` is a task body.

    `interval_s=None` takes the notifier's (half of `WATCHDOG_USEC`); when systemd set no
    watchdog, `run()` returns at once. While `alive()` is false no ping is sent, so systemd's
    `WatchdogSec=` expires and it restarts the daemon (`Restart=on-failure` covers watchdog
    timeouts).
    """

    def __init__(self, notifier: Notifier, alive: Callable[[], bool],
                 interval_s: float | None = None,
                 describe: Callable[[], str] | None = None) -> None:
        """`describe()` says, for the log, what is stalled (e.g. "no audio for 12.0 s")."""
        self.notifier = notifier
        self.alive = alive
        self.interval_s = notifier.watchdog_s if interval_s is None else interval_s
        self.describe = describe
        self.pings = 0
        self.withheld = 0

    @property
    def enabled(self) -> bool:
        """Whether there is anything to ping."""
        return self.notifier.enabled and bool(self.interval_s)

    def tick(self) -> bool:
        """One check: ping when alive; True when a ping was sent."""
        try:
            ok = self.alive()
        except Exception:  # a broken probe counts as a stall: better restarted than wedged
            log.exception("watchdog liveness check failed")
            ok = False
        if ok:
            if self.withheld:
                log.info("audio loop alive again: watchdog pings resume")
            self.withheld = 0
            self.pings += 1
            self.notifier.watchdog()
            return True
        if not self.withheld:
            what = self.describe() if self.describe else "liveness check failed"
            log.error("audio loop stalled (%s): withholding WATCHDOG=1, systemd will restart "
                      "the daemon", what)
        self.withheld += 1
        return False

    async def run(self, until: asyncio.Event | None = None) -> None:
        """Ping until `until` is set (the daemon stopped) or the task is cancelled."""
        if not self.enabled or self.interval_s is None:
            return
        log.debug("watchdog: ping every %.2f s", self.interval_s)
        stop = until or asyncio.Event()
        while not stop.is_set():
            self.tick()
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass


# The daemon's process-wide notifier; `from agent import notify; notify.ready()`.
_default: Notifier | None = None


def init(env: MutableMapping[str, str] | None = None, unset: bool = True) -> Notifier:
    """Build the process-wide notifier from the environment at startup, taking
    `NOTIFY_SOCKET` out of it so children cannot impersonate the daemon."""
    global _default
    _default = Notifier.from_env(env, unset=unset)
    return _default


def default() -> Notifier:
    """The process-wide notifier, built from `NOTIFY_SOCKET` on first use."""
    global _default
    if _default is None:
        _default = Notifier.from_env()
    return _default


def ready(status: str | None = None) -> bool:
    """`READY=1` on the process-wide notifier."""
    return default().ready(status)


def status(text: str) -> bool:
    """`STATUS=` on the process-wide notifier."""
    return default().status(text)


def watchdog() -> bool:
    """`WATCHDOG=1` on the process-wide notifier."""
    return default().watchdog()


def reloading(status: str | None = None) -> bool:
    """`RELOADING=1` on the process-wide notifier."""
    return default().reloading(status)


def stopping(status: str | None = None) -> bool:
    """`STOPPING=1` on the process-wide notifier."""
    return default().stopping(status)
