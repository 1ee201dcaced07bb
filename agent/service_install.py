"""`voice-agent service install [--user] [--dry-run]`: write the systemd unit and its paths.

System mode writes `/etc/systemd/system/voice-agent.service` (hardened, `User=voice-agent`),
creates that system user (in group `audio`) and `/etc/voice-agent/` with a config and an
empty secrets file, then runs `systemctl daemon-reload`. User mode writes
`~/.config/systemd/user/voice-agent.service` for a desktop session's PulseAudio/PipeWire
and runs `systemctl --user daemon-reload`. Every step is printed; `--dry-run` prints the plan
and the unit without doing anything, and `--root DIR` writes every file under DIR and runs
no command (for tests and image builds).

The unit text comes from the templates here, so an installed wheel (which has no `systemd/`
folder) writes the same unit; `systemd/*.service` in the repository are these templates
rendered with the `/opt/voice-agent` defaults (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SERVICE = "voice-agent"
UNIT_NAME = f"{SERVICE}.service"
# Paths a system unit cannot see under ProtectHome=yes.
HOME_PREFIXES = (Path("/home"), Path("/root"), Path("/run/user"))
ENV_TEMPLATE = """\
# Secrets for voice-agent, one VAR=value a line (read by systemd: EnvironmentFile=).
# Keep this file mode 0600. Any config key can be set here as VOICE_AGENT__SECTION__KEY.
# VOICE_AGENT__MQTT__PASSWORD=
# VOICE_AGENT__API__KEY=
# VOICE_AGENT__DASHSCOPE__API_KEY=
"""
MINIMAL_CONFIG = """\
# voice-agent configuration. Every key is optional; agent.yaml in the source lists them all.
# Check it with: voice-agent check-config {path}
"""


SYSTEM_TEMPLATE = """\
# voice-agent system service. Written by `voice-agent service install`; see README
# ("Running under systemd"). Secrets go in {env_file} (mode 0600).
[Unit]
Description=voice-agent: edge voice daemon (push-to-talk, local speech models, MQTT/HTTP)
Documentation={docs}
After=network-online.target sound.target
Wants=network-online.target

[Service]
# READY=1 once the models are loaded and the sockets bound; WATCHDOG=1 while the audio
# loop runs (a stalled loop is restarted); STOPPING=1 on SIGTERM.
Type=notify
NotifyAccess=main
WatchdogSec=10
# Model loading (a TensorRT engine build far more) can take a while on a small board.
TimeoutStartSec=180
# SIGTERM: finish the utterance, flush the MQTT outbox, publish offline, exit 0.
TimeoutStopSec=30
KillMode=mixed
# SIGHUP re-reads the config; a bad one is rejected and the old one stays.
ExecReload=/bin/kill -HUP $MAINPID
ExecStart={exec_start}
Restart=on-failure
RestartSec=3
# Exit 2 is a bad config: restarting would fail the same way forever.
RestartPreventExitStatus=2
User={user}
Group={user}
SupplementaryGroups=audio
EnvironmentFile=-{env_file}
Environment=VOICE_AGENT__STATE_DIR=/var/lib/voice-agent
Environment=VOICE_AGENT_MODELS_DIR={models_dir}
StateDirectory=voice-agent
StateDirectoryMode=0750
RuntimeDirectory=voice-agent
RuntimeDirectoryMode=0750
WorkingDirectory=/var/lib/voice-agent
UMask=0027

# Hardening (systemd-analyze security: about 1.5 from 8.6). Everything is read-only but
# the state directory; models are only read (`models install` runs as an admin).
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
PrivateMounts=yes
ReadWritePaths=/var/lib/voice-agent
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
# Sound cards only (PrivateDevices= would hide /dev/snd).
DevicePolicy=closed
DeviceAllow=char-alsa rw
{gpu_devices}CapabilityBoundingSet=
AmbientCapabilities=
# AF_NETLINK: glibc's getaddrinfo and getifaddrs ask the kernel for interfaces through it.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# {mdwe_comment}
MemoryDenyWriteExecute={mdwe}
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""

USER_TEMPLATE = """\
# voice-agent user service for a desktop session (PulseAudio/PipeWire). Written by
# `voice-agent service install --user`; enable with systemctl --user enable --now voice-agent.
[Unit]
Description=voice-agent: edge voice daemon (user session)
Documentation={docs}
# The microphone is the session's sound server; start after it when it is socket-less.
After=pipewire-pulse.service pulseaudio.service

[Service]
Type=notify
NotifyAccess=main
WatchdogSec=10
TimeoutStartSec=180
TimeoutStopSec=30
KillMode=mixed
ExecReload=/bin/kill -HUP $MAINPID
ExecStart={exec_start}
Restart=on-failure
RestartSec=3
RestartPreventExitStatus=2
EnvironmentFile=-{env_file}
Environment=VOICE_AGENT__STATE_DIR=%S/voice-agent
Environment=VOICE_AGENT_MODELS_DIR={models_dir}
# %S and %t are ~/.local/state and $XDG_RUNTIME_DIR in a user manager.
StateDirectory=voice-agent
RuntimeDirectory=voice-agent
UMask=0077
# A user manager cannot set up mount namespaces without user namespaces, which can cut the
# session's sound server off; these filters need no privileges.
NoNewPrivileges=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# {mdwe_comment}
MemoryDenyWriteExecute={mdwe}
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=default.target
"""

# Device groups of /proc/devices that CUDA needs on a PC (nvidia-frontend, nvidia-uvm, ...)
# and on a Jetson (nvhost-*, nvmap, nvgpu): not verified on hardware here.
GPU_DEVICES = """\
# GPU (runtime.provider cuda/tensorrt).
DeviceAllow=char-nvidia* rw
DeviceAllow=char-nvhost* rw
DeviceAllow=char-nvgpu* rw
DeviceAllow=/dev/nvmap rw
"""
# Measured in tests/test_systemd_sandbox.py: onnxruntime and sherpa-onnx run under W^X, the
# microphone does not (sounddevice's PortAudio callback is a cffi ABI-mode callback, which
# needs writable+executable memory).
MDWE_ON = "W^X: fine for stdin/file sources, onnxruntime and sherpa-onnx on CPU (measured)"
MDWE_OFF = ("off: the microphone's PortAudio callback (cffi) needs writable+executable\n"
            "# memory; without a mic use yes (service install --deny-write-execute)")
MDWE_GPU = "off: the CUDA driver JIT-compiles kernels into writable+executable memory"


@dataclass(frozen=True)
class UnitPaths:
    """What a rendered unit points at."""

    exe: Path
    config: Path
    models_dir: Path
    env_file: Path
    user: str | None = SERVICE
    gpu: bool = False
    protect_home: str = "yes"
    deny_wx: bool = False  # MemoryDenyWriteExecute=yes (no microphone, no GPU)
    readme: Path | None = None  # Documentation=; the README of the checkout installed from


def _quote(arg: str, specifiers: bool = False) -> str:
    """One ExecStart= word, quoted when systemd would split or expand it (`%` specifiers are
    kept when `specifiers` is set)."""
    special = ' \t"\'\\$;' + ("" if specifiers else "%")
    if arg and not any(c in arg for c in special):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
    return f'"{escaped if specifiers else escaped.replace("%", "%%")}"'


def render_unit(template: str, paths: UnitPaths, specifiers: bool = False) -> str:
    """The unit text for `paths` (`specifiers`: paths may use systemd's `%E`, `%h`...)."""
    exec_start = " ".join(_quote(a, specifiers)
                          for a in (str(paths.exe), "run", "-c", str(paths.config)))
    readme = paths.readme or Path("/opt/voice-agent/README.md")
    return template.format(
        exec_start=exec_start, docs=f"file://{readme}", env_file=paths.env_file,
        models_dir=paths.models_dir,
        user=paths.user or "", protect_home=paths.protect_home,
        gpu_devices=GPU_DEVICES if paths.gpu else "",
        mdwe="yes" if paths.deny_wx and not paths.gpu else "no",
        mdwe_comment=MDWE_GPU if paths.gpu else MDWE_ON if paths.deny_wx else MDWE_OFF)


def default_unit(user_mode: bool = False, deny_wx: bool = False) -> str:
    """The unit for the README's layout: a checkout in /opt/voice-agent with its .venv
    (`systemd/voice-agent.service`, `systemd/voice-agent-user.service`)."""
    opt = Path("/opt/voice-agent")
    if user_mode:
        return render_unit(USER_TEMPLATE, UnitPaths(
            exe=opt / ".venv/bin/voice-agent", config=Path("%E/voice-agent/agent.yaml"),
            models_dir=opt / "models_onnx", env_file=Path("%E/voice-agent/env"), user=None,
            deny_wx=deny_wx), specifiers=True)
    return render_unit(SYSTEM_TEMPLATE, UnitPaths(
        exe=opt / ".venv/bin/voice-agent", config=Path("/etc/voice-agent/agent.yaml"),
        models_dir=opt / "models_onnx", env_file=Path("/etc/voice-agent/env"),
        deny_wx=deny_wx))


@dataclass
class Step:
    """One thing the installer does: a file, a directory or a command."""

    what: str  # "write", "mkdir", "keep", "run", "skip"
    target: str
    detail: str = ""
    content: str | None = None
    mode: int | None = None
    argv: list[str] | None = None

    def line(self) -> str:
        """How the step is printed."""
        mode = f" (mode {self.mode:04o})" if self.mode is not None else ""
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.what:6s} {self.target}{mode}{extra}"


@dataclass
class Plan:
    """Everything `install` will do, in order, and the unit it writes."""

    user_mode: bool
    root: Path | None
    paths: UnitPaths
    unit_path: Path
    unit_text: str
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _under(path: Path, prefixes: tuple[Path, ...]) -> bool:
    return any(path == p or p in path.parents for p in prefixes)


def _real(root: Path | None, path: Path) -> Path:
    """`path` on the machine we write to: under `root` when one is given."""
    return path if root is None else root / path.relative_to(path.anchor)


def default_exe() -> Path:
    """The `voice-agent` script of the running interpreter's environment (the venv)."""
    exe = Path(sys.executable).parent / "voice-agent"
    if exe.exists():
        return exe
    found = shutil.which("voice-agent")
    return Path(found) if found else exe


def default_models_dir() -> Path:
    """Where `voice-agent models install` put the models."""
    from agent import models

    return models.models_dir()


def _interpreter(exe: Path) -> list[Path]:
    """The Python a console script runs (its shebang), symlinks resolved."""
    try:
        with exe.open("rb") as f:
            first = f.readline(512)
    except OSError:
        return []
    if not first.startswith(b"#!"):
        return []
    words = first[2:].decode(errors="replace").split()
    return [Path(words[0]).resolve()] if words else []


def world_reachable(path: Path) -> bool:
    """Whether any user may reach `path` (every directory above it searchable by others)."""
    real = path.resolve()
    try:
        return all(p.stat().st_mode & 0o001 for p in real.parents) and bool(
            real.stat().st_mode & 0o004)
    except OSError:
        return False


def _checkout_readme() -> Path | None:
    """README.md of the checkout this package runs from, if it is one."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    return readme if readme.is_file() else None


def _config_text(config: Path) -> str:
    """The commented default config when running from a checkout, else a minimal one."""
    repo_default = Path(__file__).resolve().parents[1] / "agent.yaml"
    if repo_default.is_file():
        return repo_default.read_text(encoding="utf-8")
    return MINIMAL_CONFIG.format(path=config)


def _user_exists(name: str, root: Path | None) -> bool:
    if root is not None:
        passwd = root / "etc" / "passwd"
        return passwd.is_file() and any(
            line.split(":", 1)[0] == name for line in passwd.read_text().splitlines())
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _file_step(root: Path | None, path: Path, text: str, mode: int,
               keep_existing: bool) -> Step:
    real = _real(root, path)
    if real.exists():
        if keep_existing:
            return Step("keep", str(path), "exists, left as it is")
        if real.read_text(encoding="utf-8", errors="replace") == text:
            return Step("keep", str(path), "unchanged")
        return Step("write", str(path), "replaces the existing file", text, mode)
    return Step("write", str(path), "", text, mode)


def plan_install(*, user_mode: bool = False, root: Path | None = None,
                 exe: Path | None = None, config: Path | None = None,
                 models_dir: Path | None = None, service_user: str = SERVICE,
                 gpu: bool = False, deny_wx: bool = False, enable: bool = False) -> Plan:
    """Work out every step; nothing is touched."""
    exe = (exe or default_exe()).absolute()
    models = (models_dir or default_models_dir()).absolute()
    notes: list[str] = []
    if user_mode:
        home = Path.home()
        conf_dir = home / ".config" / SERVICE
        config = (config or conf_dir / "agent.yaml").absolute()
        paths = UnitPaths(exe=exe, config=config, models_dir=models,
                          env_file=conf_dir / "env", user=None, gpu=gpu, deny_wx=deny_wx,
                          readme=_checkout_readme())
        unit_path = home / ".config" / "systemd" / "user" / UNIT_NAME
        template = USER_TEMPLATE
    else:
        conf_dir = Path("/etc") / SERVICE
        config = (config or conf_dir / "agent.yaml").absolute()
        needed = [exe, config, models, *_interpreter(exe)]
        hidden = [p for p in needed if _under(p, HOME_PREFIXES)]
        if hidden:
            notes.append("ProtectHome=read-only instead of yes: the unit needs "
                         + ", ".join(map(str, hidden))
                         + " (install under /opt to hide home directories entirely)")
        closed = [p for p in needed if p.exists() and not world_reachable(p)]
        if closed:
            notes.append(f"user {service_user} may not be able to reach "
                         + ", ".join(map(str, closed))
                         + " (a directory above is closed to others, e.g. a pyenv Python in "
                           "/root): build the venv from a system Python under /opt")
        paths = UnitPaths(exe=exe, config=config, models_dir=models,
                          env_file=conf_dir / "env", user=service_user, gpu=gpu,
                          deny_wx=deny_wx,
                          protect_home="read-only" if hidden else "yes",
                          readme=_checkout_readme())
        unit_path = Path("/etc/systemd/system") / UNIT_NAME
        template = SYSTEM_TEMPLATE
    unit_text = render_unit(template, paths)
    plan = Plan(user_mode, root, paths, unit_path, unit_text, notes=notes)
    steps = plan.steps
    if not user_mode:
        if _user_exists(service_user, root):
            steps.append(Step("keep", f"user {service_user}", "exists"))
        else:
            steps.append(Step("run", f"user {service_user}", argv=[
                "useradd", "--system", "--user-group", "--groups", "audio",
                "--home-dir", f"/var/lib/{SERVICE}", "--no-create-home",
                "--shell", "/usr/sbin/nologin", service_user]))
    if not _real(root, conf_dir).is_dir():
        steps.append(Step("mkdir", str(conf_dir), mode=0o700 if user_mode else 0o755))
    steps.append(_file_step(root, config, _config_text(config), 0o644, keep_existing=True))
    steps.append(_file_step(root, paths.env_file, ENV_TEMPLATE, 0o600, keep_existing=True))
    if not _real(root, unit_path.parent).is_dir():
        steps.append(Step("mkdir", str(unit_path.parent), mode=0o755))
    steps.append(_file_step(root, unit_path, unit_text, 0o644, keep_existing=False))
    if not exe.exists():
        notes.append(f"{exe} does not exist yet: the unit will fail to start until it does")
    ctl = ["systemctl", "--user"] if user_mode else ["systemctl"]
    steps.append(Step("run", "daemon-reload", argv=[*ctl, "daemon-reload"]))
    if enable:
        steps.append(Step("run", "enable", argv=[*ctl, "enable", "--now", UNIT_NAME]))
    else:
        notes.append("start it with: " + shlex.join([*ctl, "enable", "--now", UNIT_NAME]))
    if not user_mode:
        notes.append(f"state in /var/lib/{SERVICE} and /run/{SERVICE} is created by systemd "
                     "(StateDirectory=, RuntimeDirectory=) owned by the service user")
    return plan


def _systemd_running() -> bool:
    """Whether this machine was booted with systemd (else systemctl cannot work)."""
    return Path("/run/systemd/system").is_dir()


def execute(plan: Plan, out: Callable[[str], None] = print,
            runner: Callable[[list[str]], int] | None = None) -> int:
    """Carry the plan out, printing each step; 0 when every step succeeded."""
    run = runner or (lambda argv: subprocess.run(argv, check=False).returncode)
    rc = 0
    for step in plan.steps:
        if step.what == "mkdir":
            real = _real(plan.root, Path(step.target))
            real.mkdir(parents=True, exist_ok=True)
            if step.mode is not None:
                real.chmod(step.mode)
        elif step.what == "write" and step.content is not None:
            real = _real(plan.root, Path(step.target))
            real.parent.mkdir(parents=True, exist_ok=True)
            tmp = real.with_name(f".{real.name}.tmp")
            # Create with the final mode: the secrets file must never be world-readable.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, step.mode or 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(step.content)
            os.chmod(tmp, step.mode or 0o644)
            os.replace(tmp, real)
        elif step.what == "run" and step.argv is not None:
            if plan.root is not None:
                out(f"skip   {shlex.join(step.argv)} (--root: no commands are run)")
                continue
            if step.argv[0] == "systemctl" and not _systemd_running():
                out(f"skip   {shlex.join(step.argv)} (systemd is not running here)")
                continue
            code = run(step.argv)
            if code != 0:
                out(f"FAILED {shlex.join(step.argv)} (exit {code})")
                rc = 1
                continue
            out(f"ran    {shlex.join(step.argv)}")
            continue
        out(step.line())
    for note in plan.notes:
        out(f"note   {note}")
    return rc


def print_plan(plan: Plan, out: Callable[[str], None] = print) -> None:
    """The dry run: each step, then the unit text."""
    mode = "user" if plan.user_mode else "system"
    out(f"voice-agent service install ({mode} mode, dry run: nothing is changed)")
    for step in plan.steps:
        if step.argv is not None:
            out(f"would run   {shlex.join(step.argv)}")
        else:
            out(f"would {step.line()}")
    for note in plan.notes:
        out(f"note   {note}")
    out(f"\n--- {plan.unit_path}")
    out(plan.unit_text.rstrip("\n"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`voice-agent service` options (the CLI adds the `service install` parser)."""
    p.add_argument("--user", action="store_true",
                   help="install a user service (desktop PulseAudio/PipeWire session)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the unit only")
    p.add_argument("--root", type=Path, help="write every file under DIR, run no command")
    p.add_argument("--exe", type=Path, help="the voice-agent executable (default: this venv's)")
    p.add_argument("--config", type=Path,
                   help="config path (default /etc/voice-agent/agent.yaml, "
                        "or ~/.config/voice-agent/agent.yaml with --user)")
    p.add_argument("--models-dir", type=Path, help="installed models (default: models dir)")
    p.add_argument("--service-user", default=SERVICE, help="system user (default voice-agent)")
    p.add_argument("--gpu", action="store_true",
                   help="allow NVIDIA GPU devices (runtime.provider cuda/tensorrt)")
    p.add_argument("--deny-write-execute", action="store_true",
                   help="MemoryDenyWriteExecute=yes: only for stdin/file sources (the "
                        "microphone's callbacks need writable+executable memory)")
    p.add_argument("--enable", action="store_true", help="also run systemctl enable --now")


def run(args: argparse.Namespace) -> int:
    """Plan and install (or print the plan with --dry-run); 0 ok, 1 a step failed."""
    if not args.user and not args.dry_run and args.root is None and os.geteuid() != 0:
        print("error: system install needs root (sudo), or use --user, --dry-run or --root",
              file=sys.stderr)
        return 1
    plan = plan_install(user_mode=args.user, root=args.root, exe=args.exe, config=args.config,
                        models_dir=args.models_dir, service_user=args.service_user,
                        gpu=args.gpu, deny_wx=args.deny_write_execute, enable=args.enable)
    if args.dry_run:
        print_plan(plan)
        return 0
    return execute(plan)


def main(argv: list[str] | None = None) -> int:
    """`python -m agent.service_install [options]` until the CLI has `service install`."""
    p = argparse.ArgumentParser(prog="voice-agent service install", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
