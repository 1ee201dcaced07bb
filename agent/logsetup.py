"""Logging set-up: journald-friendly lines under systemd, timestamps elsewhere, no secrets.

Under systemd, stderr is a stream into journald, which stamps every line itself and reads a
leading `<N>` as its syslog priority (`SyslogLevelPrefix=`, on by default). systemd says so in
`JOURNAL_STREAM=<device>:<inode>`; we trust it only while stderr is still that stream (a
child whose stderr was redirected inherits the variable but not the stream).

`RedactFilter` replaces configured secrets (API keys, passwords) in every record, the
traceback included, before any handler formats it. It sits on the handler, not on a logger,
because logger filters do not see records propagated from child loggers.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import IO, Any

from pydantic import BaseModel, SecretStr

log = logging.getLogger(__name__)

ENV_JOURNAL_STREAM = "JOURNAL_STREAM"
HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"
MASK = "***"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


def syslog_priority(levelno: int) -> int:
    """Python level -> syslog priority (7 debug, 6 info, 4 warning, 3 err, 2 crit)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def journal_stream(stream: IO[Any] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` (stderr) is the journald stream named by `JOURNAL_STREAM`."""
    env = os.environ if env is None else env
    value = env.get(ENV_JOURNAL_STREAM, "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):  # no fileno (pytest capture), bad value
        return False


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`, no timestamp; every line of a traceback carries the prefix, since
    journald makes each line its own entry with its own priority."""

    def __init__(self) -> None:
        """The journal format."""
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """Prefix each line with the record's syslog priority."""
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def _variants(secret: str) -> set[str]:
    """The secret and the forms it takes in URLs and headers."""
    out = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    return {v for v in out if v}


class RedactFilter(logging.Filter):
    """Replaces every secret in a record's message, arguments and traceback with `***`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        """`secrets`: the strings to hide; update later with `set_secrets`."""
        super().__init__()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None
        self.count = 0
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        """Replace the set of secrets (on reload, when keys change)."""
        variants: set[str] = set()
        for s in secrets:
            if s and s.strip():
                variants |= _variants(s)
        # Longest first, so a secret containing another is masked whole.
        pattern = (re.compile("|".join(re.escape(v) for v in sorted(variants, key=len,
                                                                     reverse=True)))
                   if variants else None)
        with self._lock:
            self._pattern = pattern
            self.count = len(variants)  # secrets and their encoded variants

    def redact(self, text: str) -> str:
        """`text` with every secret masked."""
        p = self._pattern
        return text if p is None else p.sub(MASK, text)

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask secrets in place; never drops a record."""
        if self._pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def secrets_of(model: BaseModel) -> list[str]:
    """Every `SecretStr` value in a (nested) pydantic model, e.g. the daemon's Config."""
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(model)
    return [s for s in found if s]


_handler: logging.Handler | None = None
_redact = RedactFilter()


def setup_logging(level: str | int = "info", *, stream: IO[Any] | None = None,
                  env: Mapping[str, str] | None = None, secrets: Iterable[str] = (),
                  journal: bool | None = None) -> RedactFilter:
    """Install one stderr handler on the root logger (replacing ours from an earlier call):
    journal format when stderr is journald's stream (or `journal=True`), else timestamps.
    Returns the redaction filter, whose secrets can be changed later."""
    global _handler
    stream = sys.stderr if stream is None else stream
    use_journal = journal_stream(stream, env) if journal is None else journal
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if use_journal
                         else logging.Formatter(HUMAN_FORMAT))
    handler.addFilter(_redact)
    _redact.set_secrets(secrets)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    set_level(level)
    return _redact


def set_level(level: str | int) -> None:
    """Change the root level (`debug`/`info`/... or a number), e.g. on SIGHUP."""
    value = LEVELS[level.lower()] if isinstance(level, str) else level
    logging.getLogger().setLevel(value)


def redact_filter() -> RedactFilter:
    """The filter `setup_logging` installed (shared, so reloads can update it)."""
    return _redact
