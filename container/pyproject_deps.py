"""Print a pyproject.toml's runtime dependencies, one per line (a requirements file).

The Containerfile installs these in a layer of their own, before the source is copied in, so
that a change to the code reuses the cached dependency layer and only the (small) package
itself is reinstalled. Standard library only: it runs on the image's bare python3.
"""

from __future__ import annotations

import argparse
import sys
import tomllib


def dependencies(pyproject: str, extras: list[str]) -> list[str]:
    """`[project] dependencies` plus the named optional-dependency groups."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    deps = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"{pyproject}: no optional-dependencies group {extra!r}")
        deps += optional[extra]
    return deps


def main(argv: list[str] | None = None) -> int:
    """Write the requirements to stdout."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject")
    p.add_argument("--extra", action="append", default=[], help="optional group to add")
    args = p.parse_args(argv)
    sys.stdout.write("".join(f"{d}\n" for d in dependencies(args.pyproject, args.extra)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
