"""`voice-agent service install`: the plan, the dry run, and a real install under --root."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from agent import service_install as si
from tests.test_systemd_sandbox import unit_settings

EXE = Path(sys.executable).parent / "voice-agent"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_dry_run_prints_the_plan_and_the_unit_and_touches_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every step is shown as 'would ...', then the unit text; no file appears."""
    rc = si.main(["--dry-run", "--root", str(tmp_path), "--exe", str(EXE),
                  "--models-dir", str(tmp_path / "models")])
    out = capsys.readouterr().out
    assert rc == 0
    assert _files(tmp_path) == []
    assert "would run   useradd --system" in out
    assert "would write  /etc/voice-agent/env (mode 0600)" in out
    assert "would run   systemctl daemon-reload" in out
    unit = out.split("--- /etc/systemd/system/voice-agent.service\n", 1)[1]
    assert unit_settings(unit)["ExecStart"] == [f"{EXE} run -c /etc/voice-agent/agent.yaml"]
    assert unit_settings(unit)["Environment"][-1] == (
        f"VOICE_AGENT_MODELS_DIR={tmp_path / 'models'}")


def test_system_install_under_root_writes_unit_config_and_secret_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Files land under --root with their modes; commands are listed, not run."""
    models = tmp_path / "models"
    rc = si.main(["--root", str(tmp_path), "--exe", str(EXE), "--models-dir", str(models)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _files(tmp_path) == ["etc/systemd/system/voice-agent.service",
                                "etc/voice-agent/agent.yaml", "etc/voice-agent/env"]
    unit = (tmp_path / "etc/systemd/system/voice-agent.service").read_text()
    s = unit_settings(unit)
    assert s["ExecStart"] == [f"{EXE} run -c /etc/voice-agent/agent.yaml"]
    assert s["User"] == ["voice-agent"] and s["Type"] == ["notify"]
    env = tmp_path / "etc/voice-agent/env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert "VOICE_AGENT__MQTT__PASSWORD" in env.read_text()
    assert "skip   useradd" in out and "skip   systemctl daemon-reload" in out
    assert "write  /etc/systemd/system/voice-agent.service" in out


def test_reinstall_keeps_config_and_secrets_and_updates_the_unit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second run changes nothing; a new executable rewrites only the unit."""
    args = ["--root", str(tmp_path), "--exe", str(EXE), "--models-dir", str(tmp_path)]
    assert si.main(args) == 0
    secrets = tmp_path / "etc/voice-agent/env"
    secrets.write_text("VOICE_AGENT__API__KEY=s3cret\n")
    capsys.readouterr()
    assert si.main(args) == 0
    out = capsys.readouterr().out
    assert "keep   /etc/systemd/system/voice-agent.service: unchanged" in out
    assert "keep   /etc/voice-agent/env: exists, left as it is" in out
    other = tmp_path / "venv" / "bin" / "voice-agent"
    assert si.main([*args, "--exe", str(other)]) == 0
    out = capsys.readouterr().out
    assert "replaces the existing file" in out
    assert secrets.read_text() == "VOICE_AGENT__API__KEY=s3cret\n"
    unit = (tmp_path / "etc/systemd/system/voice-agent.service").read_text()
    assert unit_settings(unit)["ExecStart"][0].startswith(str(other))
    assert f"{other} does not exist yet" in out


def test_existing_service_user_is_not_created_again(tmp_path: Path) -> None:
    """The plan reads --root's /etc/passwd."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("voice-agent:x:990:990::/var/lib/voice-agent:/bin/false\n")
    plan = si.plan_install(root=tmp_path, exe=EXE, models_dir=tmp_path)
    assert not any(s.argv and s.argv[0] == "useradd" for s in plan.steps)
    assert any(s.target == "user voice-agent" and s.what == "keep" for s in plan.steps)


def test_user_install_writes_into_the_session_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--user: ~/.config/systemd/user, no system user, systemctl --user."""
    home = Path("/home/someone")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    plan = si.plan_install(user_mode=True, root=tmp_path, exe=EXE, models_dir=tmp_path)
    assert plan.unit_path == home / ".config/systemd/user/voice-agent.service"
    assert not any(s.argv and s.argv[0] == "useradd" for s in plan.steps)
    assert ["systemctl", "--user", "daemon-reload"] in [s.argv for s in plan.steps]
    lines: list[str] = []
    assert si.execute(plan, out=lines.append) == 0
    unit = (tmp_path / "home/someone/.config/systemd/user/voice-agent.service").read_text()
    s = unit_settings(unit)
    assert s["ExecStart"] == [f"{EXE} run -c {home}/.config/voice-agent/agent.yaml"]
    assert s["EnvironmentFile"] == [f"-{home}/.config/voice-agent/env"]
    conf_dir = tmp_path / "home/someone/.config/voice-agent"
    assert stat.S_IMODE(conf_dir.stat().st_mode) == 0o700


def test_paths_under_home_relax_protect_home(tmp_path: Path) -> None:
    """A venv in /home cannot run behind ProtectHome=yes: read-only, and the plan says why."""
    plan = si.plan_install(root=tmp_path, exe=Path("/home/me/va/.venv/bin/voice-agent"),
                           models_dir=Path("/home/me/va/models_onnx"))
    assert unit_settings(plan.unit_text)["ProtectHome"] == ["read-only"]
    assert any("ProtectHome=read-only" in n and "/home/me/va" in n for n in plan.notes)


def test_gpu_install_allows_nvidia_devices_and_writable_executable_memory(
        tmp_path: Path) -> None:
    """--gpu: NVIDIA device groups; MemoryDenyWriteExecute off for the CUDA JIT."""
    s = unit_settings(si.plan_install(root=tmp_path, exe=EXE, models_dir=tmp_path,
                                      gpu=True).unit_text)
    assert "char-nvidia* rw" in s["DeviceAllow"] and "char-alsa rw" in s["DeviceAllow"]
    assert s["MemoryDenyWriteExecute"] == ["no"]


def test_failed_commands_are_reported_and_fail_the_install(tmp_path: Path) -> None:
    """A command that fails is printed as FAILED and gives exit 1; the rest still run."""
    plan = si.Plan(False, None, si.UnitPaths(EXE, tmp_path, tmp_path, tmp_path), tmp_path, "")
    plan.steps = [si.Step("run", "x", argv=["false"]), si.Step("run", "y", argv=["true"])]
    lines: list[str] = []
    assert si.execute(plan, out=lines.append) == 1
    assert lines == ["FAILED false (exit 1)", "ran    true"]


def test_special_characters_in_paths_are_quoted_for_systemd() -> None:
    """Spaces, $ and % in ExecStart= paths survive systemd's splitting and expansion."""
    paths = si.UnitPaths(exe=Path("/opt/my va/bin/voice-agent"),
                         config=Path("/etc/va/100%$HOME.yaml"), models_dir=Path("/m"),
                         env_file=Path("/e"))
    text = si.render_unit(si.SYSTEM_TEMPLATE, paths)
    assert unit_settings(text)["ExecStart"] == [
        '"/opt/my va/bin/voice-agent" run -c "/etc/va/100%%$$HOME.yaml"']
