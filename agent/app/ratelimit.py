"""Per-client token buckets for registry commands: 429 with Retry-After past the rate."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.errors import CommandError

MAX_CLIENTS = 4096  # buckets kept; the idlest go first (a flood of spoofed ids stays bounded)


@dataclass(frozen=True)
class Rate:
    """`per_s` calls a second on average, bursts of up to `burst`."""

    per_s: float
    burst: float


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token bucket per (client, command); loopback clients get `loopback_factor` x more."""

    def __init__(self, default: Rate = Rate(10.0, 40.0), per_command: Mapping[str, Rate] | None
                 = None, loopback_factor: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default
        self.per_command = dict(per_command or {})
        self.loopback_factor = loopback_factor
        self.clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self.limited = 0

    def rate(self, command: str, loopback: bool) -> Rate:
        """The rate that applies."""
        r = self.per_command.get(command, self.default)
        if loopback:
            return Rate(r.per_s * self.loopback_factor, r.burst * self.loopback_factor)
        return r

    def check(self, command: str, client: str, loopback: bool) -> None:
        """Take a token, or raise CommandError `rate_limited` (429) with when to retry."""
        r = self.rate(command, loopback)
        if r.per_s <= 0:
            return  # 0 = unlimited
        now = self.clock()
        key = (client, command)
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= MAX_CLIENTS:
                oldest = min(self._buckets, key=lambda k: self._buckets[k].at)
                del self._buckets[oldest]
            b = self._buckets[key] = _Bucket(r.burst, now)
        b.tokens = min(r.burst, b.tokens + (now - b.at) * r.per_s)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return
        self.limited += 1
        wait = (1.0 - b.tokens) / r.per_s
        raise CommandError("rate_limited", f"too many {command} requests from {client}: "
                           f"at most {r.per_s:g}/s (burst {r.burst:g}); retry in {wait:.1f} s",
                           status=429, retry_after_s=max(1.0, round(wait + 0.5)))
