"""`voice-agent models list|install|verify|path` (wired in agent/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.errors import ModelError
from agent.models.installer import install
from agent.models.manifest import ENV_MANIFEST, ENV_MODELS_DIR, Manifest, load_manifest
from agent.models.manifest import models_dir as _models_dir
from agent.models.store import install_command, list_models, path, verify

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
                       help="the default set (what the default config uses)")
    ins.add_argument("--force", action="store_true", help="reinstall even if installed")
    ins.add_argument("--allow-unpinned", action="store_true",
                     help="install downloads without a sha256 in the manifest (prints it)")
    ins.add_argument("--quiet", action="store_true", help="no progress bars")
    ins.add_argument("--from", dest="source_dir", metavar="DIR",
                     help="take the source files (a download, or wheels) from DIR instead of "
                          "the network; they are checked against the manifest's sha256 all "
                          "the same")
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
                          allow_unpinned=args.allow_unpinned, progress=not args.quiet,
                          source_dir=args.source_dir)
        except ModelError as e:
            print(f"{i}: FAILED: {e}", file=sys.stderr)
            rc = EXIT_FAILURE
            continue
        if res.status == "already_installed":
            print(f"{i}: already installed ({res.directory})")
        else:
            print(f"{i}: installed in {res.seconds:.1f}s ({res.directory})")
    return rc
