"""Home Assistant MQTT discovery: the device, its sensors and a push-to-talk button."""

from __future__ import annotations

import json
from typing import Any

from agent import __version__
from agent.mqtt.topics import OFFLINE, ONLINE, Topics

# HA's MQTT sensor turns the rendered string "None" into the `unknown` state.
_LAST = "{% set x = value_json.get('KEY') %}{{ x.get('FIELD') if x else None }}"


def _last(key: str, field: str) -> str:
    return _LAST.replace("KEY", key).replace("FIELD", field)


def discovery_messages(topics: Topics, device_id: str, prefix: str = "homeassistant"
                       ) -> list[tuple[str, str]]:
    """(topic, retained JSON payload) for every entity, per HA's discovery conventions.

    Sensors read the retained `state` topic, so Home Assistant shows current values after
    its own restart; `last_speaker` and `last_emotion` stay unknown until the daemon's state
    carries them (speaker and emotion recognition).
    """
    node = device_id
    device = {
        "identifiers": [f"voice-agent-{device_id}"],
        "name": f"Voice agent {device_id}",
        "manufacturer": "voice-agent",
        "model": "voice-agent",
        "sw_version": __version__,
    }
    common: dict[str, Any] = {
        "availability_topic": topics.status,
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
        "device": device,
        "origin": {"name": "voice-agent", "sw_version": __version__},
        "qos": 1,
    }
    sensors: dict[str, dict[str, Any]] = {
        "last_transcript": {
            "name": "Last transcript",
            "icon": "mdi:text-to-speech",
            # A sensor state is at most 255 characters; the whole final is in the attributes.
            "value_template": "{% set x = value_json.get('last_final') %}"
                              "{{ x.get('text', '')[:255] if x else None }}",
            "json_attributes_topic": topics.state,
            "json_attributes_template": "{{ (value_json.get('last_final') or {}) | tojson }}",
        },
        "last_speaker": {
            "name": "Last speaker",
            "icon": "mdi:account-voice",
            "value_template": _last("last_speaker", "name"),
        },
        "last_emotion": {
            "name": "Last emotion",
            "icon": "mdi:emoticon-outline",
            "value_template": _last("last_emotion", "label"),
        },
        "gate_state": {
            "name": "Gate",
            "icon": "mdi:microphone",
            "device_class": "enum",
            "options": ["closed", "open"],
            "value_template": "{{ value_json.gate.state }}",
        },
    }
    out: list[tuple[str, str]] = []
    for object_id, fields in sensors.items():
        payload = {**fields, "unique_id": f"voice-agent-{device_id}-{object_id}",
                   "state_topic": topics.state, **common}
        out.append((f"{prefix}/sensor/{node}/{object_id}/config", json.dumps(payload)))
    button = {
        "name": "Push to talk",
        "icon": "mdi:microphone-message",
        "unique_id": f"voice-agent-{device_id}-push_to_talk",
        # A button cannot be held: a press toggles listening (start, then stop).
        "command_topic": topics.command("ptt/toggle"),
        "payload_press": "{}",
        **common,
    }
    out.append((f"{prefix}/button/{node}/push_to_talk/config", json.dumps(button)))
    return out
