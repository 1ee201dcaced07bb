"""`voice-agent say "..." [--out reply.wav]`: the local speaker, or a file."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import sys
from pathlib import Path
from typing import Any

from agent.cli.common import config_or_exit
from agent.config import Config
from agent.errors import AgentError


async def _say(cfg: Config, text: str, out: str | None, local: bool) -> int:
    """`say` (the local speaker) or, with `out`, `tts` into a file: through the registry."""
    from agent.app.capabilities import create_app
    from agent.app.commands import CallContext
    from agent.app.reply import replies_of
    from agent.app.reply_commands import ReplyOutcome, TtsResult

    app = create_app(cfg)
    ctx = CallContext(surface="cli")
    try:
        if out:
            fmt = "mp3" if out.lower().endswith(".mp3") else "wav"
            res = await app.commands.dispatch("tts", {"text": text, "format": fmt,
                                                      "local": local}, ctx)
            assert isinstance(res, TtsResult)
            await asyncio.to_thread(Path(out).write_bytes, base64.b64decode(res.audio))
            print(f"{out}: {res.audio_s:.2f} s, {res.backend} ({res.voice})")
        else:
            said = await app.commands.dispatch("say", {"text": text, "local": local}, ctx)
            assert isinstance(said, ReplyOutcome)
            for p in said.cloud_unavailable:
                print(f"warning: cloud {p.service} unavailable ({p.code}): {p.message}; the "
                      "local voice spoke", file=sys.stderr)
    except (AgentError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        await replies_of(app).aclose()
        await app.close()
    return 0


def cmd_say(args: argparse.Namespace) -> int:
    """Speak a text on this machine's speaker, or write it to a WAV/MP3 file (--out)."""
    cfg = config_or_exit(args.config)
    logging.getLogger().setLevel(logging.WARNING)
    return asyncio.run(_say(cfg, args.text, args.out, args.local))


def add_parsers(sub: Any) -> None:
    """The `say` subcommand."""
    sy = sub.add_parser("say", help="speak a text (cloud voice, else the local one)")
    sy.add_argument("text")
    sy.add_argument("-c", "--config", help="YAML config (default: embedded defaults)")
    sy.add_argument("--out", metavar="FILE", help="write a .wav or .mp3 instead of playing")
    sy.add_argument("--local", action="store_true", help="the local Piper voice only")
    sy.set_defaults(func=cmd_say)
