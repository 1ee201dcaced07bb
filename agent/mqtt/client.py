"""Broker connections from the config: auth, TLS, Last Will, backoff, error codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from pathlib import Path

import aiomqtt
from aiomqtt.exceptions import MqttCodeError, MqttConnectError
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttConfig
from agent.errors import AgentError
from agent.mqtt.topics import OFFLINE, Topics

# How long a publish may wait for its acknowledgement before the connection counts as dead.
ACK_TIMEOUT_S = 10.0
# Negative CONNACKs that mean "wrong credentials" (MQTT 3.1.1 codes and their v5 mapping).
_AUTH_CODES = {4, 5, 134, 135}
# "Unacceptable protocol version" (3.1.1) and "unsupported protocol version" (v5).
_PROTOCOL_CODES = {1, 132}
# While nothing listens on the broker's port, it is probed this often between backoff sleeps,
# so a broker that comes back is reconnected within a second whatever the backoff has grown to.
PROBE_INTERVAL_S = 0.25


class _LastError(logging.Handler):
    """Keeps paho's last error line: a refused TLS client certificate only shows up there."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()


PAHO_LOG = logging.getLogger("agent.mqtt.paho")
_paho_errors = _LastError()
PAHO_LOG.addHandler(_paho_errors)


class BrokerError(AgentError):
    """The MQTT broker cannot be reached, refused us, or the TLS set-up is wrong."""

    stage = "mqtt"


def client_id(cfg: MqttConfig, device_id: str) -> str:
    """The configured client id, or `voice-agent-<device_id>`."""
    return cfg.client_id or f"voice-agent-{device_id}"


def tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """TLS from `ca_file` (or the system store with `tls: true`), with an optional client cert.

    Reads files: call it off the event loop. Raises BrokerError(`tls_config`).
    """
    if not (cfg.tls or cfg.ca_file or cfg.cert_file):
        return None
    try:
        ctx = ssl.create_default_context(
            cafile=str(Path(cfg.ca_file).expanduser()) if cfg.ca_file else None)
        if cfg.cert_file:
            ctx.load_cert_chain(str(Path(cfg.cert_file).expanduser()),
                                str(Path(cfg.key_file).expanduser()) if cfg.key_file else None)
    except (OSError, ssl.SSLError) as e:
        files = ", ".join(str(p) for p in (cfg.ca_file, cfg.cert_file, cfg.key_file) if p)
        raise BrokerError("tls_config", f"cannot load TLS files ({files}): {e}") from e
    if cfg.tls_insecure:
        ctx.check_hostname = False  # the chain is still verified
    return ctx


def protocol_of(cfg: MqttConfig) -> str:
    """`mqtt.protocol`: "3.1.1" (default) or "5"."""
    return cfg.protocol


def make_client(cfg: MqttConfig, topics: Topics, device_id: str,
                tls: ssl.SSLContext | None, protocol: str | None = None) -> aiomqtt.Client:
    """A client whose Last Will marks the device `offline` (retained) if we vanish."""
    _paho_errors.last = None
    v5 = (protocol or protocol_of(cfg)) == "5"
    # A clean session: commands sent while we were away must not run late (a stale
    # "ptt/start" would open the microphone minutes after the fact).
    session: dict[str, object] = {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": True} \
        if v5 else {"clean_session": True}
    return aiomqtt.Client(
        cfg.host, cfg.port,
        username=cfg.username,
        password=cfg.password.get_secret_value() if cfg.password else None,
        identifier=client_id(cfg, device_id),
        **session,  # type: ignore[arg-type]
        will=aiomqtt.Will(topics.status, OFFLINE, qos=1, retain=True),
        keepalive=cfg.keepalive_s,
        timeout=ACK_TIMEOUT_S,
        tls_context=tls,
        logger=PAHO_LOG,
    )


def command_subscription(v5: bool) -> dict[str, object]:
    """Subscribe arguments for `cmd/#`.

    MQTT 5 keeps the publisher's retain flag on forwarded messages (retain-as-published), so
    a retained command, and the empty retained message that clears one, can be told from a
    live command and ignored; 3.1.1 only flags the copies replayed at subscribe time.
    """
    if v5:
        return {"options": SubscribeOptions(qos=1, retainAsPublished=True)}
    return {"qos": 1}


def unsupported_protocol(exc: Exception) -> bool:
    """The broker refused the protocol version (an MQTT 3.1.1-only broker asked for v5)."""
    return isinstance(exc, MqttConnectError) and getattr(exc.rc, "value", exc.rc) in \
        _PROTOCOL_CODES


def refused(exc: BaseException) -> bool:
    """The broker host is there but nothing listens (it is restarting): worth a cheap probe."""
    if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)):
        return True
    text = str(exc)
    if "Connection refused" in text or "Errno 111" in text:
        return True
    # Lost mid-session (the broker went away): the next attempts meet a closed port.
    return isinstance(exc, MqttCodeError) and not isinstance(exc, MqttConnectError)


async def port_open(host: str, port: int, within_s: float = 0.5) -> bool:
    """Whether a TCP connection to host:port succeeds now (opened and closed at once)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def until_listening(host: str, port: int, then_s: float = 0.0) -> None:
    """Return once host:port accepts TCP connections (and `then_s` more seconds)."""
    # Polling: nothing signals that a port of another process started listening.
    while not await port_open(host, port, 2 * PROBE_INTERVAL_S):  # noqa: ASYNC110
        await asyncio.sleep(PROBE_INTERVAL_S)
    await asyncio.sleep(then_s)


def classify(exc: Exception) -> BrokerError:
    """An aiomqtt/OS failure as a BrokerError with a stable code."""
    if isinstance(exc, BrokerError):
        return exc
    text = str(exc) or type(exc).__name__
    if "timed out" in text.lower() and _paho_errors.last:
        # The socket failed before CONNACK (e.g. TLS alert): aiomqtt only saw a timeout.
        text = f"{text} ({_paho_errors.last})"
    if isinstance(exc, MqttConnectError):
        rc = getattr(exc.rc, "value", exc.rc)
        if rc in _AUTH_CODES:
            return BrokerError("auth_failed", f"broker refused the credentials: {text}")
        return BrokerError("refused", f"broker refused the connection: {text}")
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE" in text or "SSL" in text:
        return BrokerError("tls", f"TLS handshake failed: {text}")
    if isinstance(exc, MqttCodeError):
        return BrokerError("disconnected", f"connection lost: {text}")
    if "timed out" in text.lower():
        return BrokerError("timeout", f"broker did not answer: {text}")
    return BrokerError("unreachable", f"cannot reach the broker: {text}")


class Backoff:
    """Exponential reconnect delays with jitter, so many devices do not reconnect in step."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt: in [d/2, d], d doubling up to `max_s`."""
        d = min(self.max_s, self.initial_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        """Connected: start again from the initial delay."""
        self.attempt = 0

    def jitter(self, max_s: float) -> float:
        """A random delay in [0, max_s] from the same generator."""
        return self._rng.uniform(0, max_s)
