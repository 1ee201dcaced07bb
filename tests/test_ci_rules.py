"""The CI rules in tests/conftest.py, run as CI runs them: skips fail unless allow-listed.

Each case runs pytest in a subprocess on a small generated test file, with tests/conftest.py
loaded as a plugin, so the rules are exercised exactly as in `.ci/run` (CI=true).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

PROBE = '''
import pytest

pytest.importorskip("no_such_module_for_ci_rules")
'''

CASES = '''
import pytest

def test_runs():
    assert True

def test_skips():
    pytest.skip("needs a thing CI lacks")

def test_allowed():
    pytest.skip("needs a GPU")

@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
    assert False
'''


def run(tmp: Path, files: dict[str, str], ci: bool, allow: str = "") -> tuple[int, str]:
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "allow.txt").write_text(allow)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({"VOICE_AGENT_SKIP_ALLOWLIST": str(tmp / "allow.txt"), "PYTHONPATH": str(REPO)})
    if ci:
        env["CI"] = "true"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p",
                        "no:randomly", "-p", "no:cacheprovider", "-q", "-rA", "--rootdir",
                        str(tmp), *files], cwd=tmp, env=env, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout + p.stderr


def test_outside_ci_a_skip_is_a_skip(tmp_path: Path) -> None:
    rc, out = run(tmp_path, {"test_cases.py": CASES}, ci=False)
    assert rc == 0, out
    assert "1 passed, 2 skipped, 1 xfailed" in out


def test_in_ci_a_skip_fails_unless_allow_listed(tmp_path: Path) -> None:
    allow = "# why: GPU\ntest_cases.py::test_allowed  # needs a GPU\n"
    rc, out = run(tmp_path, {"test_cases.py": CASES}, ci=True, allow=allow)
    assert rc == 1, out
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in out, out
    assert "FAILED test_cases.py::test_skips - skipped in CI, and not on" in out
    assert "needs a thing CI lacks" in out


def test_in_ci_a_module_skipped_at_import_fails(tmp_path: Path) -> None:
    rc, out = run(tmp_path, {"test_probe.py": PROBE}, ci=True)
    assert rc != 0, out
    assert "skipped in CI" in out and "no_such_module_for_ci_rules" in out
    files = {"test_probe.py": PROBE, "test_ok.py": "def test_ok():\n    pass\n"}
    rc, out = run(tmp_path, files, ci=True, allow="test_probe.py  # optional module\n")
    assert rc == 0 and "1 passed, 1 skipped" in out, out


def test_in_ci_missing_shared_data_fails_loudly() -> None:
    env = {**os.environ, "CI": "true", "VOICE_AGENT_SHARED": "/nonexistent/shared"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly", "-p",
                        "no:cacheprovider", "tests/test_pipeline.py::test_stdin_source"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "shared data: /nonexistent/shared (MISSING" in out
    assert "skipped in CI, and not on tests/skip_allowlist.txt: shared test data not found " \
        "at /nonexistent/shared" in out
