"""Event sinks that live in-process: JSON lines to a file or stdout."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TextIO

from agent.bus import Subscription

log = logging.getLogger(__name__)


def _open_append(path: Path) -> TextIO:
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8")


async def jsonl_sink(sub: Subscription, target: str) -> None:
    """Write every event as one JSON line; `-` means stdout."""
    out: TextIO
    if target == "-":
        out = sys.stdout
    else:
        out = await asyncio.to_thread(_open_append, Path(target))
    try:
        async for event in sub:
            out.write(event.model_dump_json() + "\n")
            # Line-buffered on purpose: consumers tail this stream live.
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
