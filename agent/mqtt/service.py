"""The MQTT front-end service: bus -> outbox -> broker, commands -> gate, status, state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from agent.app.core import App
from agent.app.service import Service
from agent.config import Config
from agent.events import BaseEvent
from agent.mqtt.client import (
    Backoff,
    BrokerError,
    classify,
    command_subscription,
    make_client,
    protocol_of,
    refused,
    tls_context,
    unsupported_protocol,
    until_listening,
)
from agent.mqtt.commands import CommandRouter, Reply, RetainedFilter, clip
from agent.mqtt.discovery import Discovery, state_path
from agent.mqtt.outbox import Entry, Outbox
from agent.mqtt.topics import (
    OFFLINE,
    ONLINE,
    RANK_FINAL,
    REPLY_QOS,
    Topics,
    event_qos,
    event_rank,
)

log = logging.getLogger(__name__)

# Publishes awaiting their acknowledgement at once: enough to fill a LAN round trip.
MAX_INFLIGHT = 20
# State changes come in bursts (utterance ended, final): publish the snapshot once per burst,
# a little later, so the daemon's state tracker has seen the event too.
STATE_COALESCE_S = 0.1
# Commands run concurrently (an upload must not hold up a PTT stop behind it), this many at once.
MAX_CONCURRENT_COMMANDS = 8
# At most one `outbox_overflow` error event this often.
DROP_REPORT_INTERVAL_S = 5.0

# Events that change the retained `state` (its last_final, last_speaker, last_emotion, gate):
# the speaker and emotion of an utterance often come after its final.
STATE_EVENTS = frozenset({"state.changed", "utterance.started", "utterance.ended",
                          "asr.final", "speaker.identified", "emotion.detected", "error"})
# Codes worth an `error` event even in the middle of an outage: they need a human.
_CONFIG_CODES = frozenset({"auth_failed", "refused", "tls", "tls_config"})
PROBE_JITTER_S = 0.25  # after the broker's port opens: spread the reconnects of many devices
# At most one `message_failed` error event this often (a flood of bad messages is counted).
MESSAGE_REPORT_INTERVAL_S = 5.0


def outbox_path(cfg: Config) -> Path:
    """`<state_dir>/mqtt-outbox-<device_id>.jsonl`."""
    return Path(cfg.state_dir).expanduser() / f"mqtt-outbox-{cfg.device_id}.jsonl"


def _payload_bytes(payload: Any) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    return str(payload).encode()


@dataclass
class MqttStats:
    """Counters for the state topic, tests and benchmarks."""

    connects: int = 0
    failures: int = 0
    published: int = 0
    commands: int = 0
    connected_at: list[float] = field(default_factory=list)  # monotonic
    offline_s: list[float] = field(default_factory=list)  # each outage, lost -> connected
    backlog: list[int] = field(default_factory=list)  # outbox length at each connect
    last_error: str | None = None


class MqttService(Service):
    """Publishes every bus event, serves commands, keeps `status` and `state` retained."""

    name = "mqtt"

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self.cfg = app.cfg.mqtt
        self.device_id = app.cfg.device_id
        self.topics = Topics.for_config(self.cfg, self.device_id)
        self.sub = app.bus.subscribe(app.cfg.events.queue_size, name="mqtt")
        # Opened in run(), off the loop (and after a replaced service has closed it).
        self.outbox = Outbox(self.cfg.outbox_size,
                             outbox_path(app.cfg) if self.cfg.outbox_persist else None,
                             offload=True, load=False)
        self.discovery = Discovery(app, self.topics, state_path(app.cfg))
        self.router = CommandRouter(app.commands, on_error=app.report)
        self._commands: set[asyncio.Task[None]] = set()
        self._command_slots = asyncio.Semaphore(MAX_CONCURRENT_COMMANDS)
        self.stats = MqttStats()
        self.connected = asyncio.Event()
        self._closing = asyncio.Event()  # the bus closed: deliver what is left, then leave
        self._state_dirty = asyncio.Event()
        self._backoff = Backoff(self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s)
        self._outage_since: float | None = None  # first failure of the current outage
        self._reported: str | None = None
        self._drops_reported = 0
        self._persist_reported = False
        self._flush_deadline: float | None = None  # monotonic; set when shutdown begins
        self._protocol = protocol_of(self.cfg)
        self._last_exc: BaseException | None = None
        self._retained = RetainedFilter()
        self.failed_messages = 0
        self._failures_reported_at = -MESSAGE_REPORT_INTERVAL_S

    # -- bus -> outbox ----------------------------------------------------------------------

    def enqueue(self, ev: BaseEvent) -> Entry | None:
        """Queue one event for `event/<type>`; never blocks the daemon."""
        if ev.type in STATE_EVENTS:
            self._state_dirty.set()
        return self.outbox.put(self.topics.event(ev.type), ev.model_dump_json(),
                               event_qos(self.cfg, ev.type), event_rank(ev.type), ev.type)

    async def _feed(self) -> None:
        async for ev in self.sub:
            self.enqueue(ev)
        self._closing.set()

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, reconnect with backoff, and on shutdown flush, say `offline`, disconnect."""
        with self.sub:
            if self.outbox.path is not None:
                await asyncio.to_thread(self.outbox.open)
                if self.outbox.damage:
                    self.app.report(BrokerError("outbox_corrupt", self.outbox.damage))
            feed = asyncio.create_task(self._feed(), name="mqtt-feed")
            try:
                tls = await asyncio.to_thread(tls_context, self.cfg)
                await self._connect_loop(tls)
            except (asyncio.CancelledError, BrokerError):
                raise
            except Exception as e:
                # A bug, not the broker: the daemon goes on without MQTT, and says so.
                self.app.problems["mqtt"] = f"MQTT front-end stopped: {type(e).__name__}: {e}"
                raise
            finally:
                feed.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed
                for t in list(self._commands):
                    t.cancel()
                if self.outbox:
                    log.warning("MQTT: %d messages not delivered, kept for the next start%s",
                                len(self.outbox), "" if self.outbox.path else " (not persisted)")
                await self.outbox.aclose()

    def _flush_left(self) -> float:
        """Seconds left to deliver the outbox, once shutdown has begun."""
        if self._flush_deadline is None:
            self._flush_deadline = time.monotonic() + self.cfg.shutdown_flush_s
        return max(0.0, self._flush_deadline - time.monotonic())

    async def _connect_loop(self, tls: ssl.SSLContext | None) -> None:
        while True:
            if self._closing.is_set() and (not self.outbox or self._flush_left() <= 0):
                return
            client = make_client(self.cfg, self.topics, self.device_id, tls, self._protocol)
            client.pending_calls_threshold = MAX_INFLIGHT + 10
            try:
                async with client:
                    try:
                        await self._session(client)
                    except aiomqtt.MqttError:
                        raise
                    except (asyncio.CancelledError, Exception):
                        # Cancelled with the daemon, or dying of a bug: the disconnect below
                        # is a clean one, which suppresses the Last Will, so say `offline`
                        # ourselves if we can.
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(client.publish(
                                self.topics.status, OFFLINE, qos=1, retain=True), 1.0)
                        raise
                    await client.publish(self.topics.state, self.state_payload(), qos=1,
                                         retain=True)
                    # Leaving on purpose: a clean disconnect suppresses the Last Will.
                    await client.publish(self.topics.status, OFFLINE, qos=1, retain=True)
                log.info("MQTT: disconnected from %s:%d", self.cfg.host, self.cfg.port)
                return
            except (aiomqtt.MqttError, OSError) as e:
                if self._protocol == "5" and unsupported_protocol(e):
                    log.warning("MQTT: the broker does not speak MQTT 5; using 3.1.1")
                    self._protocol = "3.1.1"
                    continue
                self._last_exc = e
                self._failed(classify(e))
            finally:
                self.connected.clear()
            delay = self._backoff.next()
            if self._closing.is_set():
                await asyncio.sleep(min(delay, self._flush_left()))
            else:
                log.debug("MQTT: reconnecting in %.2f s", delay)
                await self._wait_to_retry(delay)

    async def _wait_to_retry(self, delay: float) -> None:
        """Sleep `delay`, cut short by shutdown, or by the broker's port opening again.

        The probe is a plain TCP connect, only while the failure was "nothing listens" (a
        restarting broker): a broker that refuses our credentials is not hammered.
        """
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._closing.wait())]
        if self._last_exc is not None and refused(self._last_exc):
            waits.append(asyncio.ensure_future(until_listening(
                self.cfg.host, self.cfg.port, self._backoff.jitter(PROBE_JITTER_S))))
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: announce, then publish, serve commands and state until it ends."""
        sub_args = command_subscription(self._protocol == "5")
        await client.subscribe(self.topics.commands, **sub_args)  # type: ignore[arg-type]
        if self.cfg.discovery:
            # Home Assistant's birth message: it lost our configs, send them again.
            await client.subscribe(f"{self.cfg.discovery_prefix}/status", qos=1)
        await client.publish(self.topics.status, ONLINE, qos=1, retain=True)
        # Configs, or (discovery turned off since) the removals of what was published.
        await self.discovery.sync(client)
        self._connected()
        self.outbox.rewind()
        self._state_dirty.set()
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        tasks = [
            asyncio.create_task(self._reader(client), name="mqtt-reader"),
            asyncio.create_task(self._sender(client, lost), name="mqtt-sender"),
            asyncio.create_task(self._state_loop(client), name="mqtt-state"),
            asyncio.create_task(self._until_flushed(), name="mqtt-flush"),
            asyncio.create_task(self._drop_reporter(), name="mqtt-drops"),
            # Entities that depend on loaded models are published again once they load.
            asyncio.create_task(self.discovery.follow(client), name="mqtt-discovery"),
        ]
        try:
            done, _ = await asyncio.wait([*tasks, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not lost.done():
                lost.cancel()
        # The connection broke: re-raise its MqttError (and retrieve every other one).
        errors = [e for f in done if not f.cancelled() and (e := f.exception()) is not None]
        if errors:
            raise errors[0]

    async def _until_flushed(self) -> None:
        """Return once shutting down and the outbox is delivered (or the flush time is up)."""
        await self._closing.wait()
        try:
            await asyncio.wait_for(self.outbox.wait_empty(), self._flush_left())
        except TimeoutError:
            log.warning("MQTT: outbox not delivered within %.1f s of shutdown (%d left)",
                        self.cfg.shutdown_flush_s, len(self.outbox))

    async def _drop_reporter(self) -> None:
        """Say how much an overflowing outbox lost, once what it kept is delivered."""
        while True:
            # Reported only when the outbox is empty, so the report itself pushes nothing out.
            await self.outbox.wait_empty()
            if self.outbox.dropped_total > self._drops_reported:
                self._drops_reported = self.outbox.dropped_total
                counts = ", ".join(f"{k} {v}" for k, v in sorted(self.outbox.dropped.items()))
                self.app.report(BrokerError(
                    "outbox_overflow", f"outbox full ({self.outbox.maxsize}): "
                    f"{self._drops_reported} messages dropped since start ({counts})"))
            await asyncio.sleep(DROP_REPORT_INTERVAL_S)

    def _connected(self) -> None:
        now = time.monotonic()
        self.stats.connects += 1
        self.stats.connected_at.append(now)
        self.stats.backlog.append(len(self.outbox))
        if self._outage_since is not None and self.stats.connects > 1:
            self.stats.offline_s.append(now - self._outage_since)
            log.info("MQTT: reconnected to %s:%d after %.2f s; %d messages to deliver",
                     self.cfg.host, self.cfg.port, now - self._outage_since, len(self.outbox))
        else:
            log.info("MQTT: connected to %s:%d as %s", self.cfg.host, self.cfg.port,
                     self.topics.prefix)
        self._outage_since = None
        self._reported = None
        self._backoff.reset()
        self.connected.set()
        if self.outbox.persist_error and not self._persist_reported:
            self._persist_reported = True
            self.app.report(BrokerError("outbox_persist", self.outbox.persist_error))

    def _failed(self, err: BrokerError) -> None:
        self.stats.failures += 1
        self.stats.last_error = err.code
        first = self._outage_since is None
        if first:
            self._outage_since = time.monotonic()
        # One event per outage (plus credential/TLS problems): a broker that stays down
        # must not fill the outbox with its own error events.
        if first or (err.code in _CONFIG_CODES and err.code != self._reported):
            self._reported = err.code
            self.app.report(err)
        else:
            log.debug("MQTT: %s", err)

    # -- one connection's tasks -------------------------------------------------------------

    async def _sender(self, client: aiomqtt.Client, lost: asyncio.Future[None]) -> None:
        """Hand outbox entries to the broker in order, a window of them in flight."""
        window = asyncio.Semaphore(MAX_INFLIGHT)
        pending: set[asyncio.Task[None]] = set()

        async def publish(entry: Entry) -> None:
            try:
                await client.publish(entry.topic, entry.payload, qos=entry.qos)
            except (aiomqtt.MqttError, OSError) as e:
                if not lost.done():
                    lost.set_exception(e)
            except Exception as e:
                # This message cannot be published (paho refused it): drop it, not the
                # connection, or it would be retried at every reconnect, for ever.
                self.outbox.ack(entry.seq)
                self._message_failed(entry.topic, e, "publish")
            else:
                # Acknowledged (QoS 1/2) or written (QoS 0): only now it leaves the outbox.
                self.outbox.ack(entry.seq)
                self.stats.published += 1
            finally:
                window.release()

        try:
            while True:
                entry = await self.outbox.next()
                await window.acquire()
                # Tasks start in creation order, so paho writes the packets in outbox order.
                t = asyncio.create_task(publish(entry))
                pending.add(t)
                t.add_done_callback(pending.discard)
        finally:
            for t in list(pending):
                t.cancel()

    async def _reader(self, client: aiomqtt.Client) -> None:
        """Commands in; a reply for each. Raises MqttError when the connection drops.

        Whatever one message does wrong is that message's problem: it is reported and
        dropped, and the reader goes on.
        """
        async for msg in client.messages:
            try:
                await self._on_message(client, msg)
            except (aiomqtt.MqttError, asyncio.CancelledError):
                raise
            except Exception as e:
                self._message_failed(getattr(msg.topic, "value", "?"), e, "handle")

    async def _on_message(self, client: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        topic = msg.topic.value
        raw = _payload_bytes(msg.payload)
        if topic == f"{self.cfg.discovery_prefix}/status":
            if raw.strip() == b"online" and self.cfg.discovery:
                await self._publish_discovery(client)
            return
        name = self.topics.command_name(topic)
        if name is None:
            if topic.rstrip("/") != f"{self.topics.prefix}/cmd":
                return
            name = ""  # `cmd` or `cmd/` itself: no command name, an error reply says so
        if self._retained.ignore(topic, raw, msg.retain):
            return
        self.stats.commands += 1
        if self._command_slots.locked():
            # Past the limit the reply says so at once: nothing piles up unbounded.
            self._reply(await self.router.busy(name, raw))
            return
        await self._command_slots.acquire()
        task = asyncio.create_task(self._run_command(name, raw), name=f"mqtt-cmd:{clip(name)}")
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _run_command(self, name: str, raw: bytes) -> None:
        try:
            self._reply(await self.router.handle(name, raw))
        except Exception as e:  # the router never raises; a reply that cannot be queued might
            self._message_failed(self.topics.command(name), e, "reply")
        finally:
            self._command_slots.release()

    def _message_failed(self, topic: str, e: Exception, what: str) -> None:
        """One message could not be handled: logged, counted, reported now and then."""
        self.failed_messages += 1
        log.error("MQTT: cannot %s a message on %s, dropped: %s: %s", what, clip(topic),
                  type(e).__name__, clip(str(e), 200), exc_info=e)
        now = time.monotonic()
        if now - self._failures_reported_at >= MESSAGE_REPORT_INTERVAL_S:
            self._failures_reported_at = now
            self.app.report(BrokerError(
                "message_failed", f"cannot {what} a message on {clip(topic)} "
                f"({type(e).__name__}: {clip(str(e), 200)}); dropped it "
                f"({self.failed_messages} since start)"))

    def _reply(self, reply: Reply) -> None:
        self.outbox.put(self.topics.reply(reply.request_id), reply.model_dump_json(),
                        REPLY_QOS, RANK_FINAL, "reply")

    async def _state_loop(self, client: aiomqtt.Client) -> None:
        """Keep the retained `state` topic current, one publish per burst of changes."""
        # The payload carries the daemon's status: one published while the models still load
        # says "starting", so becoming ready is a change too.
        ready = asyncio.create_task(self.app.ready.wait())
        ready.add_done_callback(lambda _: self._state_dirty.set())
        try:
            while True:
                await self._state_dirty.wait()
                await asyncio.sleep(STATE_COALESCE_S)
                self._state_dirty.clear()
                await client.publish(self.topics.state, self.state_payload(), qos=1,
                                     retain=True)
        finally:
            ready.cancel()

    async def _publish_discovery(self, client: aiomqtt.Client) -> None:
        await self.discovery.sync(client)

    def state_payload(self) -> str:
        """The daemon's snapshot plus this front-end's own counters, as JSON."""
        snap = self.app.snapshot().model_dump(mode="json")
        snap["mqtt"] = {"outbox": len(self.outbox), "dropped": self.outbox.dropped_total,
                        "connects": self.stats.connects}
        return json.dumps(snap, default=str)

