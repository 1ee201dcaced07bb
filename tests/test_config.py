"""Config validation, env overrides, secrets and the check-config command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import Config, SileroVadConfig, load_config
from agent.errors import ConfigError

from .conftest import REPO


def problems(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> list[str]:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, env=env or {})
    return e.value.message.splitlines()


def test_agent_yaml_is_the_embedded_default() -> None:
    from_file = load_config(REPO / "agent.yaml", env={})
    embedded = load_config(None, env={})
    assert from_file.model_dump(exclude={"device_id"}) == embedded.model_dump(
        exclude={"device_id"})
    # Every section of the model is spelled out in agent.yaml.
    written = yaml.safe_load((REPO / "agent.yaml").read_text())
    assert set(Config.model_fields) - {"device_id"} <= set(written)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_example_configs_validate(name: str) -> None:
    load_config(REPO / "config" / name, env={})


def test_every_problem_reported_with_its_path(tmp_path: Path) -> None:
    got = problems(
        "audio:\n  sample_rate: 12345\n  block_ms: 25\n  sampel_rate: 1\n"
        "vad:\n  backend: webrtc\n  aggressiveness: 7\n"
        "segmenter:\n  min_silence_ms: lots\n",
        tmp_path,
    )
    assert any(p.startswith("audio.sample_rate: must be one of 8000, 11025, 16000") and
               "12345" in p for p in got), got
    assert any(p.startswith("audio.block_ms:") for p in got), got
    assert "audio.sampel_rate: unknown key" in got
    assert any(p.startswith("vad.aggressiveness:") and "less than or equal to 3" in p
               for p in got), got
    assert any(p.startswith("segmenter.min_silence_ms:") for p in got), got
    assert len(got) == 5


def test_unknown_vad_backend(tmp_path: Path) -> None:
    got = problems("vad:\n  backend: snake\n", tmp_path)
    assert len(got) == 1 and got[0].startswith("vad:") and "webrtc" in got[0]


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    got = problems("audio:\n  source: mic\n   device: x\n", tmp_path)
    assert "line 3" in got[0]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "mapping" in problems("- a\n- b\n", tmp_path)[0]


def test_env_overrides_are_typed_and_nested() -> None:
    cfg = load_config(None, env={
        "VOICE_AGENT__AUDIO__SAMPLE_RATE": "48000",
        "VOICE_AGENT__VAD__BACKEND": "silero",
        "VOICE_AGENT__VAD__THRESHOLD": "0.6",
        "VOICE_AGENT__GATE__MODE": "vad",
        "VOICE_AGENT__MQTT__PASSWORD": "hunter2",
        "OTHER": "ignored",
    })
    assert cfg.audio.sample_rate == 48000
    assert isinstance(cfg.vad, SileroVadConfig) and cfg.vad.threshold == 0.6
    assert cfg.gate.mode == "vad"
    assert cfg.mqtt.password is not None
    assert cfg.mqtt.password.get_secret_value() == "hunter2"
    # Secrets never show up in logs or dumps.
    assert "hunter2" not in repr(cfg) and "hunter2" not in cfg.model_dump_json()


def test_env_override_errors_name_the_key(tmp_path: Path) -> None:
    got = problems("{}\n", tmp_path, env={"VOICE_AGENT__AUDIO__SAMPLE_RATE": "44"})
    assert got[0].startswith("audio.sample_rate: must be one of")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO)


def test_check_config_cli_ok_and_problems(tmp_path: Path) -> None:
    ok = cli("check-config", str(REPO / "agent.yaml"))
    assert ok.returncode == 0 and ok.stdout.strip() == "ok"
    bad = tmp_path / "bad.yaml"
    bad.write_text("audio:\n  sample_rate: 1000\ngate:\n  mode: sometimes\n")
    r = cli("check-config", str(bad))
    assert r.returncode == 2
    assert "audio.sample_rate: must be one of 8000" in r.stderr
    assert "gate.mode:" in r.stderr
    # `run` refuses the same config with the same message and exit code 2.
    r2 = cli("run", "-c", str(bad), "--source", "file:/nonexistent.wav")
    assert r2.returncode == 2
    assert "audio.sample_rate: must be one of 8000" in r2.stderr
    assert "Traceback" not in r.stderr + r2.stderr
