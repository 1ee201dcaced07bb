"""Do the tests catch regressions? Hand-made broken copies, and mutmut on the pure modules.

Usage:
  python bench/mutants.py broken [--only NAME ...]    # each broken copy: caught or not
  python bench/mutants.py mutmut [--module NAME ...]  # mutation score per pure module
  python bench/mutants.py all
Options: --keep (leave the temporary copies), --out bench/results/mutants.json.

Everything runs in a temporary copy of the working tree (tracked and untracked, not ignored
files), never in the tree itself: `agent` is imported from the copy (PYTHONPATH), models and
../shared from where this checkout finds them. Not for every CI run: minutes of CPU.

`broken`: the copies the test review made by hand (issue 17). Each applies one textual change,
runs the tests meant to catch it (after checking they pass unchanged), and says whether they
failed. All must be caught.

`mutmut`: mutmut 3 mutates every function of one module and runs that module's tests against
each mutant. Survivors whose diff is in EQUIVALENT (no observable behaviour changes) are
excluded from the score; the rest count as not killed. Target: >= 80 % killed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402

PY = sys.executable
MUTMUT = str(Path(PY).with_name("mutmut"))
TARGET = 0.80


@dataclass(frozen=True)
class Broken:
    """One hand-made regression: replace `old` by `new` in `path`; `tests` must fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    timeout_s: float = 600.0


BROKEN = [
    Broken("zero-threshold VAD (webrtc: any non-zero sample is speech)", "agent/vad/webrtc.py",
           "return bool(self._vad.is_speech(frame.tobytes(), PIPELINE_RATE))",
           "return bool(frame.any())",
           ("tests/test_pipeline.py::test_vad_mode_finds_each_utterance[webrtc]",
            "tests/test_pipeline.py::test_the_recording_tells_a_real_vad_from_a_fake",
            "tests/test_pipeline.py::test_stdin_source")),
    Broken("zero-threshold VAD (silero: every probability is speech)", "agent/vad/silero.py",
           "if p >= self.threshold:", "if p >= 0.0:",
           ("tests/test_pipeline.py::test_vad_mode_finds_each_utterance[silero]",)),
    Broken("MQTT resend of unacknowledged messages removed", "agent/mqtt/service.py",
           "        self.outbox.rewind()\n", "",
           ("tests/test_mqtt.py::test_finals_in_flight_when_the_broker_dies_arrive_exactly_once",
            )),
    Broken("speculative final disabled (the final never reuses a partial)",
           "agent/asr/schedule.py", "if self.heard is not None and self.p.reuse:", "if False:",
           ("tests/test_stream_schedule.py", "tests/test_recognition_stream.py")),
    Broken("asr.final never says speculative", "agent/asr/analyser.py",
           "speculative=final.reused", "speculative=False",
           ("tests/test_recognition_stream.py::test_live_final_is_the_speculative_partial",)),
    Broken("kiosk without partials", "agent/web/app.js",
           '$("partial").textContent = text || "";', '$("partial").textContent = "";',
           ("tests/test_kiosk_browser.py",)),
    Broken("kiosk sends the browser's audio 1.25x too slow", "agent/web/app.js",
           "this.ratio = inRate / RATE;", "this.ratio = inRate / RATE * 1.25;",
           ("tests/test_kiosk_browser.py",)),
]


@dataclass(frozen=True)
class Module:
    """A pure module and the tests that own it."""

    name: str
    path: str
    tests: tuple[str, ...]
    select: str = ""  # a pytest -k expression, when the test files hold more than this


# The outbox's own tests: pure ones, no broker (a broker test per mutant would take hours).
_OUTBOX_TESTS = (*(f"tests/test_mqtt.py::test_outbox_{t}" for t in (
    "hands_out_in_order_and_forgets_only_acked", "drops_partials_first_finals_last_and_counts",
    "persists_across_restarts_and_skips_a_torn_line", "journal_stays_small")),
    "tests/test_outbox_journal.py", "tests/test_outbox_edges.py")
MODULES = [
    Module("segmenter", "agent/vad/segmenter.py", ("tests/test_segmenter.py",)),
    Module("gate", "agent/pipeline/gate.py", ("tests/test_gate.py",)),
    Module("schedule", "agent/asr/schedule.py", ("tests/test_stream_schedule.py",)),
    # Not the daemon-level journal test: mutmut's copy (mutants/) has no models or manifest.
    Module("outbox", "agent/mqtt/outbox.py", _OUTBOX_TESTS, "not daemon"),
    # The journal parser (read_journal and its record checks).
    Module("journal", "agent/mqtt/journal.py", _OUTBOX_TESTS, "not daemon"),
]

# Survivors that change nothing observable, by module: (function, removed line, added line),
# lines stripped. Each with why.
_TRUTHY = "only its truth value is ever read (False and None alike)"
_INT_DIV = "int() of a positive quotient truncates like // (frame lengths are exact: 10-32 ms)"
_OVERWRITTEN = "overwritten before it is first read (set when an utterance starts)"
_PAIRS = ("dead journal lines come in pairs (an add and its delete) and the compaction "
          "threshold is even: starting at 1 instead of 0 crosses it at the same pair")
_TMP = "the temporary file's name: written, then renamed over the journal"


def _utf8(func: str, line: str, mutants: tuple[str, ...]) -> dict[tuple[str, str, str], str]:
    why = ("UTF-8 either way on the supported systems: Debian in a UTF-8 locale, and Python "
           "coerces the C/POSIX locale to UTF-8 (PEP 538)")
    return {(func, line, m): why for m in mutants}


_FIRST_LINE = "first = self.seg_start // FRAME + (1 if self.seg_start % FRAME else 0)"
_FIRST = ("where the pause scan starts (a frame or two either side of the segment start, or "
          "from 0): a cut found there lies at the segment start, and segments are at least "
          "0.5 s (config: asr.segment_min_s >= 0.5), so no cut is made either way")
EQUIVALENT: dict[str, dict[tuple[str, str, str], str]] = {
    "segmenter": {
        ("Segmenter.__init__", "self.max_frames = max(2, int(p.max_utterance_ms // f))",
         "self.max_frames = max(2, int(p.max_utterance_ms / f))"): _INT_DIV,
        ("Segmenter.__init__", "self.pre_roll = int(p.pre_roll_ms // f)",
         "self.pre_roll = int(p.pre_roll_ms / f)"): _INT_DIV,
        ("Segmenter.__init__", "self.post_roll = min(int(p.post_roll_ms // f), self.min_silence)",
         "self.post_roll = min(int(p.post_roll_ms / f), self.min_silence)"): _INT_DIV,
        ("Segmenter.__init__", "self.in_utterance = False", "self.in_utterance = None"): _TRUTHY,
        ("Segmenter.open_at", "self.in_utterance = False", "self.in_utterance = None"): _TRUTHY,
        ("Segmenter._end", "self.in_utterance = False", "self.in_utterance = None"): _TRUTHY,
        ("Segmenter.__init__", "self.utt_start = 0", "self.utt_start = None"): _OVERWRITTEN,
        ("Segmenter.__init__", "self.utt_start = 0", "self.utt_start = 1"): _OVERWRITTEN,
        ("Segmenter.__init__", "self._silence_run = 0", "self._silence_run = None"): _OVERWRITTEN,
        ("Segmenter.__init__", "self._silence_run = 0", "self._silence_run = 1"): _OVERWRITTEN,
        ("Segmenter.feed", 'out += [SegmentEvent("speech_start", start),',
         'out = [SegmentEvent("speech_start", start),'): "`out` is still empty there",
        ("Segmenter.feed", 'out += self._end("silence")', 'out = self._end("silence")'):
            "`out` is still empty in that branch",
    },
    "gate": {},
    "schedule": {
        ("Scheduler._cut", "run = 0", "run = 1"):
            "the run before the first voiced frame is never read (voiced_before is False)",
        ("Scheduler.poll", "self.next_due = 0.0", "self.next_due = 1.0"):
            "both mean due at once: the stream's clock (time.monotonic) is far past 1.0",
        ("Scheduler._cut", "voiced_before = False", "voiced_before = None"): _TRUTHY,
        ("Scheduler._cut", "for i in range(first, len(self.speech)):",
         "for i in range(len(self.speech)):"): _FIRST,
        **{("Scheduler._cut", _FIRST_LINE, m): _FIRST for m in (
            "first = self.seg_start // FRAME - (1 if self.seg_start % FRAME else 0)",
            "first = self.seg_start // FRAME + (1 if (self.seg_start % FRAME) and False else 0)",
            "first = self.seg_start // FRAME + (1 if (self.seg_start % FRAME) or True else 0)",
            "first = self.seg_start // FRAME + (2 if self.seg_start % FRAME else 0)",
            "first = self.seg_start // FRAME + (1 if self.seg_start / FRAME else 0)",
            "first = self.seg_start // FRAME + (1 if self.seg_start % FRAME else 1)")},
    },
    "outbox": {
        ("Outbox.__init__",
         "self._dead = 0  # journal lines that no longer describe a live entry",
         "self._dead = 1  # journal lines that no longer describe a live entry"): _PAIRS,
        ("Outbox._rewrite", "self._dead = 0", "self._dead = 1"): _PAIRS,
        ("Outbox.__init__", "self._closed = False", "self._closed = None"): _TRUTHY,
        ("Outbox._add", "self._by_rank.setdefault(entry.rank, {})[entry.seq] = None",
         'self._by_rank.setdefault(entry.rank, {})[entry.seq] = ""'):
            "the values are never read: the dict is an ordered set",
        ("Outbox._tmp", 'return self.path.with_name(self.path.name + ".tmp")',
         'return self.path.with_name(self.path.name + "XX.tmpXX")'): _TMP,
        ("Outbox._tmp", 'return self.path.with_name(self.path.name + ".tmp")',
         'return self.path.with_name(self.path.name + ".TMP")'): _TMP,
        **_utf8("Outbox._reopen",
                'self._file = self.path.open("a", encoding="utf-8", buffering=1)',
                ('self._file = self.path.open("a", encoding=None, buffering=1)',
                 'self._file = self.path.open("a", buffering=1)',
                 'self._file = self.path.open("a", encoding="UTF-8", buffering=1)')),
        **_utf8("Outbox._compacted", 'with self._tmp().open("a", encoding="utf-8") as f:',
                ('with self._tmp().open("a", encoding=None) as f:',
                 'with self._tmp().open("a", ) as f:',
                 'with self._tmp().open("a", encoding="UTF-8") as f:')),
    },
    "journal": {
        **{("_parse_record", 'rec = jsonsafe.loads(line, max_bytes=MAX_LINE, max_depth=4, '
            'what="journal line")', m): "the error's message is dropped: only its code is read"
           for m in ('rec = jsonsafe.loads(line, max_bytes=MAX_LINE, max_depth=4, what=None)',
                     'rec = jsonsafe.loads(line, max_bytes=MAX_LINE, max_depth=4, )',
                     'rec = jsonsafe.loads(line, max_bytes=MAX_LINE, max_depth=4, '
                     'what="XXjournal lineXX")',
                     'rec = jsonsafe.loads(line, max_bytes=MAX_LINE, max_depth=4, '
                     'what="JOURNAL LINE")')},
        ("__lines", "overlong = False", "overlong = None"): _TRUTHY,
        ("__lines", 'buf, overlong = b"", True', 'buf, overlong = b"XXXX", True'):
            "those bytes belong to the overlong line, reported as None whatever it holds",
        **_utf8("_write_snapshot", 'with tmp.open("w", encoding="utf-8") as f:',
                ('with tmp.open("w", encoding=None) as f:', 'with tmp.open("w", ) as f:',
                 'with tmp.open("w", encoding="UTF-8") as f:')),
    },
}


def equivalent(module: str, func: str, removed: str, added: str) -> str | None:
    """Why a surviving mutant changes nothing observable, or None."""
    if removed.startswith("log.") and added.startswith("log."):
        return "log message text only"
    return EQUIVALENT[module].get((func, removed, added))


# ---- the copy --------------------------------------------------------------------------------


def copy_tree(dest: Path) -> None:
    """Tracked and untracked (not ignored) files of the working tree, into `dest`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        src = REPO / raw.decode()
        if src.is_file():
            out = dest / raw.decode()
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)


def copy_env(copy: Path) -> dict[str, str]:
    """The copy imports its own `agent`; models and shared data come from this checkout."""
    from agent import models

    shared = os.environ.get("VOICE_AGENT_SHARED") or str(REPO.parent / "shared")
    env = {**os.environ, "PYTHONPATH": str(copy), "VOICE_AGENT_SHARED": shared,
           "VOICE_AGENT_MODELS_DIR": str(models.models_dir())}
    env.pop("CI", None)  # a skip is not a catch, and must not look like one
    return env


def pytest(copy: Path, tests: tuple[str, ...], timeout_s: float, select: str = ""
           ) -> tuple[int, str]:
    """Run tests in the copy (fixed order, stop at the first failure); (rc, summary)."""
    cmd = [PY, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider",
           *tests]
    if select:
        cmd += ["-k", select]
    try:
        p = subprocess.run(cmd, cwd=copy, env=copy_env(copy), capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout_s:.0f} s"
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    return p.returncode, lines[-1] if lines else p.stderr[-300:]


# ---- broken copies ---------------------------------------------------------------------------


def run_broken(copy: Path, only: list[str]) -> list[dict[str, Any]]:
    """Apply each broken copy in turn; caught = its tests fail (and passed unbroken)."""
    out = []
    for b in BROKEN:
        if only and not any(o.lower() in b.name.lower() for o in only):
            continue
        target = copy / b.path
        original = target.read_text()
        row: dict[str, Any] = {"name": b.name, "file": b.path, "tests": list(b.tests)}
        if original.count(b.old) != 1:
            row.update(caught=None, why=f"cannot apply: {b.old!r} found "
                       f"{original.count(b.old)} times in {b.path} (update bench/mutants.py)")
            out.append(row)
            print(f"  ??     {b.name}: {row['why']}")
            continue
        t0 = time.monotonic()
        rc, summary = pytest(copy, b.tests, b.timeout_s)
        if rc != 0:
            row.update(caught=None, why=f"the tests fail unbroken: {summary}")
            out.append(row)
            print(f"  ??     {b.name}: {row['why']}")
            continue
        target.write_text(original.replace(b.old, b.new))
        try:
            rc, summary = pytest(copy, b.tests, b.timeout_s)
        finally:
            target.write_text(original)
        caught = rc not in (0, 5)
        row.update(caught=caught, rc=rc, summary=summary, seconds=round(time.monotonic() - t0))
        out.append(row)
        print(f"  {'CAUGHT' if caught else 'MISSED'} {b.name}: {summary}")
    return out


# ---- mutmut ----------------------------------------------------------------------------------

_DIFF_FUNC = re.compile(r"__mutmut_\d+$")


@dataclass
class Score:
    """One module's mutmut outcome."""

    module: str
    total: int = 0
    killed: int = 0
    equivalent: list[dict[str, str]] = field(default_factory=list)
    survivors: list[dict[str, str]] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Killed over the mutants that are not equivalent."""
        n = self.total - len(self.equivalent)
        return self.killed / n if n else 1.0


def _mutmut(copy: Path, *args: str, timeout_s: float = 3600) -> str:
    env = copy_env(copy)
    del env["PYTHONPATH"]  # mutmut puts its mutated copy (mutants/) first itself
    p = subprocess.run([MUTMUT, *args], cwd=copy, env=env, capture_output=True, text=True,
                       timeout=timeout_s)
    return p.stdout + p.stderr


def _diff(copy: Path, name: str) -> tuple[str, str, str]:
    """(function, removed line, added line) of one mutant."""
    text = _mutmut(copy, "show", name)
    removed = [ln[1:].strip() for ln in text.splitlines()
               if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:].strip() for ln in text.splitlines()
             if ln.startswith("+") and not ln.startswith("+++")]
    func = _DIFF_FUNC.sub("", name.rsplit(".", 1)[-1]).replace("ǁ", ".").strip("x.")
    return func, " | ".join(removed), " | ".join(added)


def _drop_pyproject_mutmut(copy: Path) -> None:
    """mutmut prefers pyproject's [tool.mutmut] to setup.cfg: the copy's per-module setup.cfg
    must win, so the table (if the project has one) is removed from the copy."""
    path = copy / "pyproject.toml"
    out, skipping = [], False
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("["):
            skipping = line.strip() == "[tool.mutmut]"
        if not skipping:
            out.append(line)
    path.write_text("".join(out))


def run_mutmut(copy: Path, module: Module, children: int) -> Score:
    """mutmut on one module with its tests; survivors classified."""
    shutil.rmtree(copy / "mutants", ignore_errors=True)
    _drop_pyproject_mutmut(copy)
    args = ["-p", "no:randomly", "-p", "no:cacheprovider", "-q"]
    if module.select:
        args += ["-k", module.select]
    tests = [t for t in module.tests if (copy / t.split("::")[0]).exists()]
    # The whole package is copied into mutants/ (its other modules must import from there);
    # only the module under test is mutated.
    (copy / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths=agent\n"
        f"only_mutate={module.path}\n"
        "pytest_add_cli_args_test_selection=\n" + "".join(f"    {t}\n" for t in tests) +
        "pytest_add_cli_args=\n" + "".join(f"    {a}\n" for a in args))
    _mutmut(copy, "run", "--max-children", str(children))
    score = Score(module.name)
    for line in _mutmut(copy, "results", "--all", "true").splitlines():
        m = re.match(r"\s+(\S+__mutmut_\d+): (.+)$", line)
        if not m:
            continue
        name, status = m.groups()
        score.total += 1
        if status in ("killed", "timeout"):  # a hang is a failing run too
            score.killed += 1
            continue
        func, removed, added = _diff(copy, name)
        row = {"mutant": name, "status": status, "function": func, "removed": removed,
               "added": added}
        why = equivalent(module.name, func, removed, added)
        if why is not None and status == "survived":
            score.equivalent.append({**row, "why": why})
        else:
            score.survivors.append(row)
            if status != "survived":
                score.other[status] = score.other.get(status, 0) + 1
    return score


def print_score(s: Score) -> None:
    """The module's line, then every survivor's diff."""
    print(f"  {s.module}: {s.killed}/{s.total - len(s.equivalent)} killed = {s.score:.0%} "
          f"({s.total} mutants, {len(s.equivalent)} equivalent excluded"
          + (f", {s.other}" if s.other else "") + ")"
          + ("" if s.score >= TARGET else f"  BELOW {TARGET:.0%}"))
    for row in s.survivors:
        print(f"      {row['status']:9s} {row['function']}: {row['removed']!r} -> "
              f"{row['added']!r}")


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; exit 1 if a broken copy was missed or a score is too low."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["broken", "mutmut", "all"])
    ap.add_argument("--only", nargs="*", default=[], help="broken copies whose name contains")
    ap.add_argument("--module", nargs="*", default=[], help="mutmut: modules by name")
    ap.add_argument("--children", type=int, default=2, help="mutmut's parallel test runs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mutants.json")
    args = ap.parse_args(argv)
    copy = Path(tempfile.mkdtemp(prefix="voice-agent-mutants-"))
    report: dict[str, Any] = {"machine": platform.platform(), "python": platform.python_version(),
                              "copy": str(copy)}
    ok = True
    try:
        copy_tree(copy)
        if args.what in ("broken", "all"):
            print("broken copies:")
            rows = run_broken(copy, args.only)
            report["broken"] = rows
            ok &= all(r["caught"] for r in rows)
        if args.what in ("mutmut", "all"):
            print("mutmut:")
            scores = []
            for module in MODULES:
                if args.module and module.name not in args.module:
                    continue
                s = run_mutmut(copy, module, args.children)
                print_score(s)
                scores.append(s)
                ok &= s.score >= TARGET
            report["mutmut"] = [{"module": s.module, "total": s.total, "killed": s.killed,
                                 "score": round(s.score, 3), "equivalent": s.equivalent,
                                 "survivors": s.survivors} for s in scores]
    finally:
        if args.keep:
            print(f"copy kept at {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)
    write_report(args.out, report)
    print(f"report: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
