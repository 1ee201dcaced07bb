"""`voice-agent speakers ...` and `voice-agent diarize FILE`: voiceprints, in this process."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from agent.cli.common import config_or_exit, only
from agent.config import Config
from agent.errors import AgentError


def _speaker_config(path: str | None) -> Config:
    """The config with only the speaker model on (no ASR, emotion or replies to load)."""
    logging.getLogger().setLevel(logging.WARNING)
    return only(config_or_exit(path), "speaker")


# What each `speakers` subcommand dispatches: (command, payload fields from args, file args).
_SPEAKER_CALLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "list": ("speakers/list", ()), "reenrolment": ("speakers/reenrolment", ()),
    "get": ("speakers/get", ("speaker_id",)), "delete": ("speakers/delete", ("speaker_id",)),
    "update": ("speakers/update", ("speaker_id", "name", "user_id", "email", "clear")),
    "register": ("speakers/register", ("name", "user_id", "email")),
    "add": ("speakers/add_sample", ("speaker_id",)),
    "identify": ("speakers/identify", ("top_k",)),
    "verify": ("speakers/verify", ("speaker_id",)),
    "diarize": ("speakers/diarize", ("num_speakers",)),
}


def _speaker_line(op: str, r: dict[str, Any]) -> str:
    """A short human answer for one speaker command's result."""
    if op in ("list", "reenrolment"):
        rows = [f"{s['id']}  {s['name']}  ({s['samples']} samples"
                + (", needs re-enrolment" if s["id"] in r.get("needs_reenrolment", ()) else "")
                + ")" for s in r["speakers"]]
        return "\n".join(rows) or "no speakers"
    if op in ("register", "add"):
        sp = r["speaker"]
        return f"{sp['name']} {sp['id']}: {r['quality']['speech_s']:.1f} s of speech" + (
            f"\nwarning: {r['warning']}" if r["warning"] else "")
    if op == "identify":
        return f"{r['name']} {r['score']:.3f}" + (" (match)" if r["is_match"] else "")
    if op == "verify":
        return f"{r['result']} {r['similarity']:.3f} (threshold {r['threshold']:.2f})"
    if op == "diarize":
        return "\n".join(f"{t['start']:8.2f} {t['end']:8.2f}  {t['label']}"
                         + (f" ({t['name']})" if t["name"] else "") + f"  {t['confidence']:.2f}"
                         for t in r["segments"])
    sp = r.get("speaker") or r.get("deleted") or {}
    return f"{sp.get('name')} {sp.get('id')}" + (" deleted" if "deleted" in r else "")


async def _speakers(cfg: Config, op: str, args: argparse.Namespace) -> int:
    """Run one `speakers` subcommand (or `diarize`) through the registry, in this process."""
    from agent.app.capabilities import create_app
    from agent.app.commands import CallContext

    name, fields = _SPEAKER_CALLS[op]
    app = create_app(cfg)
    ctx = CallContext(surface="cli")
    try:
        if op in ("register", "add", "identify", "verify", "diarize"):
            await app.load_analysers()  # only these need the model
        files = list(getattr(args, "files", None) or [])
        payload = {f: v for f in fields if (v := getattr(args, f, None)) not in (None, [])}
        if isinstance(payload.get("speaker_id"), str) and not re.fullmatch(
                r"[0-9a-f]{32}", payload["speaker_id"]):  # a name: look up its id
            listed = await app.commands.dispatch("speakers/list", {}, ctx)
            ids = [s.id for s in getattr(listed, "speakers", [])
                   if s.name.casefold() == payload["speaker_id"].casefold()]
            payload["speaker_id"] = ids[0] if ids else payload["speaker_id"]
        if getattr(args, "reference", None):
            data = await asyncio.to_thread(Path(args.reference).read_bytes)
            payload["reference"] = base64.b64encode(data).decode()
        results: list[dict[str, Any]] = []
        for i, path in enumerate(files or [None]):
            if path is not None:
                ctx.attachment = await asyncio.to_thread(Path(path).read_bytes)
            if op == "register" and i > 0:  # further files: samples of the new speaker
                name, payload = "speakers/add_sample", {"speaker_id": results[0]["speaker"]["id"]}
            results.append((await app.commands.dispatch(name, payload, ctx)).model_dump(
                mode="json"))
        for r in results[-1:] if op == "register" else results:
            print(json.dumps(r, ensure_ascii=False, indent=2) if args.json
                  else _speaker_line(op, r), flush=True)
        return 0
    except OSError as e:
        print(f"error: cannot read: {e.strerror or e}", file=sys.stderr)
    except AgentError as e:
        print(f"error: {e}", file=sys.stderr)
    finally:
        await app.close()
    return 1


def cmd_speakers(args: argparse.Namespace) -> int:
    """`voice-agent speakers ...` and `voice-agent diarize FILE`."""
    op = "diarize" if args.cmd == "diarize" else args.speakers_cmd
    return asyncio.run(_speakers(_speaker_config(args.config), op, args))


def add_parsers(sub: Any) -> None:
    """The `speakers` and `diarize` subcommands."""
    sp = sub.add_parser("speakers", help="voiceprints: register, identify, verify, list, ...")
    ops = sp.add_subparsers(dest="speakers_cmd", required=True)
    who = {"metavar": "SPEAKER", "help": "speaker id or name"}
    for op, help_ in [("list", "enrolled speakers"), ("reenrolment", "speakers enrolled with "
                      "another model only"), ("get", "one speaker"), ("delete", "delete one"),
                      ("update", "rename or change fields"), ("register", "enrol from files"),
                      ("add", "add sample files"), ("identify", "who speaks in a file"),
                      ("verify", "does a file match a speaker or a reference file")]:
        p = ops.add_parser(op, help=help_)
        p.add_argument("-c", "--config", help="YAML config (default: embedded defaults)")
        p.add_argument("--json", action="store_true", help="the full JSON result")
        if op in ("get", "delete", "update", "add"):
            p.add_argument("speaker_id", **who)
        if op == "update":
            p.add_argument("--name")
            p.add_argument("--clear", action="append", choices=["user_id", "email", "metadata"])
        if op == "register":
            p.add_argument("name")
        if op in ("update", "register"):
            p.add_argument("--user-id", dest="user_id")
            p.add_argument("--email")
        if op in ("register", "add", "identify", "verify"):
            p.add_argument("files", nargs="+" if op in ("register", "add") else 1,
                           metavar="FILE")
        if op == "identify":
            p.add_argument("--top-k", dest="top_k", type=int)
        if op == "verify":
            ref = p.add_mutually_exclusive_group(required=True)
            ref.add_argument("--speaker", dest="speaker_id", **who)
            ref.add_argument("--reference", metavar="FILE", help="a second recording")
        p.set_defaults(func=cmd_speakers)
    d = sub.add_parser("diarize", help="who spoke when in an audio file")
    d.add_argument("files", nargs=1, metavar="FILE")
    d.add_argument("-c", "--config", help="YAML config (default: embedded defaults)")
    d.add_argument("--num-speakers", dest="num_speakers", type=int)
    d.add_argument("--json", action="store_true", help="the full JSON result")
    d.set_defaults(func=cmd_speakers)
