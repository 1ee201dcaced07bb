"""Build and run the voice-agent image with buildah, for tests and benchmarks.

Images are built with `container/build.sh` (buildah bud, chroot isolation) and run with
`buildah run --isolation chroot`, which needs neither a daemon nor user namespaces and shares
the host's network: a daemon inside listens on the host's loopback. `podman run` is not used
because the sandbox refuses its setrlimit calls.

Chroot isolation has no PID namespace, and killing `buildah run` leaves the process inside
running. So each run is started in a session of its own; `Running.stop()` sends SIGTERM to the
tini inside (which passes it to the daemon, for a clean shutdown) and then kills whatever is
left in that session, which holds only processes of this run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUILDAH = shutil.which("buildah")
BASE_IMAGE = "localhost/voice-agent-base:bookworm-slim"
SHARED = Path(os.environ.get("VOICE_AGENT_SHARED") or REPO.parent / "shared")
SER_SOURCES = SHARED / "models" / "ser-ravdess-cnn"
# Files of the container recipe: copied into a clone of HEAD that does not have them yet
# (before they are committed), so that the clone still builds with the recipe under test.
RECIPE = ("Containerfile", ".containerignore", ".dockerignore", "container", "ha-addon",
          "compose.yaml")


def missing_requirements() -> str | None:
    """Why images cannot be built and run here, or None."""
    if BUILDAH is None:
        return "buildah not installed (apt-get install buildah)"
    if os.geteuid() != 0:
        return "buildah with chroot isolation needs root here"
    if shutil.which("git") is None:
        return "git not installed"
    if not image_exists(BASE_IMAGE) and shutil.which("mmdebstrap") is None:
        return f"no {BASE_IMAGE} and no mmdebstrap to make it (apt-get install mmdebstrap)"
    return None


def image_exists(name: str) -> bool:
    """Whether buildah's store has this image."""
    assert BUILDAH is not None
    r = subprocess.run([BUILDAH, "images", "-q", name], capture_output=True, text=True,
                       check=False)
    return r.returncode == 0 and bool(r.stdout.strip())


def clone_head(dest: Path, recipe_from_worktree: bool = False) -> list[str]:
    """`git clone` the repository's HEAD into `dest` (a clean tree: none of the working
    tree's uncommitted changes); returns the recipe files copied in from the working tree:
    those HEAD lacks, or all of them with `recipe_from_worktree` (while editing the recipe)."""
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{REPO}", str(dest)],
                   check=True, capture_output=True)
    added = []
    for name in RECIPE:
        top = REPO / name
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for src in files:
            rel = src.relative_to(REPO)
            dst = dest / rel
            if not src.exists() or "__pycache__" in rel.parts:
                continue
            if dst.exists() and not recipe_from_worktree:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            added.append(str(rel))
    return added


def build(context: Path, tag: str, log: Path, extra: Iterable[str] = ()) -> float:
    """Build `context`'s Containerfile with its own container/build.sh; seconds taken."""
    t0 = time.monotonic()
    env = dict(os.environ)
    # The emotion checkpoint's home is GitHub, out of reach here: the shared copy is taken
    # (its sha256 checked against the manifest like a download).
    if (SER_SOURCES / "parallel_all_you_wantFINAL-429.pkl").is_file():
        env.setdefault("MODEL_SOURCES", str(SER_SOURCES))
    with log.open("wb") as out:
        r = subprocess.run(["bash", str(context / "container" / "build.sh"), "-C", str(context),
                            "-t", tag, *extra], stdout=out, stderr=subprocess.STDOUT,
                           check=False, env=env)
    if r.returncode != 0:
        raise AssertionError(f"image build failed (exit {r.returncode}):\n{tail(log, 40)}")
    return time.monotonic() - t0


def bud(context: Path, tag: str, log: Path, build_args: Mapping[str, str]) -> None:
    """A plain `buildah bud` of `context` (e.g. the add-on's Dockerfile on top of the image)."""
    assert BUILDAH is not None
    args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
    with log.open("wb") as out:
        r = subprocess.run([BUILDAH, "bud", "--isolation", "chroot", "--format", "docker",
                            "--layers", *args, "-t", tag, str(context)], stdout=out,
                           stderr=subprocess.STDOUT, check=False)
    if r.returncode != 0:
        raise AssertionError(f"buildah bud {context} failed:\n{tail(log, 40)}")


def image_size(tag: str) -> int:
    """The image's size in bytes, as buildah reports it."""
    assert BUILDAH is not None
    r = subprocess.run([BUILDAH, "images", "--json", tag], capture_output=True, text=True,
                       check=True)
    size = json.loads(r.stdout)[0]["size"]
    if isinstance(size, int):
        return size
    # buildah 1.28 gives it in decimal units (go-units HumanSize), e.g. "489 MB".
    number, unit = str(size).split()
    scale = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]
    return int(float(number) * scale)


def inspect(tag: str) -> dict[str, Any]:
    """`buildah inspect` of an image."""
    assert BUILDAH is not None
    r = subprocess.run([BUILDAH, "inspect", "--type", "image", tag], capture_output=True,
                       text=True, check=True)
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def tail(path: Path, n: int = 30) -> str:
    """The last `n` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _session_pids(sid: int) -> list[int]:
    """Processes whose session is `sid` (field 6 of /proc/PID/stat)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; it ends at the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid:
            pids.append(int(d.name))
    return pids


def _comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class Running:
    """One `buildah run` in progress."""

    proc: subprocess.Popen[Any]
    log: Path

    def wait(self, timeout: float) -> int:
        """Wait for the run to end by itself; its exit code."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._kill_leftovers()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the image's init (a clean daemon shutdown), then its exit code."""
        if self.proc.poll() is None:
            for pid in _session_pids(self.proc.pid):
                if _comm(pid) == "tini":
                    os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_leftovers()
        return self.proc.poll()

    def _kill_leftovers(self) -> None:
        for pid in _session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)

    def output(self) -> str:
        """Everything the run printed so far."""
        return tail(self.log, 10_000)


@dataclass
class Container:
    """A buildah working container made from an image; removed by `remove()`."""

    image: str
    name: str = field(default_factory=lambda: f"voice-agent-test-{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        assert BUILDAH is not None
        subprocess.run([BUILDAH, "from", "--name", self.name, self.image], check=True,
                       capture_output=True)

    def _argv(self, argv: list[str], env: Mapping[str, str],
              volumes: Iterable[str]) -> list[str]:
        assert BUILDAH is not None
        cmd = [BUILDAH, "run", "--isolation", "chroot"]
        for v in volumes:
            cmd += ["-v", v]
        for k, val in env.items():
            cmd += ["-e", f"{k}={val}"]
        return [*cmd, self.name, "--", *argv]

    def start(self, argv: list[str], log: Path, env: Mapping[str, str] | None = None,
              volumes: Iterable[str] = ()) -> Running:
        """Start `argv` inside (in a session of its own, see the module docstring)."""
        out = log.open("wb")
        try:
            proc = subprocess.Popen(self._argv(argv, env or {}, volumes), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            out.close()
        return Running(proc, log)

    def run(self, argv: list[str], env: Mapping[str, str] | None = None,
            volumes: Iterable[str] = (), timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside to completion (what is left of it is killed after `timeout`)."""
        proc = subprocess.Popen(self._argv(argv, env or {}, volumes), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            Running(proc, Path("/dev/null")).stop(timeout=5)
            raise
        finally:
            Running(proc, Path("/dev/null"))._kill_leftovers()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def remove(self) -> None:
        """Delete the working container (the image stays)."""
        assert BUILDAH is not None
        subprocess.run([BUILDAH, "rm", self.name], capture_output=True, check=False)


def get_json(url: str, timeout: float = 5.0,
             headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """GET -> (status, parsed JSON body); HTTP errors come back as their status."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "null")


def wait_health(port: int, running: Running, within: float = 60.0,
                statuses: tuple[str, ...] = ("ok", "degraded")) -> tuple[float, Any]:
    """Poll /api/health until its status is one of `statuses` (default: serving, with or
    without a microphone): (seconds from now, that body)."""
    t0 = time.monotonic()
    body: Any = None
    while time.monotonic() - t0 < within:
        if running.proc.poll() is not None:
            raise AssertionError(f"container exited ({running.proc.returncode}) before "
                                 f"health was {statuses}:\n{running.output()[-3000:]}")
        try:
            status, body = get_json(f"http://127.0.0.1:{port}/api/health", timeout=2)
            if status == 200 and body.get("status") in statuses:
                return time.monotonic() - t0, body
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"/api/health not {statuses} after {within} s (last: {body}):\n"
                         f"{running.output()[-3000:]}")


def post_file(url: str, path: Path, headers: Mapping[str, str] | None = None,
              timeout: float = 60.0) -> tuple[int, Any]:
    """POST one file as multipart/form-data (part `file`) -> (status, JSON body)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{path.name}\"\r\nContent-Type: audio/wav\r\n\r\n").encode()
    body += path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        **(headers or {}), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "null")
