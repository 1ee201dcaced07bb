"""`voice-agent call NAME [field=value ...]`: run a command on the running daemon.

The daemon's own OpenAPI document says where each registry command lives (its operationId is
the command name with `/` as `_`), so this client needs no table of its own: it finds the
operation, sends the payload (JSON, query fields or a file upload), and prints the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8765"
TIMEOUT_S = 300.0


def _request(url: str, key: str | None, method: str = "GET", body: bytes | None = None,
             ctype: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method)
    if key:
        req.add_header("X-API-Key", key)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, {"error": {"code": "http", "message": e.reason}}


def _operation(spec: dict[str, Any], name: str) -> tuple[str, str, dict[str, Any]]:
    """(method, path, operation) of the command `name` in the daemon's OpenAPI document."""
    want = name.replace("/", "_")
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            if op.get("operationId") == want:
                return method.upper(), path, op
    known = sorted(op.get("operationId", "").replace("_", "/", 1)
                   for ops in spec.get("paths", {}).values() for op in ops.values()
                   if op.get("operationId"))
    raise SystemExit(f"error: the daemon has no command {name!r}; it has: {', '.join(known)}")


def _multipart(fields: dict[str, Any], file: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{file.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 .encode() + file.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def cmd_call(args: argparse.Namespace) -> int:
    """Run one registry command on the daemon at --url; print its JSON answer."""
    base = args.url.rstrip("/")
    key = args.key or os.environ.get("VOICE_AGENT__API__KEY") or None
    status, spec = _request(f"{base}/api/openapi.json", key)
    if status != 200:
        print(f"error: {base} answered {status}: {spec}", file=sys.stderr)
        return 1
    method, path, op = _operation(spec, args.name)
    payload: dict[str, Any] = json.loads(args.json) if args.json else {}
    for item in args.fields:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {item!r}: expected field=value")
        try:
            payload[k] = json.loads(v)  # numbers, booleans, lists as JSON ...
        except ValueError:
            payload[k] = v  # ... anything else as a string
    for param in (p["name"] for p in op.get("parameters", []) if p.get("in") == "path"):
        if param not in payload:
            raise SystemExit(f"error: {args.name} needs {param}=...")
        path = path.replace("{" + param + "}", urllib.parse.quote(str(payload.pop(param))))
    url, body, ctype = f"{base}{path}", None, None
    if method == "GET":
        if payload:
            url += "?" + urllib.parse.urlencode(payload)
    elif args.file:
        body, ctype = _multipart(payload, Path(args.file))
    else:
        body, ctype = json.dumps(payload).encode(), "application/json"
    status, answer = _request(url, key, method, body, ctype)
    print(json.dumps(answer, ensure_ascii=False, indent=2))
    return 0 if status < 400 else 1


def add_parsers(sub: Any) -> None:
    """The `call` subcommand."""
    c = sub.add_parser("call", help="run a command on the running daemon (e.g. ptt/start)")
    c.add_argument("name", help="command name, e.g. ptt/toggle, speakers/list, say")
    c.add_argument("fields", nargs="*", metavar="FIELD=VALUE", help="payload fields")
    c.add_argument("--json", help="the whole payload as a JSON object")
    c.add_argument("--file", help="an audio file to upload (commands that take one)")
    c.add_argument("--url", default=os.environ.get("VOICE_AGENT_URL", DEFAULT_URL),
                   help="the daemon's API (default: $VOICE_AGENT_URL or %(default)s)")
    c.add_argument("--key", help="API key (default: $VOICE_AGENT__API__KEY)")
    c.set_defaults(func=cmd_call)
