"""A private, throw-away PulseAudio server for tests that need a real capture device.

`pulse_server()` starts `pulseaudio` in a temp dir with a null sink (`vsink`) whose monitor is
remapped into a source (`vmic`, the default source), points this process at it through
`PULSE_SERVER`, and kills it on exit. PortAudio then sees the server as the ALSA device `pulse`
(ALSA's pulse plugin, Debian package libasound2-plugins, a dependency of pulseaudio). Audio
played with `paplay --device=vsink` comes back out of that device.

PortAudio enumerates devices once, in `Pa_Initialize` (when `sounddevice` is imported), so the
server must be up before that; if `sounddevice` was imported earlier, `refresh_portaudio()`
re-enumerates. Works as root: pulseaudio only warns ("not intended to be run as root") when
started in per-user mode (`--system=false`) with its own HOME and runtime dir.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SINK = "vsink"
SOURCE = "vmic"
_TOOLS = ("pulseaudio", "pactl", "paplay")
_ALSA_PULSE_PLUGIN = (
    "/usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so",
    "/usr/lib*/alsa-lib/libasound_module_pcm_pulse.so",
)


def missing_portaudio() -> str | None:
    """Why sounddevice cannot work here (no libportaudio), or None."""
    if ctypes.util.find_library("portaudio") is None:
        return "PortAudio not installed (apt-get install libportaudio2)"
    return None


def missing_requirements() -> str | None:
    """Why a PulseAudio-backed capture test cannot run here, or None when it can."""
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install pulseaudio pulseaudio-utils)"
    if reason := missing_portaudio():
        return reason
    if not any(glob.glob(p) for p in _ALSA_PULSE_PLUGIN):
        return "ALSA pulse plugin not installed (apt-get install libasound2-plugins)"
    return None


def refresh_portaudio() -> None:
    """Make an already-imported sounddevice re-enumerate devices (no-op when not imported)."""
    sd = sys.modules.get("sounddevice")
    if sd is not None:
        sd._terminate()
        sd._initialize()


@dataclass
class PulseServer:
    """A running private server: its socket, the env that reaches it, and helpers."""

    root: Path
    server: str
    rate: int
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)
    sink: str = SINK
    source: str = SOURCE

    @property
    def log(self) -> str:
        """The daemon's log so far (for assertion messages)."""
        path = self.root / "pulseaudio.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pactl(self, *args: str, timeout: float = 10.0) -> str:
        """Run pactl against this server; raises CalledProcessError on failure."""
        return subprocess.run(
            ["pactl", *args], env=self.env, check=True, capture_output=True, text=True,
            timeout=timeout,
        ).stdout

    def paplay_cmd(self, path: Path | str) -> list[str]:
        """Command line that plays a sound file into the null sink."""
        return ["paplay", f"--device={self.sink}", str(path)]


def _wait_ready(srv: PulseServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if srv.proc.poll() is not None:
            raise RuntimeError(
                f"pulseaudio exited with {srv.proc.returncode} at start:\n{srv.log}"
            )
        try:
            srv.pactl("info", timeout=2.0)
            return
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"pulseaudio not answering after {timeout:g} s:\n{srv.log}"
                ) from None
            time.sleep(0.1)


@contextlib.contextmanager
def pulse_server(rate: int = 48000, start_timeout: float = 15.0) -> Iterator[PulseServer]:
    """Start a private PulseAudio, export PULSE_SERVER for this process, kill it on exit."""
    root = Path(tempfile.mkdtemp(prefix="pulse-test-"))
    if len(str(root)) > 80:  # unix socket paths must fit in sockaddr_un (108 bytes)
        shutil.rmtree(root)
        root = Path(tempfile.mkdtemp(prefix="pulse-test-", dir="/tmp"))
    run, state, home = root / "run", root / "state", root / "home"
    for d in (run, state, home):
        d.mkdir(mode=0o700)
    sock = run / "native"
    client_conf = root / "client.conf"
    # Never let a client autospawn a second, per-user daemon if ours is not reachable.
    client_conf.write_text("autospawn = no\n")
    exported = {
        "PULSE_SERVER": f"unix:{sock}",
        "PULSE_CLIENTCONFIG": str(client_conf),
        "PULSE_RUNTIME_PATH": str(run),
    }
    daemon_env = {
        **os.environ, **exported,
        "XDG_RUNTIME_DIR": str(run), "PULSE_STATE_PATH": str(state), "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
    }
    daemon_env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    cmd = [
        "pulseaudio", "--daemonize=no", "--system=false", "-n", "--exit-idle-time=-1",
        "--disallow-exit", "--use-pid-file=false", "--log-target=stderr", "--log-level=notice",
        "--realtime=false", "--high-priority=false", "--no-cpu-limit=true",
        "--disable-shm=true",  # plain socket transport: no /dev/shm or memfd needed (containers)
        # speex, not soxr: pulseaudio's soxr setup is not linear-phase when it downsamples
        # (48 -> 16 kHz capture came back phase-warped above ~4 kHz, correlation ~0.991
        # even after sub-sample alignment); speex is a linear-phase windowed sinc.
        "--resample-method=speex-float-10",
        f"--load=module-native-protocol-unix socket={sock} auth-anonymous=1",
        f"--load=module-null-sink sink_name={SINK} rate={rate}",
        f"--load=module-remap-source master={SINK}.monitor source_name={SOURCE}",
    ]
    log = (root / "pulseaudio.log").open("wb")
    proc = subprocess.Popen(cmd, env=daemon_env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)
    srv = PulseServer(root=root, server=exported["PULSE_SERVER"], rate=rate, proc=proc,
                      env=daemon_env)
    saved = {k: os.environ.get(k) for k in exported}
    try:
        _wait_ready(srv, start_timeout)
        srv.pactl("set-default-sink", SINK)
        srv.pactl("set-default-source", SOURCE)
        os.environ.update(exported)
        refresh_portaudio()
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        refresh_portaudio()  # forget the `pulse` device that is gone now
        shutil.rmtree(root, ignore_errors=True)
