"""Shared fixtures (paths into ../shared, a joined multi-utterance recording) and CI rules.

`VOICE_AGENT_SHARED` points the tests at another copy of the shared data (or at nothing, to
see what CI does without it). When `CI` is set, a skipped test is a failure unless its node
id matches a line of `tests/skip_allowlist.txt`: what is not run must be on that list.
"""

from __future__ import annotations

import csv
import fnmatch
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import soundfile as sf

from .joined import Span, join_clips
from .pulse import PulseServer, missing_requirements, pulse_server

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VOICE_AGENT_SHARED") or REPO.parent / "shared")
ASR_EN = SHARED / "data" / "asr-en"
GAP_S = 1.5
ALLOWLIST = Path(os.environ.get("VOICE_AGENT_SKIP_ALLOWLIST")
                 or Path(__file__).with_name("skip_allowlist.txt"))


@pytest.fixture(scope="session", autouse=True)
def _private_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Give the suite (and every daemon it starts) a HOME of its own: the default state_dir
    (~/.local/state/voice-agent: voiceprints, outbox) must never be the user's."""
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))
    yield
    if old is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = old


def in_ci() -> bool:
    """Whether this run is CI (`.ci/run` sets CI=true): skips count as failures there."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def asr_en_rows() -> list[dict[str, str]]:
    """`transcripts.tsv` rows: file, reference."""
    with (ASR_EN / "transcripts.tsv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def shared_missing() -> str | None:
    """Why the shared data cannot be used, or None."""
    if (ASR_EN / "transcripts.tsv").exists():
        return None
    return (f"shared test data not found at {SHARED} (clone the repo beside shared/, or set "
            "VOICE_AGENT_SHARED)")


def need_shared() -> None:
    """Skip with a reason when ../shared is not there (in CI that skip is a failure)."""
    if reason := shared_missing():
        pytest.skip(reason)


@dataclass(frozen=True)
class Joined:
    """The joined recording: its path, the speech spans, the room tone level."""

    path: Path
    spans: list[Span]
    tone_dbfs: float


@pytest.fixture(scope="session")
def joined(tmp_path_factory: pytest.TempPathFactory) -> Joined:
    """The ten asr-en clips joined with 1.5 s gaps over room tone, with labelled speech."""
    need_shared()
    paths = [ASR_EN / row["file"] for row in asr_en_rows()]
    audio, spans, tone = join_clips(paths, GAP_S)
    path = tmp_path_factory.mktemp("joined") / "joined.wav"
    sf.write(path, audio, 16000, subtype="PCM_16")
    return Joined(path, spans, tone)


@pytest.fixture(scope="session")
def joined_recording(joined: Joined) -> tuple[Path, list[tuple[float, float]]]:
    """(path, speech spans as (onset, offset) seconds) of the joined recording."""
    return joined.path, [(s.onset, s.offset) for s in joined.spans]


@pytest.fixture(scope="session")
def pulse() -> Iterator[PulseServer]:
    """One private PulseAudio for the whole session (PortAudio must see it before use)."""
    if reason := missing_requirements():
        pytest.skip(reason)
    with pulse_server(rate=48000) as srv:
        yield srv


# ---- Hypothesis (schemathesis): reproducible -------------------------------------------------

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # optional: only the API fuzz test uses it
    pass
else:
    # CI derives every example from the test itself (same examples every run: a failure
    # there is reproducible as is); elsewhere examples vary, and a failure prints the blob
    # to replay it (@reproduce_failure). HYPOTHESIS_PROFILE=ci picks CI's locally.
    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    _hypothesis_settings.register_profile("dev", print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                                      or ("ci" if in_ci() else "dev"))


# ---- CI: a skip is a failure unless allow-listed ---------------------------------------------


def _allowlist() -> list[str]:
    if not ALLOWLIST.exists():
        return []
    out = []
    for line in ALLOWLIST.read_text(encoding="utf-8").splitlines():
        pattern = line.split("#", 1)[0].strip()
        if pattern:
            out.append(pattern)
    return out


def allowed_to_skip(nodeid: str) -> bool:
    """Whether `nodeid` (or a collection node) is on the allow-list, exactly or by pattern."""
    # Exact first: parametrized ids hold brackets, which fnmatch reads as character sets.
    return any(nodeid == p or fnmatch.fnmatchcase(nodeid, p) for p in _allowlist())


def _label(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _skip_reason(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped in CI, and not on {_label(ALLOWLIST)}: {reason}\n"
                       "(install what it needs, or add its node id to the allow-list with why)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    """In CI, turn a skip (not an xfail) into a failure unless the test is allow-listed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (in_ci() and report.skipped and not hasattr(report, "wasxfail")
            and not allowed_to_skip(item.nodeid)):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """In CI, a module skipped at import (importorskip) fails the same way."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if in_ci() and report.skipped and not allowed_to_skip(collector.nodeid):
        _fail_skip(report)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say where the shared data is and whether skips fail."""
    lines = [f"shared data: {SHARED}" + (f" (MISSING: {r})" if (r := shared_missing()) else "")]
    if in_ci():
        lines.append(f"CI: skips fail unless on {_label(ALLOWLIST)}")
    return lines
