"""The topic scheme under one prefix, and which QoS and drop rank each message gets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.config import MqttConfig

# A request id becomes one topic level: no separators, no wildcards, bounded length.
REQUEST_ID_RE = r"^[A-Za-z0-9_.:-]{1,64}$"
_REQUEST_ID = re.compile(REQUEST_ID_RE)

# Outbox drop ranks: when it is full the lowest rank goes first (oldest within a rank).
RANK_PARTIAL = 0
RANK_EVENT = 1
RANK_FINAL = 2

REPLY_QOS = 1
ONLINE = "online"
OFFLINE = "offline"


def valid_request_id(value: str) -> bool:
    """Whether `value` can be used as the last level of a reply topic."""
    return bool(_REQUEST_ID.match(value))


@dataclass(frozen=True)
class Topics:
    """Every topic of one device: `<prefix>/event/<type>`, `status`, `state`, `cmd/...`."""

    prefix: str

    @classmethod
    def for_config(cls, cfg: MqttConfig, device_id: str) -> Topics:
        """The configured prefix, or `voice-agent/<device_id>`."""
        return cls(cfg.topic_prefix or f"voice-agent/{device_id}")

    def event(self, event_type: str) -> str:
        """Where events of one type are published (`event/asr.final`)."""
        return f"{self.prefix}/event/{event_type}"

    @property
    def status(self) -> str:
        """Retained `online` / `offline` (the Last Will publishes `offline`)."""
        return f"{self.prefix}/status"

    @property
    def state(self) -> str:
        """Retained JSON snapshot of the daemon."""
        return f"{self.prefix}/state"

    @property
    def commands(self) -> str:
        """Subscription filter for every command."""
        return f"{self.prefix}/cmd/#"

    def command(self, name: str) -> str:
        """Where one command is sent (`cmd/ptt/start`)."""
        return f"{self.prefix}/cmd/{name}"

    def command_name(self, topic: str) -> str | None:
        """`<prefix>/cmd/ptt/start` -> `ptt/start`; None for other topics."""
        head = f"{self.prefix}/cmd/"
        return topic[len(head):] if topic.startswith(head) and len(topic) > len(head) else None

    def reply(self, request_id: str | None) -> str:
        """`reply/<request_id>`, or bare `reply` for a command that carried none."""
        return f"{self.prefix}/reply/{request_id}" if request_id else f"{self.prefix}/reply"


def event_qos(cfg: MqttConfig, event_type: str) -> int:
    """Partials are frequent and superseded by the final: QoS 0 by default; the rest QoS 1."""
    return cfg.partial_qos if event_type == "asr.partial" else cfg.event_qos


def event_rank(event_type: str) -> int:
    """Which events an overflowing outbox gives up first: partials, then others, finals last."""
    if event_type == "asr.partial":
        return RANK_PARTIAL
    if event_type == "asr.final":
        return RANK_FINAL
    return RANK_EVENT
