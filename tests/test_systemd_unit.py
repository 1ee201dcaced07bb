"""The systemd units: clean `systemd-analyze verify`, hardening score <= 2.5, required settings.

Needs `systemd-analyze` (Debian package `systemd`); it runs fine without systemd as PID 1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.service_install import (
    SYSTEM_TEMPLATE,
    USER_TEMPLATE,
    UnitPaths,
    default_unit,
    render_unit,
)
from tests.conftest import REPO
from tests.test_systemd_sandbox import unit_settings

ANALYZE = shutil.which("systemd-analyze")
EXE = Path(sys.executable).parent / "voice-agent"
MAX_EXPOSURE = 2.5

needs_analyze = pytest.mark.skipif(ANALYZE is None,
                                   reason="systemd-analyze missing (apt-get install systemd)")


def test_repository_units_are_the_rendered_defaults() -> None:
    """systemd/*.service are what `service install` writes for /opt/voice-agent."""
    assert (REPO / "systemd" / "voice-agent.service").read_text() == default_unit()
    assert (REPO / "systemd" / "voice-agent-user.service").read_text() == default_unit(True)


def test_system_unit_has_the_service_contract() -> None:
    """Type=notify with watchdog, reload by SIGHUP, no restart on a bad config, sound only."""
    s = unit_settings(default_unit())
    expect = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "10",
        "Restart": "on-failure", "RestartPreventExitStatus": "2",
        "ExecReload": "/bin/kill -HUP $MAINPID", "StateDirectory": "voice-agent",
        "RuntimeDirectory": "voice-agent", "EnvironmentFile": "-/etc/voice-agent/env",
        "SupplementaryGroups": "audio", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "ReadWritePaths": "/var/lib/voice-agent",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "CapabilityBoundingSet": "", "LockPersonality": "yes", "MemoryDenyWriteExecute": "no",
        "DevicePolicy": "closed", "DeviceAllow": "char-alsa rw",
        "ExecStart": "/opt/voice-agent/.venv/bin/voice-agent run -c /etc/voice-agent/agent.yaml",
    }
    assert {k: s.get(k, ["<missing>"])[-1] for k in expect} == expect
    assert s["SystemCallFilter"][0] == "@system-service"
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs"):
        assert s[key] == ["yes"], key
    assert "TimeoutStopSec" in s
    # Without a microphone, W^X memory can be enforced (tests/test_systemd_sandbox.py).
    assert unit_settings(default_unit(deny_wx=True))["MemoryDenyWriteExecute"] == ["yes"]


def test_user_unit_suits_a_desktop_session() -> None:
    """Same service contract; no User=, no mount namespaces, after the sound server."""
    s = unit_settings(default_unit(True))
    assert s["Type"] == ["notify"] and s["WatchdogSec"] == ["10"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["RestartPreventExitStatus"] == ["2"]
    assert "User" not in s and "ProtectSystem" not in s
    assert "pipewire-pulse.service" in s["After"][0]
    assert s["WantedBy"] == ["default.target"]
    assert s["ExecStart"] == ["/opt/voice-agent/.venv/bin/voice-agent run -c "
                              "%E/voice-agent/agent.yaml"]


def _verify(unit: Path, user: bool = False) -> str:
    """Everything `systemd-analyze verify` prints about `unit` (empty when clean)."""
    assert ANALYZE
    env = dict(os.environ)
    argv = [ANALYZE, "verify"]
    if user:
        # A user manager needs a runtime directory even to load units; a short one, since
        # other user units (gpg-agent's sockets) put socket paths of at most 108 bytes in it.
        runtime = tempfile.mkdtemp(prefix="xdg-", dir="/tmp")
        env["XDG_RUNTIME_DIR"] = runtime
        argv.append("--user")
    try:
        proc = subprocess.run([*argv, str(unit)], capture_output=True, text=True, env=env,
                              timeout=60)
    finally:
        if user:
            shutil.rmtree(env["XDG_RUNTIME_DIR"], ignore_errors=True)
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}" if (
        proc.returncode or proc.stdout or proc.stderr) else ""


def _exposure(unit: Path) -> float:
    assert ANALYZE
    proc = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1))


def _rendered(tmp_path: Path, user: bool = False, gpu: bool = False) -> Path:
    """The unit with ExecStart on this venv's voice-agent (verify checks it exists)."""
    if not EXE.exists():
        pytest.skip(f"{EXE} missing (pip install -e .)")
    paths = UnitPaths(exe=EXE, config=tmp_path / "agent.yaml", models_dir=REPO / "models_onnx",
                      env_file=tmp_path / "env", user=None if user else "voice-agent", gpu=gpu)
    d = tmp_path / ("user" if user else "system") / ("gpu" if gpu else "cpu")
    d.mkdir(parents=True)
    unit = d / "voice-agent.service"
    unit.write_text(render_unit(USER_TEMPLATE if user else SYSTEM_TEMPLATE, paths))
    return unit


@needs_analyze
@pytest.mark.parametrize("user,gpu", [(False, False), (False, True), (True, False)],
                         ids=["system", "system-gpu", "user"])
def test_units_verify_without_a_word(tmp_path: Path, user: bool, gpu: bool) -> None:
    """`systemd-analyze verify` prints nothing (unknown keys would only be warnings)."""
    assert _verify(_rendered(tmp_path, user, gpu), user) == ""


@needs_analyze
def test_verify_would_catch_a_bad_key(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported (with exit 0)."""
    unit = _rendered(tmp_path)
    unit.write_text(unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert "Unknown key" in _verify(unit) or "NoNewPrivilege" in _verify(unit)


@needs_analyze
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_system_unit_exposure_is_at_most_2_5(tmp_path: Path, gpu: bool) -> None:
    """`systemd-analyze security --offline=true` scores the hardened unit <= 2.5."""
    score = _exposure(_rendered(tmp_path, gpu=gpu))
    print(f"exposure ({'gpu' if gpu else 'cpu'}): {score}")
    assert score <= MAX_EXPOSURE


@needs_analyze
def test_exposure_check_can_fail(tmp_path: Path) -> None:
    """Without its hardening block the same unit scores far above the limit."""
    unit = _rendered(tmp_path)
    text = unit.read_text()
    unit.write_text(text[:text.index("# Hardening")] + text[text.index("[Install]"):])
    assert _exposure(unit) > MAX_EXPOSURE
