"""Models: the manifest, installed-model lookups (the daemon's part), fetching and installing.

The running daemon needs only `path` / `model_files` (the store); installing pulls in
downloads and conversions, so those names are imported on first use.
"""

from __future__ import annotations

from typing import Any

from agent.models.manifest import (
    CHECKOUT_MODELS_DIR,
    ENV_MANIFEST,
    ENV_MODELS_DIR,
    INSTALLED_JSON,
    Manifest,
    ModelEntry,
    load_manifest,
    manifest_path,
    models_dir,
)
from agent.models.store import (
    ModelStatus,
    VerifyReport,
    install_command,
    list_models,
    model_files,
    path,
    sha256_file,
    verify,
)

__all__ = [
    "CHECKOUT_MODELS_DIR", "ENV_MANIFEST", "ENV_MODELS_DIR", "ENV_PIP_ARGS", "INSTALLED_JSON",
    "InstallResult", "Manifest", "ModelEntry", "ModelStatus", "VerifyReport",
    "add_models_arguments", "default_ids", "install", "install_command", "list_models",
    "load_manifest", "manifest_path", "model_files", "models_dir", "path", "run_cli",
    "sha256_file", "verify",
]

_LAZY = {
    "install": "agent.models.installer", "default_ids": "agent.models.installer",
    "InstallResult": "agent.models.installer", "conversion_python": "agent.models.installer",
    "ENV_PIP_ARGS": "agent.models.fetch",
    "add_models_arguments": "agent.models.cli", "run_cli": "agent.models.cli",
}


def __getattr__(name: str) -> Any:
    """Installer and CLI names, imported when first used (never by the running daemon)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agent.models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
