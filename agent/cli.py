"""Command line: `voice-agent run | check-config | devices`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from agent import __version__, logsetup, service_install
from agent.config import Config, load_config
from agent.errors import AgentError, ConfigError
from agent.models.cli import add_models_arguments

log = logging.getLogger(__name__)

EXIT_CONFIG = 2


def _config_or_exit(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        where = path or "embedded defaults"
        print(f"config error ({where}):", file=sys.stderr)
        for line in e.message.splitlines():
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    """Print `ok` or every problem with its YAML path."""
    _config_or_exit(args.file)
    print("ok")
    return 0


def _overrides(args: argparse.Namespace) -> Callable[[Config], Config]:
    """The command line's changes to a config (applied again on every reload)."""
    from agent.audio.sources import parse_source_spec

    def apply(cfg: Config) -> Config:
        audio = parse_source_spec(args.source, cfg.audio)
        if args.mode:
            cfg = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"mode": args.mode})})
        if args.realtime is not None:
            audio = audio.model_copy(update={"realtime": args.realtime})
        elif args.source and args.source.startswith("file:"):
            # A recording given on the command line is processed as fast as possible.
            audio = audio.model_copy(update={"realtime": False})
        return cfg.model_copy(update={"audio": audio})

    return apply


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon."""
    from agent import logsetup, notify
    from agent.daemon import Daemon

    notify.init()  # NOTIFY_SOCKET is ours: children must not inherit it
    cfg = _config_or_exit(args.config)
    overrides = _overrides(args)
    try:
        cfg = overrides(cfg)
        logsetup.setup_logging("debug" if args.verbose else cfg.log_level,
                               secrets=logsetup.secrets_of(cfg))
        to_stdout = args.events == "-"
        # The live line and keyboard push-to-talk are for a person at a terminal.
        terminal = sys.stdout.isatty() and not to_stdout
        keyboard = (sys.stdin.isatty() and cfg.audio.source != "stdin"
                    and cfg.gate.mode != "vad")
        daemon = Daemon(cfg, events_target=args.events, terminal=terminal, keyboard=keyboard,
                        banner=sys.stderr if to_stdout else sys.stdout,
                        config_path=args.config, overrides=overrides)
    except AgentError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    daemon.on_shutdown.append(_exit_deadline)
    rc = asyncio.run(daemon.run())
    _hard_exit(rc)
    return rc  # not reached


def _exit_deadline() -> None:
    """SIGTERM exits within the shutdown grace + 1 s, whatever a device or decode is doing."""
    from agent.daemon import SHUTDOWN_GRACE_S

    timer = threading.Timer(SHUTDOWN_GRACE_S + 0.8, _hard_exit, args=(0,))
    timer.daemon = True
    timer.start()


def _hard_exit(rc: int) -> None:
    # Worker threads still in a model call or a device read would be joined at interpreter
    # exit; everything that matters is flushed by now, so leave without waiting for them.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)


async def _transcribe_files(cfg: Config, files: list[str], as_json: bool) -> int:
    """Load the model once, then run each file through the registry's `asr/transcribe`."""
    from agent.app.capabilities import create_app
    from agent.app.commands import CallContext

    app = create_app(cfg)
    await app.load_analysers()
    try:
        if app.asr_engine is None:
            why = "; ".join(app.problems.values()) or "asr.enabled is false"
            print(f"error: no ASR model: {why}", file=sys.stderr)
            return 1
        rc = 0
        for path in files:
            out: dict[str, object] = {"file": path}
            try:
                data = await asyncio.to_thread(Path(path).read_bytes)
                result = await app.commands.dispatch(
                    "asr/transcribe", {}, CallContext(surface="cli", attachment=data))
            except OSError as e:
                out.update(ok=False, error=f"cannot read: {e.strerror or e}")
            except AgentError as e:
                out.update(ok=False, error=f"{e.stage}/{e.code}: {e.message}")
            else:
                text = getattr(result, "text", "")
                out.update(ok=bool(text), **result.model_dump(mode="json"))
                if not text:
                    out["error"] = "no speech found"
            if not out["ok"]:
                rc = 1
            if as_json:
                print(json.dumps(out, ensure_ascii=False), flush=True)
            elif out["ok"]:
                prefix = f"{path}: " if len(files) > 1 else ""
                print(prefix + str(out["text"]), flush=True)
            if not out["ok"] and not as_json:
                print(f"error: {path}: {out['error']}", file=sys.stderr)
        return rc
    finally:
        await app.close()


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Print the transcript of each file (exit 1 when any failed or held no speech)."""
    cfg = _config_or_exit(args.config)
    asr_update: dict[str, object] = {"enabled": True, "partials": False}
    if args.model:
        asr_update["model"] = args.model
    if args.model_dir:
        asr_update["model_dir"] = Path(args.model_dir)
    if args.language is not None and hasattr(cfg.asr, "language"):
        asr_update["language"] = args.language
    cfg = cfg.model_copy(update={"asr": cfg.asr.model_copy(update=asr_update),
                                 "log_level": "warning"})
    logging.getLogger().setLevel(logging.WARNING)
    return asyncio.run(_transcribe_files(cfg, args.files, args.json))


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


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree."""
    p = argparse.ArgumentParser(prog="voice-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"voice-agent {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("-c", "--config", help="YAML config (default: embedded defaults)")
    r.add_argument("--source", help="mic, mic:DEVICE, file:PATH or stdin (overrides config)")
    r.add_argument("--mode", choices=["ptt", "ptt_toggle", "vad"], help="gate mode override")
    r.add_argument("--events", help="write events as JSON lines to FILE, or - for stdout")
    rt = r.add_mutually_exclusive_group()
    rt.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                    help="pace a file source in real time")
    rt.add_argument("--fast", dest="realtime", action="store_false",
                    help="process a file source as fast as possible")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file", nargs="?", help="YAML file (default: embedded defaults + env)")
    c.set_defaults(func=cmd_check_config)

    t = sub.add_parser("transcribe", help="transcribe audio files with the local ASR model")
    t.add_argument("files", nargs="+", metavar="FILE")
    t.add_argument("-c", "--config", help="YAML config (default: embedded defaults)")
    t.add_argument("--model", help="model id from `voice-agent models list`")
    t.add_argument("--model-dir", help="directory with the model files")
    t.add_argument("--language", help="language code for multilingual models (e.g. zh)")
    t.add_argument("--json", action="store_true", help="one JSON object per file, with timings")
    t.set_defaults(func=cmd_transcribe)

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
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `voice-agent` console script."""
    args = build_parser().parse_args(argv)
    logsetup.setup_logging("debug" if args.verbose else "info")
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

