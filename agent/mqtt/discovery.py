"""Home Assistant MQTT discovery: one device-based config, migration, removals.

The daemon is one device (`<prefix>/device/voice-agent-<id>/config`, HA's device-based
schema: `dev`, `o`, `cmps`). Entities read the retained `state` topic (the app's snapshot), so
Home Assistant shows current values after its own restart, and go unavailable with `status`.
The previous releases published one config per entity (`<prefix>/sensor/<id>/<object>/
config`); those are migrated as HA documents it: `{"migrate_discovery": true}` on each old
topic, then the device config (same `unique_id`s, so entity ids and customisations stay), then
an empty retained payload on the old topics. An entity that goes away is published once as
`{"p": <platform>}` (HA's removal of one component); discovery turned off publishes an empty
retained device config, which removes them all. What was published last is remembered in
`<state_dir>/mqtt-discovery-<device_id>.json`, so each of those happens once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__
from agent.mqtt.topics import OFFLINE, ONLINE, Topics

if TYPE_CHECKING:
    from agent.app.core import App
    from agent.config import Config

log = logging.getLogger(__name__)

# (platform, object id) of every entity the per-entity releases published.
LEGACY = (("sensor", "last_transcript"), ("sensor", "last_speaker"),
          ("sensor", "last_emotion"), ("sensor", "gate_state"), ("button", "push_to_talk"))
# Components that exist only while their analyser does.
NEEDS_ANALYSER = {"last_speaker": "speaker", "last_emotion": "emotion"}
DIAGNOSTIC = "diagnostic"
# HA's MQTT sensor turns the rendered string "None" into the `unknown` state.
_LAST = "{% set x = value_json.get('KEY') %}{{ x.get('FIELD') if x else None }}"
_ATTRS = "{{ (value_json.get('KEY') or {}) | tojson }}"


def _last(key: str, field: str) -> str:
    return _LAST.replace("KEY", key).replace("FIELD", field)


def _attrs(key: str) -> str:
    return _ATTRS.replace("KEY", key)


def node_id(device_id: str) -> str:
    """The device's id in discovery topics and `identifiers`."""
    return f"voice-agent-{device_id}"


def device_topic(prefix: str, device_id: str) -> str:
    """`<prefix>/device/voice-agent-<id>/config`."""
    return f"{prefix}/device/{node_id(device_id)}/config"


def legacy_topics(prefix: str, device_id: str) -> list[str]:
    """The per-entity config topics of earlier releases."""
    return [f"{prefix}/{p}/{device_id}/{o}/config" for p, o in LEGACY]


def components(topics: Topics, *, speaker: bool = False, emotion: bool = False
               ) -> dict[str, dict[str, Any]]:
    """object id -> component config (`p` and its options; shared options are inherited)."""
    state = {"icon": "mdi:microphone", "value_template": "{{ value_json.gate.state }}"}
    out: dict[str, dict[str, Any]] = {
        "last_transcript": {
            "p": "sensor", "name": "Last transcript", "icon": "mdi:text-to-speech",
            # A sensor state is at most 255 characters; the whole final is in the attributes.
            "value_template": "{% set x = value_json.get('last_final') %}"
                              "{{ x.get('text', '')[:255] if x else None }}",
            "json_attributes_topic": topics.state,
            "json_attributes_template": _attrs("last_final"),
        },
        # A sensor does not change when the same words are said twice: the event entity fires
        # on every final (the event topic is not retained; delivery is at least once).
        "transcript": {
            "p": "event", "name": "Transcript", "icon": "mdi:message-text",
            "state_topic": topics.event("asr.final"), "event_types": ["final"],
            "value_template": "{{ {'event_type': 'final', 'text': value_json.text, "
                              "'language': value_json.language, 'utterance_id': "
                              "value_json.utterance_id} | tojson }}",
        },
        "gate_state": {"p": "sensor", "name": "Gate", "device_class": "enum",
                       "options": ["closed", "open"], **state},
        # The switch reads the real gate state; turning it on or off sets the gate (a no-op
        # when it is already there), unlike the button, which toggles.
        "listening": {"p": "switch", "name": "Listening", **state,
                      "command_topic": topics.command("listening"),
                      "payload_on": '{"on": true}', "payload_off": '{"on": false}',
                      "state_on": "open", "state_off": "closed"},
        "push_to_talk": {"p": "button", "name": "Push to talk", "icon": "mdi:microphone-message",
                         # A button cannot be held: a press toggles listening.
                         "command_topic": topics.command("ptt/toggle"), "payload_press": "{}"},
        "health": {"p": "sensor", "name": "Status", "device_class": "enum",
                   "options": ["starting", "ok", "degraded", "stopping"],
                   "value_template": "{{ value_json.status }}",
                   "json_attributes_topic": topics.state,
                   "json_attributes_template": "{{ {'problems': value_json.problems} | tojson }}",
                   "entity_category": DIAGNOSTIC, "icon": "mdi:heart-pulse"},
        "models": {"p": "sensor", "name": "Models", "icon": "mdi:brain",
                   "value_template": "{{ value_json.models.asr or 'none' }}",
                   "json_attributes_topic": topics.state,
                   "json_attributes_template": _attrs("models"), "entity_category": DIAGNOSTIC},
        # `state` is published on changes only, so a seconds counter would go stale; the start
        # time does not (rounded to the minute so each publish does not make a new value).
        "up_since": {"p": "sensor", "name": "Up since", "device_class": "timestamp",
                     "value_template": "{{ (now() - timedelta(seconds=value_json.uptime_s))"
                                       ".replace(second=0, microsecond=0).isoformat() }}",
                     "entity_category": DIAGNOSTIC},
        "audio": {"p": "sensor", "name": "Audio input", "device_class": "enum",
                  "options": ["starting", "ok", "unavailable", "stalled", "ended"],
                  "value_template": "{{ value_json.audio.state }}",
                  "json_attributes_topic": topics.state,
                  "json_attributes_template": _attrs("audio"),
                  "entity_category": DIAGNOSTIC, "icon": "mdi:microphone-settings"},
        "outbox_dropped": {"p": "sensor", "name": "MQTT messages dropped",
                           "state_class": "total_increasing", "icon": "mdi:email-remove",
                           "value_template": "{{ (value_json.get('mqtt') or {})"
                                             ".get('dropped', 0) }}",
                           "entity_category": DIAGNOSTIC},
    }
    if speaker:
        out["last_speaker"] = {"p": "sensor", "name": "Last speaker", "icon": "mdi:account-voice",
                               "value_template": _last("last_speaker", "name"),
                               "json_attributes_topic": topics.state,
                               "json_attributes_template": _attrs("last_speaker")}
    if emotion:
        out["last_emotion"] = {"p": "sensor", "name": "Last emotion",
                               "icon": "mdi:emoticon-outline",
                               "value_template": _last("last_emotion", "label"),
                               "json_attributes_topic": topics.state,
                               "json_attributes_template": _attrs("last_emotion")}
    return out


def device_config(topics: Topics, device_id: str, comps: dict[str, dict[str, Any]], *,
                  removed: dict[str, str] | None = None, configuration_url: str | None = None,
                  support_url: str | None = None) -> dict[str, Any]:
    """The device-based discovery payload; `removed` (object id -> platform) become `{"p"}`."""
    dev: dict[str, Any] = {"identifiers": [node_id(device_id)], "name": f"Voice agent {device_id}",
                           "manufacturer": "voice-agent", "model": "voice-agent",
                           "sw_version": __version__}
    if configuration_url:
        dev["configuration_url"] = configuration_url
    origin: dict[str, Any] = {"name": "voice-agent", "sw_version": __version__}
    if support_url:
        origin["support_url"] = support_url
    cmps = {o: {**c, "unique_id": f"{node_id(device_id)}-{o}"} for o, c in comps.items()}
    for o, platform in (removed or {}).items():
        if o not in cmps:
            cmps[o] = {"p": platform}
    return {"dev": dev, "o": origin, "cmps": cmps,
            # Shared options: every component inherits them unless it sets its own.
            "state_topic": topics.state, "availability_topic": topics.status,
            "payload_available": ONLINE, "payload_not_available": OFFLINE, "qos": 1}


def discovery_messages(topics: Topics, device_id: str, prefix: str = "homeassistant", *,
                       speaker: bool = False, emotion: bool = False, migrate: bool = True,
                       removed: dict[str, str] | None = None,
                       configuration_url: str | None = None,
                       support_url: str | None = None) -> list[tuple[str, str]]:
    """(topic, retained payload) to publish in this order; `migrate` adds the hand-over."""
    comps = components(topics, speaker=speaker, emotion=emotion)
    config = device_config(topics, device_id, comps, removed=removed,
                           configuration_url=configuration_url, support_url=support_url)
    old = legacy_topics(prefix, device_id) if migrate else []
    return ([(t, json.dumps({"migrate_discovery": True})) for t in old]
            + [(device_topic(prefix, device_id), json.dumps(config))]
            + [(t, "") for t in old])


def removal_messages(prefix: str, device_id: str) -> list[tuple[str, str]]:
    """Empty retained payloads that remove the device (and any per-entity leftovers)."""
    return [(device_topic(prefix, device_id), "")] + [(t, "") for t in
                                                       legacy_topics(prefix, device_id)]


# -- where the kiosk is ----------------------------------------------------------------------


def _lan_address() -> str:
    """This machine's address on the default route (no packet is sent), else its name."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
        addr: str = s.getsockname()[0]
        return addr
    return socket.gethostname()


def configuration_url(cfg: Config) -> str | None:
    """The kiosk's URL as Home Assistant's users reach it (never with the API key in it)."""
    override = cfg.mqtt.configuration_url
    if override:
        return str(override)
    api = cfg.api
    if not api.enabled or not api.kiosk or not api.port:
        return None
    host = _lan_address() if api.host in ("0.0.0.0", "::", "") else api.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{api.port}/"


def support_url(cfg: Config, config_url: str | None) -> str | None:
    """Where users get help: `mqtt.support_url`, else the package's home page, else the kiosk."""
    override = cfg.mqtt.support_url
    if override:
        return str(override)
    with contextlib.suppress(Exception):
        from importlib.metadata import metadata

        for entry in metadata("voice-agent").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() in ("homepage", "documentation", "issues"):
                return url.strip()
    return config_url


# -- publishing, with memory of what was published --------------------------------------------


class RetainedPublisher(Protocol):
    """What discovery needs of an MQTT client (aiomqtt.Client fits)."""

    async def publish(self, topic: str, payload: Any = None, qos: int = 0,
                      retain: bool = False) -> Any:
        """Publish one message."""
        ...


@dataclass
class DiscoveryState:
    """What the broker holds from us: prefix, components (object id -> platform), migrated."""

    prefix: str | None = None
    published: dict[str, str] = field(default_factory=dict)
    migrated: bool = False

    @classmethod
    def load(cls, path: Path | None) -> DiscoveryState:
        """The saved state; a missing or unreadable file is a fresh start."""
        if path is None:
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(prefix=data.get("prefix"), published=dict(data.get("published") or {}),
                       migrated=bool(data.get("migrated")))
        except (OSError, ValueError, TypeError, AttributeError):
            return cls()

    def save(self, path: Path | None) -> None:
        """Write atomically (a crash mid-write keeps the old state)."""
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"prefix": self.prefix, "published": self.published,
                                       "migrated": self.migrated}), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            log.warning("MQTT discovery: cannot save %s: %s", path, e)


def state_path(cfg: Config) -> Path:
    """`<state_dir>/mqtt-discovery-<device_id>.json`."""
    return Path(cfg.state_dir).expanduser() / f"mqtt-discovery-{cfg.device_id}.json"


class Discovery:
    """Keeps Home Assistant's view of the device in line with the config and loaded models."""

    def __init__(self, app: App, topics: Topics, path: Path | None = None) -> None:
        self.app = app
        self.cfg = app.cfg.mqtt
        self.device_id = app.cfg.device_id
        self.topics = topics
        self.path = path
        self.state = DiscoveryState.load(path)
        self.published = 0  # messages, for tests and stats

    def wanted(self) -> dict[str, dict[str, Any]]:
        """The components for what is loaded now (before models load, keep what was there)."""
        loaded = self.app.analysers
        have = {o: (a in loaded) or (not self.app.ready.is_set() and o in self.state.published)
                for o, a in NEEDS_ANALYSER.items()}
        return components(self.topics, speaker=have["last_speaker"], emotion=have["last_emotion"])

    def messages(self) -> list[tuple[str, str]]:
        """What `sync` publishes now, in order."""
        prefix = self.cfg.discovery_prefix
        if not self.cfg.discovery:
            # Remove only what we put there; a user who never had discovery on gets nothing.
            if self.state.prefix is None:
                return []
            return removal_messages(self.state.prefix, self.device_id)
        comps = self.wanted()
        gone = {o: p for o, p in self.state.published.items() if o not in comps}
        out: list[tuple[str, str]] = []
        if self.state.prefix not in (None, prefix):
            # The prefix changed: what lives under the old one would stay forever.
            out += removal_messages(self.state.prefix, self.device_id)
        url = configuration_url(self.app.cfg)
        config = device_config(self.topics, self.device_id, comps, removed=gone,
                               configuration_url=url, support_url=support_url(self.app.cfg, url))
        old = [] if self.state.migrated else legacy_topics(prefix, self.device_id)
        out += [(t, json.dumps({"migrate_discovery": True})) for t in old]
        out.append((device_topic(prefix, self.device_id), json.dumps(config)))
        out += [(t, "") for t in old]
        return out

    async def sync(self, client: RetainedPublisher) -> None:
        """Publish configs (or removals, with discovery off) and remember what was published."""
        msgs = self.messages()
        for topic, payload in msgs:
            await client.publish(topic, payload, qos=1, retain=True)
        self.published += len(msgs)
        if self.cfg.discovery:
            self.state = DiscoveryState(self.cfg.discovery_prefix,
                                        {o: c["p"] for o, c in self.wanted().items()}, True)
        elif msgs:
            self.state = DiscoveryState()
        else:
            return
        await asyncio.to_thread(self.state.save, self.path)

    async def follow(self, client: RetainedPublisher) -> None:
        """Once models are loaded, publish again if the entities they decide changed.

        Runs until cancelled, like the MQTT session's other tasks (one that returned would
        end the session).
        """
        if self.cfg.discovery:
            await self.app.ready.wait()
            if {o: c["p"] for o, c in self.wanted().items()} != self.state.published:
                await self.sync(client)
        await asyncio.Event().wait()
