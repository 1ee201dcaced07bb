"""Home Assistant add-on glue: the add-on's options -> an agent.yaml, and Wyoming discovery.

    ha_options.py config /data/options.json /tmp/agent.yaml   # exit 2 on a bad option
    ha_options.py discover --port 10300                        # announce Wyoming to HA

The Supervisor writes the options the user set (validated against `schema:` in the add-on's
config.yaml) to /data/options.json. They are mapped onto the daemon's configuration keys
here and the result is checked with the daemon's own validator, so a bad value is reported
with its YAML path before the daemon starts. With `mqtt_host` left empty, the broker comes
from the Supervisor's MQTT service (the Mosquitto add-on), read with the add-on's
SUPERVISOR_TOKEN. Standard library + the agent package only: it runs inside the image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("ha_options")

SUPERVISOR = "http://supervisor"
# The add-on's ports are fixed (config.yaml maps them); the override is for tests, which run
# the add-on image on a shared host network.
API_PORT = int(os.environ.get("VOICE_AGENT_ADDON_API_PORT") or 8765)
WYOMING_PORT = 10300


class OptionsError(Exception):
    """The options (or the Supervisor's answer) cannot make a valid configuration."""


def supervisor_request(base: str, path: str, body: dict[str, Any] | None = None,
                       timeout: float = 10.0) -> dict[str, Any]:
    """One call to the Supervisor API with the add-on's token; its `data` object."""
    token = os.environ.get("SUPERVISOR_TOKEN")
    if not token:
        raise OptionsError("SUPERVISOR_TOKEN is not set (not running as an add-on?)")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        base.rstrip("/") + path, data=data, method="GET" if body is None else "POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            answer = json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        raise OptionsError(f"Supervisor {path}: HTTP {e.code}") from None
    except (OSError, ValueError) as e:
        raise OptionsError(f"Supervisor {path}: {e}") from None
    if not isinstance(answer, dict) or answer.get("result") != "ok":
        raise OptionsError(f"Supervisor {path}: {answer!r:.200}")
    result = answer.get("data") or {}
    return result if isinstance(result, dict) else {}


def _text(options: dict[str, Any], key: str) -> str | None:
    """An optional string option: absent, null and blank all mean 'not set'."""
    value = options.get(key)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def options_to_config(options: dict[str, Any], mqtt_service: dict[str, Any] | None,
                      config_keys: set[str]) -> dict[str, Any]:
    """The agent.yaml mapping for these add-on options.

    `mqtt_service` is the Supervisor's MQTT service (host, port, username, password, ssl)
    used when no broker is given; `config_keys` are the daemon's top-level config sections,
    so that options for features this build lacks (Wyoming) are left out, not rejected.
    """
    cfg: dict[str, Any] = {
        "log_level": options.get("log_level", "info"),
        # /data is the add-on's persistent directory (kept across updates and in backups).
        "state_dir": "/data",
        "gate": {"mode": options.get("gate_mode", "ptt")},
        "vad": {"backend": options.get("vad_backend", "webrtc")},
        "asr": {"model": options.get("asr_model", "whisper-tiny.en-int8")},
        # Reached by name from Home Assistant's own pages and the LAN (the Host check refuses
        # names it was not told about: DNS rebinding).
        "api": {"enabled": True, "host": "0.0.0.0", "port": API_PORT,
                "allowed_hosts": ["homeassistant", "homeassistant.local", "*.local"]},
    }
    if device_id := _text(options, "device_id"):
        cfg["device_id"] = device_id
    if (language := options.get("asr_language")) is not None:
        cfg["asr"]["language"] = str(language).strip()
    if key := _text(options, "api_key"):
        cfg["api"]["key"] = key
    if device := _text(options, "audio_device"):
        cfg["audio"] = {"device": int(device) if device.isdigit() else device}

    if options.get("mqtt_enabled", True):
        mqtt: dict[str, Any] = {"enabled": True}
        if host := _text(options, "mqtt_host"):
            mqtt["host"] = host
            mqtt["port"] = int(options.get("mqtt_port") or 1883)
            mqtt["username"] = _text(options, "mqtt_username")
            mqtt["password"] = _text(options, "mqtt_password")
        elif mqtt_service:
            mqtt["host"] = mqtt_service.get("host")
            mqtt["port"] = int(mqtt_service.get("port") or 1883)
            mqtt["username"] = mqtt_service.get("username") or None
            mqtt["password"] = mqtt_service.get("password") or None
            mqtt["tls"] = bool(mqtt_service.get("ssl", False))
        else:
            # The daemon is still useful without MQTT (HTTP, Wyoming): run, and say why not.
            log.warning("MQTT is on but there is no broker: set mqtt_host, or install and "
                        "start the Mosquitto broker add-on; running without MQTT")
            mqtt = {"enabled": False}
        cfg["mqtt"] = mqtt

    if "wyoming" in config_keys:
        cfg["wyoming"] = {"enabled": bool(options.get("wyoming", True)), "host": "0.0.0.0",
                          "port": WYOMING_PORT}
    elif options.get("wyoming"):
        log.warning("this build of voice-agent has no Wyoming server: option ignored")
    return cfg


def _config_keys() -> set[str]:
    from agent.config import Config

    return set(Config.model_fields)


def write_config(options_path: Path, out: Path, supervisor: str) -> dict[str, Any]:
    """Map, validate and write the configuration (mode 600: it may hold secrets)."""
    from agent.config import load_config
    from agent.errors import ConfigError

    try:
        options = json.loads(options_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OptionsError(f"{options_path}: {e}") from None
    if not isinstance(options, dict):
        raise OptionsError(f"{options_path}: not a JSON object")
    service = None
    if options.get("mqtt_enabled", True) and not _text(options, "mqtt_host"):
        try:
            service = supervisor_request(supervisor, "/services/mqtt")
        except OptionsError as e:
            log.warning("no MQTT service from the Supervisor: %s", e)
    cfg = options_to_config(options, service, _config_keys())
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    try:
        # The daemon's own validator, without the image's VOICE_AGENT__ environment.
        load_config(out, env={})
    except ConfigError as e:
        raise OptionsError(f"the add-on options make an invalid configuration:\n{e.message}"
                           ) from None
    return cfg


def discover(supervisor: str, port: int) -> None:
    """Tell Home Assistant where the Wyoming server is (it then offers to add it)."""
    # The add-on's host name resolves on the Supervisor's network (as in HA's own add-ons).
    uri = f"tcp://{socket.gethostname()}:{port}"
    supervisor_request(supervisor, "/discovery",
                       {"service": "wyoming", "config": {"uri": uri}})
    log.info("Wyoming discovery sent: %s", uri)


def main(argv: list[str] | None = None) -> int:
    """CLI: `config OPTIONS OUT` or `discover`."""
    logging.basicConfig(level=logging.INFO, format="ha_options: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--supervisor", default=SUPERVISOR, help="Supervisor API base URL")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config", help="write the agent.yaml for the add-on options")
    c.add_argument("options", type=Path)
    c.add_argument("out", type=Path)
    d = sub.add_parser("discover", help="announce the Wyoming server to Home Assistant")
    d.add_argument("--port", type=int, default=WYOMING_PORT)
    args = p.parse_args(argv)
    try:
        if args.cmd == "config":
            cfg = write_config(args.options, args.out, args.supervisor)
            shown = {k: v for k, v in cfg.items() if k != "mqtt"}
            if cfg.get("mqtt", {}).get("enabled"):
                shown["mqtt"] = f"{cfg['mqtt'].get('host')}:{cfg['mqtt'].get('port')}"
            shown["api"] = f"0.0.0.0:{API_PORT}"  # without the key
            log.info("config: %s", json.dumps(shown, default=str))
        else:
            discover(args.supervisor, args.port)
    except OptionsError as e:
        print(f"ha_options: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
