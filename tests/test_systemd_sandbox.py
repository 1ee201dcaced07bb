"""The daemon's models and sockets work under the unit's seccomp settings (measured, not hoped).

systemd cannot start units here (it is not PID 1 in CI containers), so we rebuild what the
unit's kernel-side settings do with libseccomp, the library systemd itself uses, and run
the real daemon under it:
- `SystemCallFilter=@system-service` `~@privileged @resources` with `SystemCallErrorNumber=EPERM`
  (the sets read from `systemd-analyze syscall-filter`, so they are systemd's own);
- `MemoryDenyWriteExecute=yes` as systemd 252 implements it: `mmap` with PROT_WRITE|PROT_EXEC,
  `mprotect`/`pkey_mprotect` adding PROT_EXEC and `shmat` with SHM_EXEC fail with EPERM;
- `RestrictAddressFamilies=`: `socket()` of any other family fails with EAFNOSUPPORT;
- `NoNewPrivileges=`, `CapabilityBoundingSet=` and an unprivileged `User=` via setpriv.
Every setting is read from the rendered unit, so the test follows the unit when it changes.

`python tests/test_systemd_sandbox.py UNIT -- CMD...` applies the filters and execs CMD.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.service_install import default_unit, world_reachable  # noqa: E402
from tests.mosquitto import free_port  # noqa: E402

ANALYZE = shutil.which("systemd-analyze")
VENV_BIN = Path(sys.executable).parent
EXE = VENV_BIN / "voice-agent"
CLIP = REPO.parent / "shared" / "data" / "asr-en" / "cards-005.wav"
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
AF_MAX = 46  # one past the highest address family Linux 6.x knows

# libseccomp's ABI (seccomp.h)
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_MASKED_EQ = 4, 5, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def scmp_act_errno(e: int) -> int:
    """SCMP_ACT_ERRNO(e)."""
    return 0x00050000 | (e & 0xFFFF)


class ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _libseccomp() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit, each key's values in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def syscall_set(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd set (`@system-service`), nested sets expanded."""
    assert ANALYZE
    seen = set() if seen is None else seen
    seen.add(group)
    text = subprocess.run([ANALYZE, "syscall-filter", group], capture_output=True, text=True,
                          check=True).stdout
    names: set[str] = set()
    for line in text.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                names |= syscall_set(item, seen)
        else:
            names.add(item)
    return names


def allowed_syscalls(filters: list[str]) -> set[str]:
    """Apply `SystemCallFilter=` lines the way systemd does: the first allow-list starts the
    set, `~` lines take names out of it."""
    allowed: set[str] = set()
    for value in filters:
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= syscall_set(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: ArgCmp) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a system call of this architecture
        return
    arr = (ArgCmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0 and rc != -errno.EEXIST:
        raise OSError(-rc, f"seccomp_rule_add({name}) failed")


def _load(lib: ctypes.CDLL, ctx: int) -> None:
    rc = lib.seccomp_load(ctx)
    lib.seccomp_release(ctx)
    if rc < 0:
        raise OSError(-rc, "seccomp_load failed")


def apply_unit_filters(unit_text: str) -> None:
    """Load the unit's seccomp settings into this process (inherited across exec)."""
    lib = _libseccomp()
    assert lib is not None, "libseccomp not found"
    s = unit_settings(unit_text)
    if s.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        eperm = scmp_act_errno(errno.EPERM)
        wx = PROT_WRITE | PROT_EXEC
        _rule(lib, ctx, eperm, "mmap", ArgCmp(2, SCMP_CMP_MASKED_EQ, wx, wx))
        for name in ("mprotect", "pkey_mprotect"):
            _rule(lib, ctx, eperm, name, ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        _rule(lib, ctx, eperm, "shmat", ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        _load(lib, ctx)
    if s.get("RestrictAddressFamilies"):
        allowed = {FAMILIES[f] for v in s["RestrictAddressFamilies"] for f in v.split()}
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        refuse = scmp_act_errno(errno.EAFNOSUPPORT)
        for fam in range(AF_MAX):
            if fam not in allowed:
                _rule(lib, ctx, refuse, "socket", ArgCmp(0, SCMP_CMP_EQ, fam, 0))
        _rule(lib, ctx, refuse, "socket", ArgCmp(0, SCMP_CMP_GE, AF_MAX, 0))
        _load(lib, ctx)
    # Last, as systemd does: once loaded, seccomp() itself is no longer allowed.
    if s.get("SystemCallFilter"):
        err = getattr(errno, s.get("SystemCallErrorNumber", ["EPERM"])[-1], errno.EPERM)
        ctx = lib.seccomp_init(scmp_act_errno(err))
        for name in sorted(allowed_syscalls(s["SystemCallFilter"])):
            _rule(lib, ctx, SCMP_ACT_ALLOW, name)
        _load(lib, ctx)


# --- the unit's mount namespace ---------------------------------------------------------

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
KEEP_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048  # + noatime, nodiratime
HOME_DIRS = ("/home", "/root", "/run/user")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    enc = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {source} on {target}: {os.strerror(e)}")


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw))
    return points


def _under_any(path: str, roots: list[str] | tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def apply_unit_mounts(unit_text: str, keep: list[str]) -> list[str]:
    """In a fresh mount (and PID) namespace, do what the unit's ProtectSystem=strict,
    ReadWritePaths=, PrivateTmp=, ProtectHome=, ProtectKernelTunables= and
    ProcSubset=pid/ProtectProc=invisible do; `keep` are the test's own directories, kept
    writable at the same paths (systemd's StateDirectory=). Returns notes on what differs."""
    s = unit_settings(unit_text)
    notes: list[str] = []
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing of this reaches the host
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in keep}
    tmp_dirs = ["/tmp", "/var/tmp"] if s.get("PrivateTmp", ["no"])[-1] == "yes" else []
    for d in tmp_dirs:
        _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path, fd in fds.items():  # back at their paths, through the fd the tmpfs hid
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
    if s.get("ProtectHome", ["no"])[-1] == "yes":
        if _under_any(os.path.realpath(sys.executable), HOME_DIRS):
            notes.append("ProtectHome=yes emulated as read-only: this Python lives in a home")
        else:
            for d in HOME_DIRS:
                if os.path.isdir(d):
                    _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=000")
    if s.get("ProtectSystem", ["no"])[-1] == "strict":
        writable = [*keep, *tmp_dirs]
        skip = ["/proc", "/dev"] + ([] if s.get("ProtectKernelTunables") == ["yes"] else
                                    ["/sys"])
        for point in _mount_points():
            if _under_any(point, skip) or point in writable:
                continue
            flags = os.statvfs(point).f_flag & KEEP_FLAGS
            try:
                _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
            except OSError as e:
                if point == "/":
                    raise
                notes.append(f"{point} stays writable: {e}")
    if s.get("ProcSubset", ["all"])[-1] == "pid":
        hide = s.get("ProtectProc", ["default"])[-1]
        opts = "subset=pid" + (f",hidepid={hide}" if hide != "default" else "")
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
    return notes


def has_mount_settings(unit_text: str) -> bool:
    """Whether the unit asks for a mount namespace at all (the user unit does not)."""
    s = unit_settings(unit_text)
    return any(k in s for k in ("ProtectSystem", "PrivateTmp", "ProcSubset"))


# --- running things under it -------------------------------------------------------------


def _missing() -> str | None:
    if ANALYZE is None:
        return "systemd-analyze not installed (apt-get install systemd)"
    if _libseccomp() is None:
        return "libseccomp not installed (apt-get install libseccomp2)"
    if not EXE.exists():
        return f"{EXE} not installed (pip install -e .)"
    return None


@pytest.fixture(scope="module")
def unit_dir() -> Iterator[Path]:
    """A directory an unprivileged user can read."""
    if reason := _missing():
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="va-unit-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _unit(d: Path, name: str, text: str) -> Path:
    path = d / name
    path.write_text(text)
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module")
def unit_file(unit_dir: Path) -> Path:
    """The system unit at its strictest: MemoryDenyWriteExecute=yes (no microphone)."""
    return _unit(unit_dir, "voice-agent.service", default_unit(deny_wx=True))


@pytest.fixture()
def home() -> Iterator[Path]:
    """A state/home directory the sandboxed user owns (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="va-home-"))
    if os.geteuid() == 0 and world_reachable(Path(sys.executable)):  # we will be nobody
        nobody = pwd.getpwnam("nobody")
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sandboxed(unit: Path, argv: list[str], keep: Sequence[Path] = (),
              switch_user: bool = True) -> list[str]:
    """`argv` as the unit would run it: its mount namespace (when we are root: `keep` stay
    writable), no capabilities, no new privileges, an unprivileged user (like User=), then
    its seccomp filters. The user stays root without capabilities when the interpreter is
    out of others' reach (a pyenv Python under /root)."""
    me = str(Path(__file__).resolve())
    inner = [sys.executable, me, "seccomp", str(unit), "--", *argv]
    setpriv, unshare = shutil.which("setpriv"), shutil.which("unshare")
    if os.geteuid() != 0 or setpriv is None:
        return inner
    user = (["--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            if switch_user and world_reachable(Path(sys.executable)) else [])
    cmd = [setpriv, *user, "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
           "--", *inner]
    if unshare is None or not has_mount_settings(unit.read_text()):
        return cmd
    dirs = [str(unit.parent), *map(str, keep)]
    return [unshare, "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
            sys.executable, me, "mounts", str(unit), ",".join(dirs), "--", *cmd]


def sandbox_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment like a unit's: HOME, TMPDIR and state in `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICE_AGENT", "NOTIFY"))}
    env.update(HOME=str(home), TMPDIR=str(home), VOICE_AGENT__STATE_DIR=str(home / "state"),
               PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}", **extra)
    return env


PROBE = """
import errno, mmap, os, socket
out = {}
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    out["wx_mmap"] = "ok"
except OSError as e:
    out["wx_mmap"] = errno.errorcode[e.errno]
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
    out["af_packet"] = "ok"
except OSError as e:
    out["af_packet"] = errno.errorcode[e.errno]
try:
    os.sched_setaffinity(0, os.sched_getaffinity(0))
    out["setaffinity"] = "ok"
except OSError as e:
    out["setaffinity"] = errno.errorcode[e.errno]
socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
out["filters"] = int(status["Seccomp_filters"])
try:
    open("/usr/voice-agent-probe", "w")
    out["write_usr"] = "ok"
except OSError as e:
    out["write_usr"] = errno.errorcode[e.errno]
home = os.environ["HOME"]
open(os.path.join(home, "written"), "w").write("x")
out["write_home"] = "ok"
out["cpuinfo"] = os.path.exists("/proc/cpuinfo")
out["tmp_marker"] = os.path.exists(os.environ["MARKER"])
out["caps"] = status["CapEff"].strip()
print(__import__("json").dumps(out))
"""


def test_the_sandbox_really_refuses_what_the_unit_forbids(unit_file: Path, home: Path) -> None:
    """W+X memory, packet sockets and @resources calls work outside and fail inside."""
    with tempfile.NamedTemporaryFile(prefix="va-marker-", dir="/tmp") as marker:
        env = sandbox_env(home, MARKER=marker.name)
        outside = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True,
                                            text=True, check=True, env=env).stdout)
        inside_run = subprocess.run(sandboxed(unit_file, [sys.executable, "-c", PROBE], [home]),
                                    capture_output=True, text=True, env=env)
    assert inside_run.returncode == 0, inside_run.stderr
    inside = json.loads(inside_run.stdout)
    assert outside["wx_mmap"] == "ok" and outside["setaffinity"] == "ok"
    assert outside["filters"] == 0 and outside["tmp_marker"] and outside["cpuinfo"]
    # Three filters: W^X, address families, system calls (as systemd loads them).
    want = {"wx_mmap": "EPERM", "af_packet": "EAFNOSUPPORT", "setaffinity": "EPERM",
            "filters": 3, "caps": "0000000000000000", "write_home": "ok"}
    if os.geteuid() == 0 and shutil.which("unshare"):
        # ProtectSystem=strict, PrivateTmp=, ProcSubset=pid as well.
        want.update(write_usr="EROFS", cpuinfo=False, tmp_marker=False)
    else:
        want.update(write_usr=outside["write_usr"], cpuinfo=True, tmp_marker=True)
    assert inside == want


MODEL_PROBE = """
import json, sys
import numpy as np, onnxruntime as ort, sherpa_onnx, soundfile as sf
whisper, silero, clip = sys.argv[1:4]
audio, sr = sf.read(clip, dtype="float32")
rec = sherpa_onnx.OfflineRecognizer.from_whisper(
    encoder=f"{whisper}/tiny.en-encoder.int8.onnx", decoder=f"{whisper}/tiny.en-decoder.int8.onnx",
    tokens=f"{whisper}/tiny.en-tokens.txt", language="en", task="transcribe", num_threads=2)
stream = rec.create_stream()
stream.accept_waveform(sr, audio)
rec.decode_stream(stream)
sess = ort.InferenceSession(f"{silero}/silero_vad.onnx", providers=["CPUExecutionProvider"])
state, probs = np.zeros((2, 1, 128), np.float32), []
for i in range(0, len(audio) - 512, 512):
    frame = np.concatenate([np.zeros(64, np.float32), audio[i:i + 512]])[None, -576:]
    out, state = sess.run(None, {"input": frame, "state": state, "sr": np.array(16000)})
    probs.append(float(out[0][0]))
print(json.dumps({"text": stream.result.text, "speech_frames": sum(p > 0.5 for p in probs),
                  "frames": len(probs)}))
"""


def _model_dirs() -> tuple[Path, Path]:
    from agent import models

    try:
        return models.path("whisper-tiny.en-int8"), models.path("silero-vad")
    except Exception as e:
        pytest.skip(f"default models not installed: {e}")


def test_models_decode_under_the_unit_sandbox(unit_file: Path, home: Path) -> None:
    """sherpa-onnx (Whisper int8) and onnxruntime (Silero VAD) load and run with W^X memory,
    the @system-service filter and no capabilities; same results as outside."""
    if not CLIP.exists():
        pytest.skip(f"shared speech not found at {CLIP}")
    whisper, silero = _model_dirs()
    argv = [sys.executable, "-c", MODEL_PROBE, str(whisper), str(silero), str(CLIP)]
    outside = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert outside.returncode == 0, outside.stderr[-3000:]
    inside = subprocess.run(sandboxed(unit_file, argv, [home]), capture_output=True, text=True,
                            env=sandbox_env(home), timeout=300)
    assert inside.returncode == 0, inside.stderr[-3000:]
    got, want = json.loads(inside.stdout), json.loads(outside.stdout)
    assert got == want
    assert "spades" in got["text"].lower() and got["speech_frames"] > got["frames"] // 3, got


@pytest.mark.slow
def test_transcribe_runs_under_the_unit_sandbox(unit_file: Path, home: Path) -> None:
    """onnxruntime + sherpa-onnx (Whisper int8) load and decode with W^X memory."""
    from agent.asr.wer import wer

    if not CLIP.exists():
        pytest.skip(f"shared speech not found at {CLIP}")
    from agent import models

    try:
        models.path("whisper-tiny.en-int8")
    except Exception as e:
        pytest.skip(f"default ASR model not installed: {e}")
    proc = subprocess.run(sandboxed(unit_file, [str(EXE), "transcribe", "--json", str(CLIP)],
                                    [home]),
                          capture_output=True, text=True, env=sandbox_env(home), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], result
    assert wer(["eight of spades four of clubs seven of hearts"], [result["text"]]) <= 0.25, result


@pytest.mark.slow
def test_daemon_serves_under_the_unit_sandbox(unit_file: Path, home: Path) -> None:
    """`voice-agent run` with Silero VAD (an onnxruntime session), Whisper and the HTTP API:
    the API answers over AF_INET and the recording's final comes out."""
    if not CLIP.exists():
        pytest.skip(f"shared speech not found at {CLIP}")
    port = free_port()
    env = sandbox_env(home, VOICE_AGENT__API__ENABLED="true", VOICE_AGENT__API__PORT=str(port),
                      VOICE_AGENT__VAD__BACKEND="silero")
    # Real time, so the daemon is still up when we ask for health; stdin stays open.
    argv = [str(EXE), "run", "--source", f"file:{CLIP}", "--realtime", "--mode", "vad",
            "--events", "-"]
    proc = subprocess.Popen(sandboxed(unit_file, argv, [home]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    health: dict[str, object] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health",
                                            timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert health.get("version"), f"API never answered: {err[-2000:]}"
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finals = [e["text"] for e in events if e["type"] == "asr.final"]
    errors = [e for e in events if e["type"] == "error"]
    assert not errors, errors
    assert finals and "spades" in " ".join(finals).lower(), finals


@pytest.mark.slow
@pytest.mark.parametrize("deny_wx", [False, True], ids=["default", "deny-write-execute"])
def test_mic_through_pulseaudio_under_the_user_unit_sandbox(unit_dir: Path, home: Path,
                                                            deny_wx: bool) -> None:
    """The desktop path: PortAudio -> ALSA pulse plugin -> a real PulseAudio server, under
    the user unit's filters (@system-service, address families); speech played into the
    server comes out as a final. With MemoryDenyWriteExecute=yes the microphone cannot open
    (sounddevice's cffi callback needs W+X memory): that is why the units default to no. If
    this ever passes with yes, the mic stopped needing it: turn the default on."""
    from tests.pulse import missing_requirements, pulse_server

    user_unit_file = _unit(unit_dir, f"user-{deny_wx}.service",
                           default_unit(user_mode=True, deny_wx=deny_wx))

    if reason := missing_requirements():
        pytest.skip(reason)
    if not CLIP.exists():
        pytest.skip(f"shared speech not found at {CLIP}")
    port = free_port()
    with pulse_server(rate=48000) as srv:
        env = sandbox_env(home, VOICE_AGENT__API__ENABLED="true",
                          VOICE_AGENT__API__PORT=str(port))
        argv = [str(EXE), "run", "--source", "mic:pulse", "--mode", "vad", "--events", "-"]
        # A user service runs as the session's user: no switch to nobody.
        proc = subprocess.Popen(sandboxed(user_unit_file, argv, [home], switch_user=False),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        try:
            deadline = time.monotonic() + 60
            ready = False
            while not ready and time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health",
                                                timeout=2) as r:
                        ready = bool(json.loads(r.read()).get("ready"))
                except OSError:
                    pass
                time.sleep(0.2)
            assert ready, "daemon never became ready"
            time.sleep(0.5)
            subprocess.run(srv.paplay_cmd(CLIP), env=srv.env, check=True, timeout=30)
            time.sleep(3.0)  # the segmenter's silence, then the decode
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err[-3000:]
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    errors = [(e["code"], e["message"]) for e in events if e["type"] == "error"]
    finals = [e["text"] for e in events if e["type"] == "asr.final"]
    if deny_wx:
        assert errors and all("write+execute memory" in m for _, m in errors), errors
        assert finals == []
        return
    assert not errors, errors
    assert "spades" in " ".join(finals).lower(), (finals, err[-2000:])


if __name__ == "__main__":
    # python tests/test_systemd_sandbox.py seccomp UNIT -- CMD...
    # python tests/test_systemd_sandbox.py mounts UNIT DIR[,DIR...] -- CMD...  (root, unshared)
    stage, unit_path, *rest = sys.argv[1:]
    keep_dirs = rest.pop(0).split(",") if stage == "mounts" else []
    sep, *cmd = rest
    assert stage in ("seccomp", "mounts") and sep == "--" and cmd, __doc__
    text = Path(unit_path).read_text()
    if stage == "mounts":
        for note in apply_unit_mounts(text, keep_dirs):
            print(f"sandbox: {note}", file=sys.stderr)
    else:
        apply_unit_filters(text)
    os.execvp(cmd[0], cmd)
