"""Logging under systemd: `<N>` priorities and no timestamps on journald's stream, timestamps
elsewhere, and secrets masked in every record."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from agent import logsetup
from tests.conftest import REPO

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

CHILD = """
import logging, sys
sys.path.insert(0, sys.argv[1])
from agent.logsetup import setup_logging
setup_logging("debug", secrets=["hunter2-key"])
log = logging.getLogger("agent.demo")
log.debug("debug line")
log.info("info line")
log.warning("warning with key %s", "hunter2-key")
try:
    raise RuntimeError("connect to https://x/?k=hunter2-key failed")
except RuntimeError:
    log.exception("error line")
log.critical("critical line")
"""


def _run_child(stderr: int, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-c", CHILD, str(REPO)], stderr=stderr, env=env,
                   check=True, timeout=60)


def _stream_env(fd: int) -> dict[str, str]:
    st = os.fstat(fd)
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journal_stream_gets_priorities_and_no_timestamps() -> None:
    """stderr is a stream socket named by JOURNAL_STREAM, as journald hands it over."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        _run_child(theirs.fileno(), _stream_env(theirs.fileno()))
        theirs.close()
        text = b"".join(iter(lambda: ours.recv(65536), b"")).decode()
    lines = text.splitlines()
    assert lines[:3] == ["<7>agent.demo: debug line", "<6>agent.demo: info line",
                         "<4>agent.demo: warning with key ***"]
    assert lines[3] == "<3>agent.demo: error line"
    tb = lines[4:-1]
    assert tb and all(line.startswith("<3>") for line in tb), tb  # journald: one entry a line
    assert any("RuntimeError: connect to https://x/?k=*** failed" in line for line in tb)
    assert lines[-1] == "<2>agent.demo: critical line"
    assert not TIMESTAMP.search(text) and "hunter2" not in text


def test_a_redirected_stderr_stays_human_readable(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited, but stderr is a file now: timestamps, no `<N>`."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out = tmp_path / "stderr.txt"
    with ours, theirs, out.open("wb") as f:
        _run_child(f.fileno(), _stream_env(theirs.fileno()))
    lines = out.read_text().splitlines()
    assert TIMESTAMP.match(lines[0]) and lines[0].endswith("DEBUG agent.demo: debug line")
    assert not any(line.startswith("<") for line in lines)
    assert "hunter2" not in out.read_text()


def test_journal_stream_check() -> None:
    """Matches only the very stream JOURNAL_STREAM names."""
    r, w = os.pipe()
    try:
        with os.fdopen(w, "w", closefd=False) as stream:
            env = _stream_env(w)
            assert logsetup.journal_stream(stream, env)
            assert not logsetup.journal_stream(stream, {"JOURNAL_STREAM": "1:2"})
            assert not logsetup.journal_stream(stream, {"JOURNAL_STREAM": "junk"})
            assert not logsetup.journal_stream(stream, {})
            assert not logsetup.journal_stream(io.StringIO(), env)
    finally:
        os.close(r)
        os.close(w)


@pytest.fixture()
def captured() -> Iterator[io.StringIO]:
    """setup_logging into a buffer; the root logger restored afterwards."""
    root = logging.getLogger()
    level = root.level
    buf = io.StringIO()
    logsetup.setup_logging("debug", stream=buf, secrets=["pa$$ w0rd", "sk-ABCDEF123456"])
    yield buf
    if logsetup._handler is not None:
        root.removeHandler(logsetup._handler)
        logsetup._handler = None
    logsetup.redact_filter().set_secrets(())
    root.setLevel(level)


def test_secrets_are_masked_everywhere_in_a_record(captured: io.StringIO) -> None:
    """Message, %-arguments, URL-encoded forms, tracebacks; child loggers included."""
    log = logging.getLogger("agent.some.child")
    log.info("key=%s", "sk-ABCDEF123456")
    log.info("url https://broker/?password=pa%24%24%20w0rd and pa%24%24+w0rd")
    try:
        raise ValueError("bad credentials pa$$ w0rd")
    except ValueError:
        log.exception("login failed for sk-ABCDEF123456")
    text = captured.getvalue()
    assert "sk-ABCDEF" not in text and "w0rd" not in text, text
    assert "key=***" in text and "password=***" in text
    assert "ValueError: bad credentials ***" in text
    assert TIMESTAMP.search(text)  # not journald: human format


def test_secrets_can_change_on_reload(captured: io.StringIO) -> None:
    """A reload with a new key masks the new one (and stops masking the old)."""
    logsetup.redact_filter().set_secrets(["new-secret-1"])
    logging.getLogger("agent").warning("old sk-ABCDEF123456 new new-secret-1")
    line = captured.getvalue().splitlines()[-1]
    assert line.endswith("old sk-ABCDEF123456 new ***")


def test_set_level_changes_what_is_logged(captured: io.StringIO) -> None:
    """SIGHUP applies log_level live."""
    logsetup.set_level("warning")
    logging.getLogger("agent").info("hidden")
    logging.getLogger("agent").warning("shown")
    assert "hidden" not in captured.getvalue() and "shown" in captured.getvalue()


def test_secrets_of_a_config_model() -> None:
    """Every SecretStr in a nested model, the daemon's Config included."""

    class Inner(BaseModel):
        password: SecretStr | None = None
        tokens: list[SecretStr] = []

    class Outer(BaseModel):
        api_key: SecretStr = SecretStr("k1")
        mqtt: Inner = Inner(password=SecretStr("p1"), tokens=[SecretStr("t1")])
        name: str = "not secret"

    assert sorted(logsetup.secrets_of(Outer())) == ["k1", "p1", "t1"]
    from agent.config import load_config

    cfg = load_config(env={"VOICE_AGENT__MQTT__PASSWORD": "mqtt-pw",
                           "VOICE_AGENT__API__KEY": "api-key-1"})
    assert {"mqtt-pw", "api-key-1"} <= set(logsetup.secrets_of(cfg))


def test_priorities_follow_syslog() -> None:
    """Python levels map onto syslog's (journalctl -p filters on them)."""
    got = [logsetup.syslog_priority(lv) for lv in (logging.DEBUG, logging.INFO,
                                                   logging.WARNING, logging.ERROR,
                                                   logging.CRITICAL)]
    assert got == [7, 6, 4, 3, 2]
