"""`voice-agent run`: the daemon, with the command line's overrides and a hard exit deadline."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from agent.cli.common import EXIT_CONFIG, config_or_exit
from agent.config import Config
from agent.errors import AgentError


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
    cfg = config_or_exit(args.config)
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


def add_parsers(sub: Any) -> None:
    """The `run` subcommand."""
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
