"""The container image, the compose file and the Home Assistant add-on.

Fast tests check the add-on's config.yaml against the Supervisor's own validation rules
(transcribed below from home-assistant/supervisor), its options -> agent.yaml mapping with the
daemon's validator, and the compose file's structure. The slow tests build the image from a
clean clone of HEAD with buildah and run the daemon in it (`buildah run --isolation chroot`,
which shares the host's network): health from the host, a shared recording transcribed over
HTTP, state kept in a host directory mounted at /data across two runs, and the add-on image
started from an options.json. They need buildah (and mmdebstrap the first time, for the
Debian base image) and root.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from agent.asr.wer import wer
from agent.config import Config, load_config
from tests import buildah
from tests.conftest import ASR_EN, asr_en_rows, need_shared
from tests.mosquitto import Mosquitto, Subscriber, free_port, have_mosquitto
from tests.pulse import missing_requirements as pulse_missing
from tests.pulse import pulse_server

REPO = Path(__file__).resolve().parents[1]
ADDON = REPO / "ha-addon" / "voice-agent"
TAG = "localhost/voice-agent:test"
ADDON_TAG = "localhost/voice-agent-addon:test"
UID = 1000  # the image's user (Containerfile APP_UID)
API_KEY = "container-test-key"

sys.path.insert(0, str(REPO / "container"))
import ha_options  # noqa: E402

# --------------------------------------------------------------------------------------------
# The Supervisor's add-on config rules (supervisor/addons/validate.py, options.py, const.py,
# supervisor/validate.py), for the keys this add-on uses.
# --------------------------------------------------------------------------------------------
ARCH_ALL = {"armhf", "armv7", "aarch64", "amd64", "i386"}
RE_SLUG = re.compile(r"^[-_.A-Za-z0-9]+$")
RE_DOCKER_PORT = re.compile(r"^\d+(?:/tcp|/udp)?$")
RE_SERVICE = re.compile(r"^(?P<service>mqtt|mysql):(?P<rights>provide|want|need)$")
RE_WATCHDOG = re.compile(r"^(?:https?|\[PROTO:\w+\]|tcp):\/\/\[HOST\]:(\[PORT:\d+\]|\d+).*$")
RE_DOCKER_IMAGE_BUILD = re.compile(
    r"^([a-zA-Z\-\.:\d{}]+/)*?([\-\w{}]+)/([\-\w{}]+)(:[\.\-\w{}]+)?$")
RE_SCHEMA_ELEMENT = re.compile(
    r"^(?:"
    r"|bool"
    r"|email"
    r"|url"
    r"|port"
    r"|device(?:\((?P<filter>subsystem=[a-z]+)\))?"
    r"|str(?:\((?P<s_min>\d+)?,(?P<s_max>\d+)?\))?"
    r"|password(?:\((?P<p_min>\d+)?,(?P<p_max>\d+)?\))?"
    r"|int(?:\((?P<i_min>-?\d+)?,(?P<i_max>-?\d+)?\))?"
    r"|float(?:\((?P<f_min>-?\d*\.?\d+)?,(?P<f_max>-?\d*\.?\d+)?\))?"
    r"|match\((?P<match>.*)\)"
    r"|list\((?P<list>.+)\)"
    r")\??$"
)
STARTUP = {"initialize", "system", "services", "application", "once"}
BOOT = {"auto", "manual"}
REQUIRED = {"name": str, "version": str, "slug": str, "description": str, "arch": list}


def _value_ok(kind: str, value: Any) -> bool:
    """Whether an option value fits its schema element (the Supervisor's option check)."""
    kind = kind.rstrip("?")
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "port":
        return isinstance(value, int) and 1 <= value <= 65535
    if kind.startswith(("str", "password")):
        return isinstance(value, str)
    if m := re.fullmatch(r"list\((.+)\)", kind):
        return value in m.group(1).split("|")
    if m := re.fullmatch(r"match\((.*)\)", kind):
        return isinstance(value, str) and re.fullmatch(m.group(1), value) is not None
    return True


@pytest.fixture(scope="module")
def addon() -> dict[str, Any]:
    """The add-on's config.yaml."""
    data: dict[str, Any] = yaml.safe_load((ADDON / "config.yaml").read_text())
    return data


def test_addon_config_has_the_required_keys(addon: dict[str, Any]) -> None:
    """name, version, slug, description and arch are there with the Supervisor's types."""
    for key, kind in REQUIRED.items():
        assert isinstance(addon.get(key), kind), f"{key}: missing or not {kind.__name__}"
    assert RE_SLUG.match(addon["slug"])
    assert set(addon["arch"]) <= ARCH_ALL
    assert {"amd64", "aarch64"} <= set(addon["arch"])
    assert addon.get("startup", "application") in STARTUP
    assert addon.get("boot", "auto") in BOOT
    assert 10 <= addon.get("timeout", 10) <= 300


def test_addon_config_keys_follow_the_supervisor_rules(addon: dict[str, Any]) -> None:
    """Ports, services, discovery, watchdog and the options schema are all well formed."""
    assert addon["audio"] is True
    assert set(addon["ports"]) == {"8765/tcp", "10300/tcp"}
    for port, host in addon["ports"].items():
        assert RE_DOCKER_PORT.match(port)
        assert host is None or 1 <= int(host) <= 65535
    assert set(addon["ports_description"]) <= set(addon["ports"])
    assert addon["discovery"] == ["wyoming"]
    assert all(RE_SERVICE.match(s) for s in addon.get("services", []))
    assert RE_WATCHDOG.match(addon["watchdog"])
    assert addon.get("homeassistant_api", False) is False  # not used: MQTT and Wyoming only
    schema, options = addon["schema"], addon["options"]
    for key, kind in schema.items():
        assert isinstance(kind, str) and RE_SCHEMA_ELEMENT.match(kind), f"{key}: {kind!r}"
    assert set(options) <= set(schema), "every option needs a schema entry"
    required = {k for k, v in schema.items() if not v.endswith("?")}
    assert required <= set(options), f"required options without a default: {required}"
    for key, value in options.items():
        assert _value_ok(schema[key], value), f"default {key}={value!r} does not fit {schema[key]}"


def test_addon_build_file_covers_every_arch(addon: dict[str, Any]) -> None:
    """build.yaml names a base image per architecture; translations name every option."""
    build = yaml.safe_load((ADDON / "build.yaml").read_text())
    assert set(build["build_from"]) == set(addon["arch"])
    for image in build["build_from"].values():
        assert RE_DOCKER_IMAGE_BUILD.match(image), image
    assert "ARG BUILD_FROM" in (ADDON / "Dockerfile").read_text()
    tr = yaml.safe_load((ADDON / "translations" / "en.yaml").read_text())
    assert set(tr["configuration"]) == set(addon["schema"])
    assert all(entry.get("name") for entry in tr["configuration"].values())
    assert set(tr["network"]) == set(addon["ports"])
    assert (ADDON / "DOCS.md").stat().st_size > 1000
    assert os.access(ADDON / "run.sh", os.X_OK)


def test_addon_options_make_a_valid_config(addon: dict[str, Any], tmp_path: Path) -> None:
    """Default and edited options map onto a configuration the daemon accepts."""
    service = {"host": "core-mosquitto", "port": 1883, "username": "addons",
               "password": "pw", "ssl": False}
    keys = set(Config.model_fields)
    cases = [
        (addon["options"], service),
        ({**addon["options"], "gate_mode": "vad", "vad_backend": "silero", "api_key": "k",
          "mqtt_host": "broker.lan", "mqtt_port": 8883, "mqtt_username": "u",
          "mqtt_password": "p", "audio_device": "2", "asr_language": ""}, None),
        ({**addon["options"], "mqtt_enabled": False}, None),
        (addon["options"], None),  # MQTT on, no broker anywhere: runs without it
    ]
    for i, (options, svc) in enumerate(cases):
        cfg_data = ha_options.options_to_config(options, svc, keys)
        path = tmp_path / f"agent-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg_data))
        cfg = load_config(path, env={})
        assert cfg.state_dir == Path("/data")
        assert cfg.api.enabled and cfg.api.host == "0.0.0.0" and cfg.api.port == 8765
        assert cfg.gate.mode == options["gate_mode"]
        assert cfg.device_id == options["device_id"]
        if not options["mqtt_enabled"] or (svc is None and "mqtt_host" not in options):
            assert not cfg.mqtt.enabled
    cfg = load_config(tmp_path / "agent-0.yaml", env={})
    assert cfg.mqtt.enabled and cfg.mqtt.host == "core-mosquitto" and cfg.mqtt.username == "addons"
    cfg = load_config(tmp_path / "agent-1.yaml", env={})
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker.lan", 8883)
    assert cfg.api.key is not None and cfg.api.key.get_secret_value() == "k"
    assert cfg.audio.device == 2 and cfg.vad.backend == "silero"


async def test_addon_config_command_reads_the_supervisor(tmp_path: Path) -> None:
    """`ha_options.py config` asks the Supervisor for the MQTT service with the add-on's
    token, writes a private agent.yaml, and refuses a bad option with its YAML path."""
    seen: list[str] = []

    async def mqtt_service(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"result": "ok", "data": {
            "host": "core-mosquitto", "port": 1884, "ssl": False, "protocol": "3.1.1",
            "username": "addons", "password": "secret"}})

    app = web.Application()
    app.router.add_get("/services/mqtt", mqtt_service)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        options = yaml.safe_load((ADDON / "config.yaml").read_text())["options"]
        opts, out = tmp_path / "options.json", tmp_path / "agent.yaml"
        opts.write_text(json.dumps(options))
        env = {**os.environ, "SUPERVISOR_TOKEN": "tok123"}
        cmd = [sys.executable, str(REPO / "container" / "ha_options.py"),
               "--supervisor", f"http://127.0.0.1:{port}", "config", str(opts), str(out)]
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert seen == ["Bearer tok123"]
        assert out.stat().st_mode & 0o777 == 0o600
        cfg = load_config(out, env={})
        assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username) == ("core-mosquitto", 1884,
                                                                     "addons")
        assert "secret" not in err.decode()  # the log line shows no secrets

        opts.write_text(json.dumps({**options, "device_id": "not a valid id!"}))
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2
        assert "device_id" in err.decode()
    finally:
        await runner.cleanup()


def test_compose_file_wires_daemon_broker_and_volumes() -> None:
    """compose.yaml: the daemon and a broker it points at, volumes for state, models, config."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    daemon, broker = services["voice-agent"], services["mosquitto"]
    assert daemon["build"]["dockerfile"] == "Containerfile"
    assert (REPO / daemon["build"]["context"] / "Containerfile").is_file()
    env = daemon["environment"]
    assert env["VOICE_AGENT__MQTT__HOST"] == "mosquitto"
    assert "mosquitto" in daemon["depends_on"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in daemon["volumes"]}
    assert {"/data", "/models", "/config"} <= set(mounts)
    named = {src for src in mounts.values() if not src.startswith((".", "/", "$"))}
    named |= {v.split(":")[0] for v in broker["volumes"] if not v.startswith((".", "/"))}
    assert named <= set(compose["volumes"]), f"undeclared volumes among {named}"
    for v in [*daemon["volumes"], *broker["volumes"]]:
        if v.startswith("./"):
            assert (REPO / v.split(":")[0]).exists(), v
    assert "8765:8765" in daemon["ports"]
    conf = (REPO / "container" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 1883$", conf, re.M)
    load_config(REPO / "container" / "config" / "agent.yaml", env={})
    for name in ("compose.pulse.yaml", "compose.alsa.yaml"):
        override = yaml.safe_load((REPO / "container" / name).read_text())
        assert set(override["services"]) == {"voice-agent"}


def test_ignore_files_keep_what_the_build_copies() -> None:
    """.containerignore and .dockerignore agree, and exclude nothing the Containerfile COPYs."""
    ignore = (REPO / ".containerignore").read_text()
    assert ignore == (REPO / ".dockerignore").read_text()
    patterns = [p for p in ignore.splitlines() if p and not p.startswith(("#", "!"))]
    text = (REPO / "Containerfile").read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert "agent" in sources and "models_onnx/manifest.yaml" in sources
    for src in sources:
        assert (REPO / src).exists(), src
        for pat in patterns:
            assert not Path(src).match(pat.rstrip("/")) or src == "models_onnx/manifest.yaml", \
                f"{src} is excluded by {pat}"


# --------------------------------------------------------------------------------------------
# Slow: the image itself
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image built from a clean clone of HEAD; yields that clone."""
    if reason := buildah.missing_requirements():
        pytest.skip(reason)
    clone = tmp_path_factory.mktemp("clone") / "voice-agent"
    # Before the recipe is committed a clone of HEAD has no Containerfile: the working tree's
    # recipe files (and only those) are added to the clone. VOICE_AGENT_TEST_RECIPE=worktree
    # takes them from the working tree even when HEAD has them, while the recipe is edited.
    worktree = os.environ.get("VOICE_AGENT_TEST_RECIPE") == "worktree"
    if added := buildah.clone_head(clone, recipe_from_worktree=worktree):
        print(f"recipe files taken from the working tree: {added}")
    log = tmp_path_factory.mktemp("build") / "build.log"
    seconds = buildah.build(clone, TAG, log)
    print(f"image {TAG} built from a clone of HEAD in {seconds:.0f} s, "
          f"{buildah.image_size(TAG) / 1e6:.0f} MB")
    yield clone


def _state_dir(tmp_path: Path, name: str = "data") -> Path:
    d = tmp_path / name
    d.mkdir()
    os.chown(d, UID, UID)
    return d


@pytest.mark.slow
def test_image_is_slim_non_root_and_has_a_healthcheck(image: Path) -> None:
    """Under 600 MB, no torch inside, runs as uid 1000, HEALTHCHECK calls /api/health."""
    size = buildah.image_size(TAG)
    assert size < 600e6, f"image is {size / 1e6:.0f} MB"
    info = buildah.inspect(TAG)
    health = info["Docker"]["config"]["Healthcheck"]["Test"]
    assert "/opt/voice-agent/healthcheck.py" in " ".join(health)
    assert info["Docker"]["config"]["User"] == f"{UID}:{UID}"
    ctr = buildah.Container(TAG)
    try:
        r = ctr.run(["sh", "-c", "id -u; voice-agent --version; command -v voice-agent; "
                     "python -c 'import importlib.util as u; print(u.find_spec(\"torch\"))'; "
                     "voice-agent models verify"])
        assert r.returncode == 0, r.stdout + r.stderr
        uid, version, where, torch_spec = r.stdout.splitlines()[:4]
        assert uid == str(UID)
        assert version.startswith("voice-agent ")
        assert where == "/opt/venv/bin/voice-agent"
        assert torch_spec == "None"
        assert "whisper-tiny.en-int8: ok" in r.stdout
    finally:
        ctr.remove()


@pytest.mark.slow
def test_daemon_answers_health_and_transcribes(image: Path, tmp_path: Path) -> None:
    """Config from /config/agent.yaml, the API on the host, a shared recording transcribed."""
    need_shared()
    config = tmp_path / "config"
    config.mkdir()
    (config / "agent.yaml").write_text("device_id: container-test\ngate:\n  mode: ptt\n")
    port = free_port()
    env = {"VOICE_AGENT__API__PORT": str(port), "VOICE_AGENT__API__KEY": API_KEY}
    ctr = buildah.Container(TAG)
    running = ctr.start(["/usr/bin/tini", "-s", "--", "/opt/voice-agent/entrypoint.sh"],
                        tmp_path / "daemon.log", env=env,
                        volumes=[f"{_state_dir(tmp_path)}:/data", f"{config}:/config:ro"])
    try:
        seconds, health = buildah.wait_health(port, running, within=90)
        print(f"start -> health serving ({health['status']}): {seconds:.2f} s")
        assert health["ready"] is True
        assert health["device_id"] == "container-test"
        assert health["models"]["asr"] == "whisper-tiny.en-int8"
        status, body = buildah.get_json(f"http://127.0.0.1:{port}/api/stats")
        assert status == 401, "the API key from the environment must be required"
        rows = asr_en_rows()[:3]
        refs, hyps = [], []
        for row in rows:
            status, body = buildah.post_file(f"http://127.0.0.1:{port}/api/asr/transcribe",
                                             ASR_EN / row["file"], {"X-API-Key": API_KEY})
            assert status == 200, body
            assert body["model"] == "whisper-tiny.en-int8"
            refs.append(row["reference"])
            hyps.append(body["text"])
        assert wer(refs, hyps) <= 0.25, list(zip(refs, hyps, strict=True))
        # The image's HEALTHCHECK command, run inside while the daemon is up: healthy while
        # it serves, also without a microphone ("degraded"), unless strict.
        check = ["/opt/venv/bin/python", "/opt/voice-agent/healthcheck.py"]
        r = ctr.run(check, env={"VOICE_AGENT__API__PORT": str(port)})
        assert r.returncode == 0, r.stdout + r.stderr
        _, health = buildah.get_json(f"http://127.0.0.1:{port}/api/health")
        r = ctr.run(check, env={"VOICE_AGENT__API__PORT": str(port),
                                "VOICE_AGENT_HEALTHCHECK_STRICT": "1"})
        assert r.returncode == (0 if health["status"] == "ok" else 1), r.stdout + str(health)
        r = ctr.run(check, env={"VOICE_AGENT__API__PORT": str(free_port())})
        assert r.returncode == 1 and "refused" in r.stdout, r.stdout
    finally:
        rc = running.stop()
        ctr.remove()
    assert rc == 0, running.output()[-3000:]


@pytest.mark.slow
async def test_state_in_data_survives_a_second_run(image: Path, tmp_path: Path) -> None:
    """Run 1 transcribes a recording with the broker away: its final waits in the outbox
    journal in /data (a host directory). Run 2, in a fresh container from the image, delivers
    it once the broker is there."""
    need_shared()
    if not have_mosquitto():
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    data = _state_dir(tmp_path)
    device = "persist-test"
    common = {"VOICE_AGENT__DEVICE_ID": device, "VOICE_AGENT__MQTT__ENABLED": "true",
              "VOICE_AGENT__MQTT__HOST": "127.0.0.1", "VOICE_AGENT__MQTT__RECONNECT_MAX_S": "1"}
    audio = ASR_EN / "cards-005.wav"
    reference = next(r["reference"] for r in asr_en_rows() if r["file"] == audio.name)
    volumes = [f"{data}:/data", f"{ASR_EN}:/audio:ro"]

    first = buildah.Container(TAG)
    try:
        running = first.start(
            ["/usr/bin/tini", "-s", "--", "/opt/voice-agent/entrypoint.sh", "run",
             "--source", f"file:/audio/{audio.name}", "--mode", "vad"],
            tmp_path / "run1.log", volumes=volumes,
            env={**common, "VOICE_AGENT__MQTT__PORT": str(free_port()),  # nobody listens
                 "VOICE_AGENT__MQTT__SHUTDOWN_FLUSH_S": "0",
                 "VOICE_AGENT__API__PORT": str(free_port())})
        rc: int | None = await asyncio.to_thread(running.wait, 180)
    finally:
        first.remove()
    assert rc == 0, running.output()[-3000:]
    journal = data / f"mqtt-outbox-{device}.jsonl"
    assert journal.is_file(), sorted(p.name for p in data.iterdir())
    assert journal.stat().st_uid == UID  # written by the image's non-root user
    assert '\\"type\\":\\"asr.final\\"' in journal.read_text()

    with Mosquitto() as broker:  # started by `with`
        async with Subscriber(broker.port, [f"voice-agent/{device}/event/asr.final"]) as sub:
            second = buildah.Container(TAG)
            port = free_port()
            running = second.start(
                ["/usr/bin/tini", "-s", "--", "/opt/voice-agent/entrypoint.sh"],
                tmp_path / "run2.log", volumes=volumes,
                env={**common, "VOICE_AGENT__MQTT__PORT": str(broker.port),
                     "VOICE_AGENT__API__PORT": str(port)})
            try:
                msgs = await sub.wait_for(lambda: sub.messages, within=90)
                final = msgs[0].json()
                assert final["device_id"] == device
                assert wer([reference], [str(final["text"])]) <= 0.25, final
                # Made by run 1: run 2 has a microphone source (none here) and made no final.
                await asyncio.to_thread(buildah.wait_health, port, running, 60)
                status, health = buildah.get_json(f"http://127.0.0.1:{port}/api/health")
                assert status == 200 and health["device_id"] == device
            finally:
                rc = await asyncio.to_thread(running.stop)
                second.remove()
    assert rc == 0, running.output()[-3000:]


@pytest.mark.slow
def test_unwritable_data_is_refused_with_the_fix(image: Path, tmp_path: Path) -> None:
    """A /data the image's user cannot write stops the start with exit 2 and the chown."""
    data = tmp_path / "root-owned"
    data.mkdir(mode=0o755)
    ctr = buildah.Container(TAG)
    try:
        r = ctr.run(["/opt/voice-agent/entrypoint.sh"], volumes=[f"{data}:/data"])
    finally:
        ctr.remove()
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not writable" in r.stderr and f"chown {UID}:{UID}" in r.stderr
    assert not any(data.iterdir())


@pytest.mark.slow
def test_addon_image_runs_from_options_json(image: Path, tmp_path: Path) -> None:
    """The add-on's Dockerfile on top of the image: run.sh turns /data/options.json into the
    daemon's config (device id, gate mode, API key) and the daemon serves with it."""
    need_shared()
    addon_options = yaml.safe_load((ADDON / "config.yaml").read_text())["options"]
    buildah.bud(image / "ha-addon" / "voice-agent", ADDON_TAG, tmp_path / "addon-build.log",
                {"BUILD_FROM": TAG})
    data = tmp_path / "data"
    data.mkdir()
    (data / "options.json").write_text(json.dumps({
        **addon_options, "device_id": "addon-test", "gate_mode": "vad",
        "api_key": API_KEY, "mqtt_enabled": False}))
    port = free_port()
    ctr = buildah.Container(ADDON_TAG)
    running = ctr.start(["/usr/bin/tini", "-s", "--", "/run.sh"], tmp_path / "addon.log",
                        env={"VOICE_AGENT_ADDON_API_PORT": str(port)},
                        volumes=[f"{data}:/data"])
    try:
        _, health = buildah.wait_health(port, running, within=90)
        assert health["device_id"] == "addon-test"
        status, body = buildah.post_file(f"http://127.0.0.1:{port}/api/asr/transcribe",
                                         ASR_EN / "cards-005.wav", {"X-API-Key": API_KEY})
        assert status == 200 and body["text"], body
        # gate_mode: vad reached the daemon: push-to-talk commands are refused in vad mode.
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/ptt/start", data=b"",
                                     method="POST", headers={"X-API-Key": API_KEY})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 409
        assert json.loads(err.value.read())["error"]["code"] == "wrong_mode"
    finally:
        rc = running.stop()
        ctr.remove()
    assert rc == 0, running.output()[-3000:]

    (data / "options.json").write_text(json.dumps({**addon_options, "log_level": "loud"}))
    ctr = buildah.Container(ADDON_TAG)
    try:
        r = ctr.run(["/run.sh"], volumes=[f"{data}:/data"])
    finally:
        ctr.remove()
    assert r.returncode == 2 and "log_level" in r.stderr, r.stdout + r.stderr


@pytest.mark.slow
def test_microphone_through_a_mounted_pulseaudio_socket(image: Path, tmp_path: Path) -> None:
    """The documented PulseAudio/PipeWire path: the host server's socket mounted into the
    container and PULSE_SERVER set; speech played into the server's virtual microphone comes
    out of the daemon inside as an asr.final (ALSA's pulse plugin -> PortAudio -> mic)."""
    need_shared()
    if reason := pulse_missing():
        pytest.skip(reason)
    audio = ASR_EN / "cards-005.wav"
    reference = next(r["reference"] for r in asr_en_rows() if r["file"] == audio.name)
    with pulse_server(rate=48000) as srv:
        sock = srv.server.removeprefix("unix:")
        volumes = [f"{sock}:/run/pulse/native", f"{_state_dir(tmp_path)}:/data"]
        env = {"PULSE_SERVER": "unix:/run/pulse/native",
               "VOICE_AGENT__API__PORT": str(free_port())}
        ctr = buildah.Container(TAG)
        try:
            r = ctr.run(["/opt/voice-agent/entrypoint.sh", "devices"], env=env,
                        volumes=volumes)
            assert r.returncode == 0 and "pulse" in r.stdout, r.stdout + r.stderr
            running = ctr.start(["/usr/bin/tini", "-s", "--", "/opt/voice-agent/entrypoint.sh",
                                 "run", "--mode", "vad", "--events", "-"],
                                tmp_path / "daemon.log", env=env, volumes=volumes)
            try:
                # `ok` (not `degraded`): the daemon itself says its microphone delivers.
                buildah.wait_health(int(env["VOICE_AGENT__API__PORT"]), running, within=90,
                                    statuses=("ok",))
                finals: list[dict[str, Any]] = []
                for _ in range(3):  # the device may still be opening for the first play
                    subprocess.run(srv.paplay_cmd(audio), env=srv.env, check=True, timeout=30)
                    deadline = time.monotonic() + 10
                    while not finals and time.monotonic() < deadline:
                        finals = [json.loads(line) for line in running.output().splitlines()
                                  if line.startswith("{") and '"type":"asr.final"' in line]
                        time.sleep(0.2)
                    if finals:
                        break
                assert finals, running.output()[-3000:]
                assert wer([reference], [str(finals[0]["text"])]) <= 0.25, finals[0]
            finally:
                rc = running.stop()
        finally:
            ctr.remove()
    assert rc == 0, running.output()[-3000:]
