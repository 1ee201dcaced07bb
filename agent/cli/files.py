"""`voice-agent transcribe FILE...` and `voice-agent emotion FILE...`: offline, one model load."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from agent.cli.common import config_or_exit, each_file, need, offline_app, only
from agent.config import Config


async def _transcribe(cfg: Config, files: list[str], as_json: bool) -> int:
    async with offline_app(cfg) as app:
        if not need(app, "asr", "ASR model"):
            return 1
        return await each_file(app, "asr/transcribe", files, as_json,
                               line=lambda r: str(r["text"]),
                               empty=lambda r: None if r["text"] else "no speech found")


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Print the transcript of each file (exit 1 when any failed or held no speech)."""
    cfg = config_or_exit(args.config)
    asr: dict[str, object] = {"enabled": True, "partials": False}
    if args.model:
        asr["model"] = args.model
    if args.model_dir:
        asr["model_dir"] = Path(args.model_dir)
    if args.language is not None and hasattr(cfg.asr, "language"):
        asr["language"] = args.language
    cfg = only(cfg, "asr", asr=cfg.asr.model_copy(update=asr))
    logging.getLogger().setLevel(logging.WARNING)
    return asyncio.run(_transcribe(cfg, args.files, args.json))


async def _emotion(cfg: Config, files: list[str], as_json: bool) -> int:
    async with offline_app(cfg) as app:
        if not need(app, "emotion", "emotion model"):
            return 1
        return await each_file(app, "emotion/analyze", files, as_json,
                               line=lambda r: f"{r['label']} ({r['confidence']:.2f})")


def cmd_emotion(args: argparse.Namespace) -> int:
    """Print the emotion of each file (exit 1 when any failed)."""
    cfg = config_or_exit(args.config)
    update: dict[str, object] = {"enabled": True}
    if args.model:
        update["models"] = args.model
    cfg = only(cfg, "emotion", emotion=cfg.emotion.model_copy(update=update))
    logging.getLogger().setLevel(logging.WARNING)
    return asyncio.run(_emotion(cfg, args.files, args.json))


def add_parsers(sub: Any) -> None:
    """The `transcribe` and `emotion` subcommands."""
    t = sub.add_parser("transcribe", help="transcribe audio files with the local ASR model")
    t.add_argument("files", nargs="+", metavar="FILE")
    t.add_argument("-c", "--config", help="YAML config (default: embedded defaults)")
    t.add_argument("--model", help="model id from `voice-agent models list`")
    t.add_argument("--model-dir", help="directory with the model files")
    t.add_argument("--language", help="language code for multilingual models (e.g. zh)")
    t.add_argument("--json", action="store_true", help="one JSON object per file, with timings")
    t.set_defaults(func=cmd_transcribe)

    em = sub.add_parser("emotion", help="speech emotion of audio files (local models)")
    em.add_argument("files", nargs="+", metavar="FILE")
    em.add_argument("-c", "--config", help="YAML config (default: embedded defaults)")
    em.add_argument("--model", action="append", help="emotion model id (repeat: an ensemble)")
    em.add_argument("--json", action="store_true", help="one JSON object per file: every "
                    "model's result, the final one, timings")
    em.set_defaults(func=cmd_emotion)
