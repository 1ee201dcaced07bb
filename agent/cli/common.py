"""What the subcommands share: config loading, in-process apps, the per-file loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Config, check_model_ids, load_config
from agent.errors import AgentError, ConfigError

if TYPE_CHECKING:
    from agent.app.core import App

EXIT_CONFIG = 2
ANALYSERS = ("asr", "emotion", "speaker")


def config_or_exit(path: str | None) -> Config:
    """The config, or every problem printed and exit 2."""
    try:
        cfg = load_config(path)
        known = _manifest_ids()
        if known is not None:
            check_model_ids(cfg, known)
        return cfg
    except ConfigError as e:
        where = getattr(e, "source", "") or path or "embedded defaults"
        print(f"config error ({where}):", file=sys.stderr)
        for line in e.message.splitlines():
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _manifest_ids() -> list[str] | None:
    """The manifest's model ids (None when it cannot be read: then ids are not checked)."""
    from agent.errors import ModelError
    from agent.models import load_manifest

    try:
        return load_manifest().ids
    except ModelError:
        return None


def only(cfg: Config, *keep: str, **updates: Any) -> Config:
    """`cfg` with every analyser but `keep` off (an offline command loads what it needs)."""
    off = {name: getattr(cfg, name).model_copy(update={"enabled": name in keep})
           for name in ANALYSERS}
    return cfg.model_copy(update={**off, "log_level": "warning", **updates})


@contextlib.asynccontextmanager
async def offline_app(cfg: Config, load: bool = True) -> AsyncIterator[App]:
    """An App in this process (no daemon): commands run through its registry."""
    from agent.app.capabilities import create_app

    app = create_app(cfg)
    if load:
        await app.load_analysers()
    try:
        yield app
    finally:
        await app.close()


async def each_file(app: App, command: str, files: list[str], as_json: bool,
                    line: Callable[[dict[str, Any]], str],
                    empty: Callable[[dict[str, Any]], str | None] = lambda r: None) -> int:
    """Run `command` on each file (as an upload); print a line (or JSON) per file.

    `empty(result)` may say why a successful result is a failure (e.g. no speech). Returns
    1 when any file failed.
    """
    from agent.app.commands import CallContext

    rc = 0
    for path in files:
        out: dict[str, Any] = {"file": path}
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
            result = await app.commands.dispatch(
                command, {}, CallContext(surface="cli", attachment=data))
        except OSError as e:
            out.update(ok=False, error=f"cannot read: {e.strerror or e}")
        except AgentError as e:
            out.update(ok=False, error=f"{e.stage}/{e.code}: {e.message}")
        else:
            out.update(ok=True, **result.model_dump(mode="json"))
            why = empty(out)
            if why:
                out.update(ok=False, error=why)
        rc |= 0 if out["ok"] else 1
        if as_json:
            print(json.dumps(out, ensure_ascii=False), flush=True)
        elif out["ok"]:
            prefix = f"{path}: " if len(files) > 1 else ""
            print(prefix + line(out), flush=True)
        else:
            print(f"error: {path}: {out['error']}", file=sys.stderr)
    return rc


def need(app: App, name: str, what: str) -> bool:
    """Whether analyser `name` loaded; else say why (its load problem) on stderr."""
    if name in app.analysers:
        return True
    why = "; ".join(app.problems.values()) or f"{name}.enabled is false"
    print(f"error: no {what}: {why}", file=sys.stderr)
    return False
