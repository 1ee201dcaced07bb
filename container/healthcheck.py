"""The image's HEALTHCHECK: exit 0 while the daemon's /api/health says it is serving, else 1.

`ok` is healthy. `degraded` (the daemon serves, but something is missing: typically no
microphone, which it keeps retrying) is healthy too, with the problems printed into the
health log, because restarting the container fixes none of them, and an API-only container
has no microphone on purpose. VOICE_AGENT_HEALTHCHECK_STRICT=1 makes only `ok` healthy.
`starting` (past the start period), `stopping` and no answer are unhealthy. Standard library
only; the port is the daemon's own (VOICE_AGENT__API__PORT, default 8765); /api/health needs
no API key.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def check(port: int, strict: bool = False, timeout: float = 4.0) -> tuple[bool, str]:
    """(healthy, why) from one GET of /api/health on the loopback."""
    url = f"http://127.0.0.1:{port}/api/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = json.loads(r.read().decode())
    except (OSError, ValueError) as e:  # refused, timed out, HTTP error, not JSON
        return False, f"{url}: {e}"
    if not isinstance(body, dict):
        return False, f"{url}: unexpected answer {body!r:.100}"
    status = body.get("status")
    problems = "; ".join(str(p) for p in body.get("problems") or [])
    why = f"{url}: {status}" + (f" ({problems})" if problems else "")
    serving = ("ok",) if strict else ("ok", "degraded")
    return status in serving, why


def main() -> int:
    """Print the verdict; the exit code is what the container runtime reads."""
    try:
        port = int(os.environ.get("VOICE_AGENT__API__PORT") or 8765)
    except ValueError:
        port = 8765
    strict = os.environ.get("VOICE_AGENT_HEALTHCHECK_STRICT", "") not in ("", "0", "false")
    ok, why = check(port, strict)
    print(why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
