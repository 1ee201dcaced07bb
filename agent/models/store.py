"""Installed models: where they are, whether they are intact (the only part the daemon uses)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from agent.errors import ModelError
from agent.models.manifest import (
    INSTALLED_JSON,
    ManifestLike,
    ModelEntry,
    _manifest,
)
from agent.models.manifest import models_dir as _models_dir

_CHUNK = 1 << 20


def install_command(model_id: str, directory: str | os.PathLike[str] | None = None) -> str:
    """The shell command that installs `model_id` into `directory`."""
    cmd = f"voice-agent models install {shlex.quote(model_id)}"
    if directory is not None and Path(directory).resolve() != _models_dir().resolve():
        cmd += f" --models-dir {shlex.quote(str(directory))}"
    return cmd


State = Literal["not_installed", "installed", "verified", "corrupt"]


@dataclass
class VerifyReport:
    """Outcome of checking one installed model."""

    id: str
    directory: Path
    state: State
    problems: list[str] = field(default_factory=list)
    installed_size: int | None = None

    @property
    def ok(self) -> bool:
        """True when the model is installed and every check passed."""
        return self.state in ("installed", "verified") and not self.problems


@dataclass
class ModelStatus:
    """One row of `list_models`."""

    entry: ModelEntry
    report: VerifyReport

    @property
    def id(self) -> str:
        """The model id."""
        return self.entry.id

    @property
    def state(self) -> State:
        """not_installed, installed (quick check), verified (hashes checked) or corrupt."""
        return self.report.state


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"sha256 {path.name}",
        disable=not progress or size < 32 * _CHUNK, leave=False,
    ) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _read_record(target: Path) -> dict[str, Any]:
    data = json.loads((target / INSTALLED_JSON).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError("no files table")
    return data


def _check(entry: ModelEntry, root: Path, full: bool, progress: bool = False) -> VerifyReport:
    """Quick check (files present with recorded sizes) or full check (sha256 too)."""
    target = root / entry.id
    if not (target / INSTALLED_JSON).is_file():
        if target.exists():
            return VerifyReport(entry.id, target, "corrupt", [
                f"{target} has no {INSTALLED_JSON}: not a finished install by voice-agent"
            ])
        return VerifyReport(entry.id, target, "not_installed")
    try:
        record = _read_record(target)
    except (OSError, ValueError) as e:
        return VerifyReport(entry.id, target, "corrupt", [f"{INSTALLED_JSON} unreadable: {e}"])
    problems: list[str] = []
    files: dict[str, Any] = record["files"]
    total = 0
    for role, spec in entry.files.items():
        rec = files.get(role)
        if not isinstance(rec, dict) or not {"name", "size", "sha256"} <= set(rec):
            problems.append(f"{role}: not recorded in {INSTALLED_JSON} (the manifest changed "
                            "since install; reinstall with --force)")
            continue
        if rec["name"] != spec.name:
            problems.append(f"{role}: installed as {rec['name']}, the manifest now says "
                            f"{spec.name} (reinstall with --force)")
        p = target / str(rec["name"])
        if not p.is_file():
            problems.append(f"{role}: {p.name} is missing")
            continue
        size = p.stat().st_size
        total += size
        if size != rec["size"]:
            problems.append(f"{role}: {p.name} has {size} bytes, {rec['size']} were installed "
                            "(truncated or modified)")
            continue
        if spec.size is not None and size != spec.size:
            problems.append(f"{role}: {p.name} has {size} bytes, the manifest pins {spec.size}")
        if not full:
            continue
        digest = sha256_file(p, progress)
        if digest != rec["sha256"]:
            problems.append(f"{role}: {p.name} is corrupt: sha256 {digest} != {rec['sha256']} "
                            "recorded at install")
        elif spec.sha256 is not None and digest != spec.sha256:
            problems.append(f"{role}: {p.name} sha256 {digest} != {spec.sha256} pinned in the "
                            "manifest")
    if full:
        recorded = {d.get("sha256") for d in record.get("downloads", []) if isinstance(d, dict)}
        for d in entry.downloads():
            if d.sha256 is not None and d.sha256 not in recorded:
                problems.append(f"installed from a different {d.label} than the manifest pins "
                                f"now (sha256 {d.sha256}); reinstall with --force")
    if problems:
        return VerifyReport(entry.id, target, "corrupt", problems, total)
    return VerifyReport(entry.id, target, "verified" if full else "installed", [], total)


def verify(
    model_id: str,
    *,
    models_dir: str | os.PathLike[str] | None = None,
    manifest: ManifestLike = None,
    progress: bool = False,
) -> VerifyReport:
    """Recompute the sha256 of every installed file and compare it with installed.json and
    with the manifest pins. Never raises for a broken install: see `report.problems`."""
    entry = _manifest(manifest).get(model_id)
    return _check(entry, _models_dir(models_dir), full=True, progress=progress)


def list_models(
    *,
    models_dir: str | os.PathLike[str] | None = None,
    manifest: ManifestLike = None,
    verify_hashes: bool = False,
) -> list[ModelStatus]:
    """Every manifest entry with its install state (hashes checked when `verify_hashes`)."""
    man = _manifest(manifest)
    root = _models_dir(models_dir)
    return [ModelStatus(e, _check(e, root, full=verify_hashes)) for e in man.models]


def path(
    model_id: str,
    *,
    models_dir: str | os.PathLike[str] | None = None,
    manifest: ManifestLike = None,
) -> Path:
    """The installed directory of `model_id` (cheap check: files present, sizes as installed).

    Raises ModelError `not_installed` (with the command that installs it) or `corrupt`."""
    entry = _manifest(manifest).get(model_id)
    root = _models_dir(models_dir)
    report = _check(entry, root, full=False)
    if report.state == "not_installed":
        raise ModelError(
            "not_installed",
            f"model {model_id} is not installed (looked in {report.directory}); install it "
            f"with: {install_command(model_id, root)}",
        )
    if not report.ok:
        raise ModelError(
            "corrupt",
            f"model {model_id} in {report.directory} is broken: {'; '.join(report.problems)}; "
            f"reinstall it with: {install_command(model_id, root)} --force",
        )
    return report.directory


def model_files(
    model_id: str,
    *,
    models_dir: str | os.PathLike[str] | None = None,
    manifest: ManifestLike = None,
) -> dict[str, Path]:
    """Installed file role -> absolute path (e.g. {"encoder": ..., "decoder": ..., ...})."""
    man = _manifest(manifest)
    directory = path(model_id, models_dir=models_dir, manifest=man)
    return {role: directory / spec.name for role, spec in man.get(model_id).files.items()}
