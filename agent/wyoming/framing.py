"""Reading Wyoming events with limits: a bad or oversized event is refused, not fatal.

An event is a JSON header line (`type`, optional `data`, `data_length`, `payload_length`),
then `data_length` bytes of JSON merged into `data`, then `payload_length` bytes of payload.
`wyoming.event.async_read_event` trusts both lengths (a client could make us wait for, and
buffer, gigabytes) and ends the connection on any bad line. Here a bad header is an error the
client hears about, an oversized body is skipped so the stream stays in step, and only a
stream that cannot be re-synchronised (a header line past the limit, a body too big to skip)
ends the connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from wyoming.event import Event

from agent import jsonsafe
from agent.jsonsafe import BadJson

MAX_LINE = 64 * 1024  # header line (the StreamReader limit)
MAX_DATA = 256 * 1024  # JSON `data` after the header
MAX_PAYLOAD = 4 * 2**20  # one payload: ~10 s of 48 kHz stereo 32-bit audio
MAX_SKIP = 64 * 2**20  # an oversized body up to this is read and dropped; past it, hang up
MAX_TYPE = 64
_SKIP_BLOCK = 64 * 1024


@dataclass(frozen=True)
class Refused:
    """An event that could not be accepted: `code`, `message`; `fatal`: hang up after it."""

    code: str
    message: str
    fatal: bool = False


def _length(header: dict[str, object], key: str) -> int | Refused:
    value = header.get(key)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        return Refused("bad_event", f"{key} must be a non-negative integer", fatal=True)
    return value


async def _skip(reader: asyncio.StreamReader, n: int) -> None:
    while n > 0:
        block = await reader.read(min(n, _SKIP_BLOCK))
        if not block:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(block)


async def read_event(reader: asyncio.StreamReader) -> Event | Refused | None:
    """The next event, why it was refused, or None at the end of the stream."""
    try:
        line = await reader.readline()
    except ValueError:  # LimitOverrunError: the line did not end within the limit
        return Refused("too_large", f"event header line over {MAX_LINE} bytes", fatal=True)
    if not line:
        return None
    if not line.endswith(b"\n"):
        return None  # the peer went away in the middle of a header
    try:
        header = jsonsafe.loads(line, max_bytes=MAX_LINE, what="event header")
    except BadJson as e:
        return Refused("bad_json", e.message)
    if not isinstance(header, dict):
        return Refused("bad_event", "event header must be a JSON object")
    data_len = _length(header, "data_length")
    payload_len = _length(header, "payload_length")
    if isinstance(data_len, Refused):
        return data_len
    if isinstance(payload_len, Refused):
        return payload_len
    if data_len > MAX_DATA or payload_len > MAX_PAYLOAD:
        if data_len + payload_len > MAX_SKIP:
            return Refused("too_large", f"event body of {data_len + payload_len} bytes is far "
                           f"over the limit: closing", fatal=True)
        await _skip(reader, data_len + payload_len)
        return Refused("too_large", f"event of type {str(header.get('type'))[:MAX_TYPE]!r} "
                       f"too large (data {data_len} bytes, at most {MAX_DATA}; payload "
                       f"{payload_len} bytes, at most {MAX_PAYLOAD}): ignored")
    extra = await reader.readexactly(data_len) if data_len else b""
    payload = await reader.readexactly(payload_len) if payload_len else None
    kind = header.get("type")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_TYPE:
        return Refused("bad_event", f"event `type` must be a string of 1-{MAX_TYPE} characters")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        return Refused("bad_event", f"{kind}: `data` must be a JSON object")
    if extra:
        try:
            more = jsonsafe.loads(extra, max_bytes=MAX_DATA, what=f"{kind} event data")
        except BadJson as e:
            return Refused("bad_json", e.message)
        if not isinstance(more, dict):
            return Refused("bad_event", f"{kind}: event data must be a JSON object")
        data = {**data, **more}
    return Event(type=kind, data=data, payload=payload)
