"""`voice-agent check-config | devices | models | service`: set-up and inspection."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent import service_install
from agent.cli.common import config_or_exit
from agent.errors import AgentError
from agent.models.cli import add_models_arguments


def cmd_check_config(args: argparse.Namespace) -> int:
    """Print `ok` or every problem with its YAML path."""
    config_or_exit(args.file)
    print("ok")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    """List audio input devices."""
    from agent.audio.mic import list_input_devices

    try:
        devices = list_input_devices()
    except AgentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(devices, indent=2))
    elif not devices:
        print("no input devices (PortAudio sees none). Plug in a microphone, check that your "
              "user may use it (group `audio`, or a PulseAudio/PipeWire session), or run "
              "without one: --source file:REC.wav or --source stdin; the kiosk's browser "
              "microphone works either way.")
    else:
        for d in devices:
            print(f"{d['index']:3d}  {d['name']}  ({d['channels']} ch, "
                  f"{d['default_samplerate']:.0f} Hz)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """`voice-agent models list|install|verify|path`: 0 ok, 1 failure, 2 usage."""
    from agent.models.cli import run_cli

    return run_cli(args)


def add_parsers(sub: Any) -> None:
    """The set-up and inspection subcommands."""
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file", nargs="?", help="YAML file (default: embedded defaults + env)")
    c.set_defaults(func=cmd_check_config)

    d = sub.add_parser("devices", help="list audio input devices")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_devices)

    mo = sub.add_parser("models", help="list, install, verify and locate ONNX models")
    add_models_arguments(mo)
    mo.set_defaults(func=cmd_models)

    sv = sub.add_parser("service", help="run under systemd")
    inst = sv.add_subparsers(dest="service_cmd", required=True).add_parser(
        "install", help="write the unit, the user and the directories (--dry-run: show)")
    service_install.add_arguments(inst)
    inst.set_defaults(func=service_install.run)
