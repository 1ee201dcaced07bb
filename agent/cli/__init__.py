"""Command line: `voice-agent run | transcribe | emotion | speakers | diarize | say | call |
check-config | devices | models | service`."""

from __future__ import annotations

import argparse
import sys

from agent import __version__, logsetup
from agent.cli import admin, call, files, run, say, speakers


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree."""
    p = argparse.ArgumentParser(prog="voice-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"voice-agent {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)
    for module in (run, files, speakers, say, call, admin):
        module.add_parsers(sub)
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
