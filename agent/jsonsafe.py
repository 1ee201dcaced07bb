"""The one parser for JSON from outside (HTTP bodies, WebSocket frames, MQTT payloads, files).

Python's json module recurses per nesting level, so a payload of a few thousand `[` raises
RecursionError deep inside a handler (a dead MQTT service, a 500, a broken WebSocket). Here
the size and the nesting depth are checked first, without recursion, and every failure is one
`BadJson` with a stable code.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from agent.errors import AgentError

MAX_DEPTH = 32
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class BadJson(AgentError):
    """Outside JSON that is not valid, too large or nested too deep."""

    stage = "input"
    default_status = 400


def depth(raw: bytes) -> int:
    """Maximum nesting depth of JSON text (strings skipped), computed without recursion."""
    bare = _STRING.sub(b"", raw)
    if not bare:
        return 0
    steps = _OPEN[np.frombuffer(bare, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def loads(data: str | bytes | bytearray, *, max_bytes: int = 1 << 20,
          max_depth: int = MAX_DEPTH, what: str = "payload") -> Any:
    """Parse JSON; BadJson `too_large`, `too_deep` or `bad_json` (never RecursionError)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise BadJson("too_large", f"{what} of {len(raw)} bytes is over the {max_bytes} byte "
                      "limit", status=413)
    d = depth(raw)
    if d > max_depth:
        raise BadJson("too_deep", f"{what} is nested {d} levels deep; at most {max_depth} "
                      "are accepted")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise BadJson("bad_json", f"{what} is not UTF-8 text: {e.reason}") from None
    except (ValueError, RecursionError) as e:
        raise BadJson("bad_json", f"{what} is not JSON: {str(e)[:200]}") from None


def loads_object(data: str | bytes | bytearray, **kw: Any) -> dict[str, Any]:
    """Parse JSON that must be an object."""
    value = loads(data, **kw)
    if not isinstance(value, dict):
        what = kw.get("what", "payload")
        raise BadJson("bad_json", f"{what} must be a JSON object, got {type(value).__name__}")
    return value
