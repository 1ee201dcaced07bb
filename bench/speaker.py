"""Benchmark speaker recognition on the shared speakers: accuracy, operating point, speed.

Usage: python bench/speaker.py [--model-file X.onnx] [--draws 20] [--out bench/results/speaker.json]

* EER over all same/different pairs of ../shared/data/speakers-en (and speakers-zh).
* Voiceprints of 3 enrolment clips: centroid vs best-of; identification top-1.
* The operating point, speaker-disjoint: the threshold is calibrated on half of the English
  speakers (FAR 0.1 % under a Gaussian fit of their impostor scores) and FAR/FRR are counted
  on the other half, raw cosine and with adaptive s-norm (cohort: the calibration half). The
  shipped threshold is also applied to the Chinese set, whose voices it never saw.
* FRR against seconds of enrolment speech and seconds of test speech.
* ms per embedding per second of audio; identify among 10, 1000 and 10000 voiceprints
  (synthetic random voiceprints beyond the real ones) in a real store; ratios against the
  10-voiceprint baseline of the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent import models  # noqa: E402
from agent.speaker import frontend  # noqa: E402
from agent.speaker.embedder import Embedding, Ge2eEmbedder  # noqa: E402
from agent.speaker.scoring import (  # noqa: E402
    CALIBRATION_FAR,
    DEFAULT_THRESHOLD,
    Cohort,
    asnorm,
    centroid,
    d_prime,
    eer,
    far_frr,
    threshold_for_far,
)
from agent.speaker.store import VoiceprintStore  # noqa: E402
from bench.report import write_report  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
EN = SHARED / "speakers-en"
ZH = SHARED / "speakers-zh"
SR = 16000


def load(path: Path) -> np.ndarray:
    """A shared clip as 16 kHz mono float32."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    assert sr == SR, path
    return np.ascontiguousarray(x.mean(axis=1))


def zh_speaker(p: Path) -> str:
    """Speaker of a speakers-zh clip: the name prefix (3d-speaker: speaker1/speaker2)."""
    return p.name.split("_")[0] if p.parent.name == "3d-speaker" else p.name.split("-")[0]


def pair_scores(v: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of all same-speaker and all different-speaker pairs."""
    s = v @ v.T
    iu = np.triu_indices(len(v), 1)
    lab = np.array(labels)
    same = (lab[:, None] == lab[None, :])[iu]
    return s[iu][same], s[iu][~same]


def enrol_trials(v: np.ndarray, labels: np.ndarray, spks: list[str], rng: np.random.Generator,
                 n_enrol: int = 3) -> dict[str, Any]:
    """One draw: each speaker enrols n clips; the rest are tests against every voiceprint."""
    enrol: dict[str, np.ndarray] = {}
    tests: list[int] = []
    for s in spks:
        idx = np.flatnonzero(labels == s)
        rng.shuffle(idx)
        enrol[s] = idx[:n_enrol]
        tests.extend(idx[n_enrol:])
    t = v[tests]
    truth = labels[tests]
    same = np.array(spks)[:, None] == truth[None, :]
    return {
        "enrol": np.stack([centroid(v[enrol[s]]) for s in spks]),
        "centroid": np.stack([centroid(v[enrol[s]]) for s in spks]) @ t.T,
        "best_of": np.stack([(v[enrol[s]] @ t.T).max(axis=0) for s in spks]),
        "tests": t, "same": same, "truth": truth,
    }


def voiceprint_rules(v: np.ndarray, labels: np.ndarray, draws: int,
                     rng: np.random.Generator) -> dict[str, Any]:
    """Centroid vs best-of over random 3-clip enrolments: EER, d', top-1."""
    spks = sorted(set(labels))
    out: dict[str, Any] = {}
    acc: dict[str, tuple[list[float], list[float], list[bool]]] = {
        k: ([], [], []) for k in ("centroid", "best_of")}
    for _ in range(draws):
        tr = enrol_trials(v, labels, spks, rng)
        for k, (tg, im, hit) in acc.items():
            m = tr[k]
            tg.extend(m[tr["same"]])
            im.extend(m[~tr["same"]])
            hit.extend(np.array(spks)[m.argmax(axis=0)] == tr["truth"])
    for k, (tg, im, hit) in acc.items():
        e, _ = eer(np.array(tg), np.array(im))
        far, frr = far_frr(np.array(tg), np.array(im), DEFAULT_THRESHOLD)
        out[k] = {"eer": e, "d_prime": d_prime(np.array(tg), np.array(im)),
                  "top1": float(np.mean(hit)), "far_at_default": far, "frr_at_default": frr,
                  "trials": len(tg) + len(im)}
    return out


def disjoint_operating_point(v: np.ndarray, labels: np.ndarray, splits: int,
                             rng: np.random.Generator) -> dict[str, Any]:
    """Calibrate on 5 speakers, count FAR/FRR on the other 5; raw and s-norm."""
    spks = sorted(set(labels))
    res: dict[str, dict[str, list[float]]] = {
        m: {"threshold": [], "far": [], "frr": [], "eer": []} for m in ("raw", "snorm")}
    default: dict[str, list[float]] = {"far": [], "frr": []}
    for _ in range(splits):
        perm = [str(s) for s in rng.permutation(spks)]
        cal, ev = perm[:len(perm) // 2], perm[len(perm) // 2:]
        tc = enrol_trials(v, labels, cal, rng)
        te = enrol_trials(v, labels, ev, rng)
        # each half's cohort is the other half: no voice is its own cohort
        coh_c = Cohort(v[np.isin(labels, ev)])
        coh_e = Cohort(v[np.isin(labels, cal)])
        scores = {
            "raw": (tc["centroid"], te["centroid"]),
            "snorm": (asnorm(tc["centroid"], tc["enrol"], tc["tests"], coh_c),
                      asnorm(te["centroid"], te["enrol"], te["tests"], coh_e)),
        }
        for m, (sc, se) in scores.items():
            thr = threshold_for_far(sc[~tc["same"]], CALIBRATION_FAR)
            far, frr = far_frr(se[te["same"]], se[~te["same"]], thr)
            res[m]["threshold"].append(thr)
            res[m]["far"].append(far)
            res[m]["frr"].append(frr)
            res[m]["eer"].append(eer(se[te["same"]], se[~te["same"]])[0])
        far, frr = far_frr(te["centroid"][te["same"]], te["centroid"][~te["same"]],
                           DEFAULT_THRESHOLD)
        default["far"].append(far)
        default["frr"].append(frr)
    out: dict[str, Any] = {m: {k: float(np.mean(x)) for k, x in r.items()}
                           for m, r in res.items()}
    out["default_threshold"] = {"threshold": DEFAULT_THRESHOLD,
                                **{k: float(np.mean(x)) for k, x in default.items()}}
    out["splits"] = splits
    return out


def zh_eval(emb: Ge2eEmbedder) -> dict[str, Any]:
    """Chinese set: pairwise EER; enrol/ voiceprints vs test/ clips; 3d-speaker as unknowns."""
    files = sorted(ZH.rglob("*.wav"))
    vecs = np.stack([emb.embed(load(p)) for p in files])
    labels = [zh_speaker(p) for p in files]
    tg, im = pair_scores(vecs, labels)
    e, thr = eer(tg, im)
    enrolled = sorted({zh_speaker(p) for p in files if p.parent.name == "enroll"})
    prints = np.stack([centroid(vecs[[i for i, p in enumerate(files)
                                      if p.parent.name == "enroll" and labels[i] == s]])
                       for s in enrolled])
    test_idx = [i for i, p in enumerate(files) if p.parent.name != "enroll"]
    scores = prints @ vecs[test_idx].T
    truth = np.array([labels[i] for i in test_idx])
    known = np.isin(truth, enrolled)
    same = np.array(enrolled)[:, None] == truth[None, :]
    best = np.array(enrolled)[scores.argmax(axis=0)]
    far, frr = far_frr(scores[same], scores[~same], DEFAULT_THRESHOLD)
    unknown_rejected = float(np.mean(scores[:, ~known].max(axis=0) < DEFAULT_THRESHOLD))
    return {"clips": len(files), "pairs_eer": e, "pairs_eer_threshold": thr,
            "pairs": [len(tg), len(im)], "top1_enrolled": float(np.mean(best[known] ==
                                                                        truth[known])),
            "enrolled": enrolled, "tests_known": int(known.sum()),
            "far_at_default": far, "frr_at_default": frr,
            "unknown_voices_rejected": unknown_rejected}


def duration_curves(emb: Ge2eEmbedder, rng: np.random.Generator,
                    draws: int = 3) -> dict[str, Any]:
    """FRR/FAR at the default threshold vs seconds of enrolment speech and of test speech."""
    spks = sorted(p.name for p in EN.iterdir() if p.is_dir())
    speech = {s: [frontend.preprocess(load(p))[0] for p in sorted((EN / s).glob("*.flac"))]
              for s in spks}
    ratio = 0.91  # voiced seconds per second of trimmed audio on these clips
    enrol_s = (2, 4, 6, 8, 12)
    test_s = (1.0, 1.5, 2.0, 3.0)
    prints: dict[float, list[tuple[str, np.ndarray]]] = {d: [] for d in enrol_s}
    full_tests: list[tuple[str, np.ndarray]] = []
    short: dict[float, list[tuple[str, np.ndarray]]] = {d: [] for d in test_s}
    ref: list[tuple[str, np.ndarray]] = []
    for s, draw in [(s, d) for s in spks for d in range(draws)]:
        idx = rng.permutation(len(speech[s]))
        cat = np.concatenate([speech[s][i] for i in idx[:4]])
        for d in enrol_s:
            n = int(d / ratio * SR)
            if len(cat) >= n:
                prints[d].append((s, _embed_trimmed(emb, cat[:n])))
        ref.append((s, _embed_trimmed(emb, cat[:int(8 / ratio * SR)])))
        if draw:  # tests once per speaker; voiceprints from several draws
            continue
        for i in idx[4:]:
            x = speech[s][i]
            full_tests.append((s, _embed_trimmed(emb, x)))
            for t in test_s:
                n = int(t / ratio * SR)
                if len(x) >= n:
                    short[t].append((s, _embed_trimmed(emb, x[:n])))

    def rates(enr: list[tuple[str, np.ndarray]], tests: list[tuple[str, np.ndarray]]) -> dict:
        tg = [float(v @ w) for s, v in enr for t, w in tests if s == t]
        im = [float(v @ w) for s, v in enr for t, w in tests if s != t]
        far, frr = far_frr(np.array(tg), np.array(im), DEFAULT_THRESHOLD)
        return {"frr": frr, "far": far, "target_mean": float(np.mean(tg)),
                "impostor_max": float(np.max(im)), "voiceprints": len(enr)}

    return {"enrol_speech_s": {str(d): rates(prints[d], full_tests) for d in enrol_s},
            "test_speech_s": {str(d): rates(ref, short[d]) for d in test_s}}


def _embed_trimmed(emb: Ge2eEmbedder, speech: np.ndarray) -> np.ndarray:
    """Embed audio that is already preprocessed (no second trim)."""
    v = emb._embed_speech(speech)
    return v / np.linalg.norm(v)


def median_ms(fn: Any, n: int, idle_s: float = 0.0) -> float:
    """Median wall time of n calls, ms; `idle_s` of sleep before each (caches go cold)."""
    ts = []
    for _ in range(n):
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


def speed(emb: Ge2eEmbedder, clips: list[np.ndarray], rng: np.random.Generator) -> dict:
    """Embedding cost and identify latency among 10 / 1000 / 10000 voiceprints."""
    per_s = [median_ms(lambda c=c: emb.embed(c), 3) / (len(c) / SR) for c in clips[::5]]
    three = clips[0][SR:4 * SR]
    embed3 = median_ms(lambda: emb.embed(three), 20)
    # live use: one utterance now and then, so the weights are no longer in cache
    embed3_idle = median_ms(lambda: emb.embed(three), 20, idle_s=0.3)
    probe = emb.embed(three)
    speech, _ = emb.preprocess(three)
    mels, _ = frontend.partial_mels(speech)
    out: dict[str, Any] = {"ms_per_audio_s": statistics.median(per_s), "embed_3s_ms": embed3,
                           "embed_3s_after_idle_ms": embed3_idle,
                           "embed_3s_parts_ms": {
                               "preprocess": median_ms(lambda: emb.preprocess(three), 20),
                               "mel": median_ms(lambda: frontend.partial_mels(speech), 20),
                               "onnx": median_ms(lambda: emb._run(mels), 20),
                               "partials": len(mels)},
                           "identify_ms": {}, "identify_first_ms": {}}
    for n in (10, 1000, 10000):
        with tempfile.TemporaryDirectory() as d:
            store = VoiceprintStore(d, threshold=DEFAULT_THRESHOLD)
            vs = rng.normal(size=(n, emb.dim)).astype(np.float32)
            with store._tx() as c:  # bulk load; one register() per voiceprint is fsync-bound
                for i, v in enumerate(vs / np.linalg.norm(vs, axis=1, keepdims=True)):
                    sid = f"{i:032x}"
                    c.execute("INSERT INTO speakers VALUES (?, ?, NULL, NULL, '{}', 0, 0)",
                              (sid, f"s{i}"))
                    c.execute("INSERT INTO samples (speaker_id, model_id, dim, embedding, "
                              "speech_s, created) VALUES (?, ?, ?, ?, 9, 0)",
                              (sid, emb.model_id, emb.dim, v.tobytes()))
            store.register("probe-owner", [Embedding(probe, emb.model_id, 9.0, 9.0)])
            t0 = time.perf_counter()
            store.identify(probe, emb.model_id, top_k=5)
            out["identify_first_ms"][str(n)] = 1000 * (time.perf_counter() - t0)
            out["identify_ms"][str(n)] = median_ms(
                lambda s=store: s.identify(probe, emb.model_id, top_k=5), 200)
            out.setdefault("identify_after_idle_ms", {})[str(n)] = median_ms(
                lambda s=store: s.identify(probe, emb.model_id, top_k=5), 10, idle_s=0.2)
            store.close()
    base = out["identify_ms"]["10"]
    out["identify_vs_10"] = {k: v / base for k, v in out["identify_ms"].items()}
    out["embed_plus_identify_1000_ms"] = embed3 + out["identify_ms"]["1000"]
    out["embed_plus_identify_1000_after_idle_ms"] = (embed3_idle
                                                     + out["identify_after_idle_ms"]["1000"])
    return out


def main() -> int:
    """Run every measurement, print a summary, write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model-file", type=Path, help="another GE2E ONNX file (e.g. int8)")
    ap.add_argument("--draws", type=int, default=20, help="random enrolment draws / splits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="accuracy only on speakers-en")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speaker.json")
    args = ap.parse_args()
    model = args.model_file or models.path("ge2e-resemblyzer")
    emb = Ge2eEmbedder(model, threads=args.threads)
    rng = np.random.default_rng(0)
    files = sorted(EN.glob("*/*.flac"))
    clips = [load(p) for p in files]
    labels = np.array([p.parent.name for p in files])
    t0 = time.perf_counter()
    vecs = np.stack([emb.embed(c) for c in clips])
    embed_s = time.perf_counter() - t0
    tg, im = pair_scores(vecs, list(labels))
    e, e_thr = eer(tg, im)
    report: dict[str, Any] = {
        "bench": "speaker", "model": str(model), "machine": platform.machine(),
        "python": platform.python_version(), "cpus": os.cpu_count(), "threads": args.threads,
        "en": {"clips": len(clips), "audio_s": sum(len(c) for c in clips) / SR,
               "pairs": [len(tg), len(im)], "eer": e, "eer_threshold": e_thr,
               "embed_all_s": embed_s},
    }
    report["en"]["voiceprints"] = voiceprint_rules(vecs, labels, args.draws, rng)
    report["en"]["operating_point"] = disjoint_operating_point(vecs, labels, args.draws, rng)
    if not args.quick:
        report["zh"] = zh_eval(emb)
        report["durations"] = duration_curves(emb, rng)
        report["speed"] = speed(emb, clips, rng)
    print_report(report)
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0


def print_report(r: dict[str, Any]) -> None:
    """Human-readable summary of the report."""
    en = r["en"]
    pct = 100
    print(f"GE2E {r['model']}, {r['threads']} thread(s)")
    print(f"speakers-en: {en['clips']} clips, {en['audio_s']:.0f} s; pairs same/diff "
          f"{en['pairs'][0]}/{en['pairs'][1]}: EER {en['eer'] * pct:.2f} % "
          f"(at cosine {en['eer_threshold']:.3f})")
    for k, v in en["voiceprints"].items():
        print(f"  voiceprint {k:8s}: EER {v['eer'] * pct:.2f} %  d' {v['d_prime']:.2f}  top-1 "
              f"{v['top1'] * pct:.2f} %  FAR/FRR at {DEFAULT_THRESHOLD} "
              f"{v['far_at_default'] * pct:.3f} / {v['frr_at_default'] * pct:.2f} %")
    op = en["operating_point"]
    print(f"  speaker-disjoint halves ({op['splits']} splits), calibrated for FAR "
          f"{CALIBRATION_FAR * pct:g} % on one half, counted on the other:")
    for m in ("raw", "snorm"):
        v = op[m]
        print(f"    {m:5s}: threshold {v['threshold']:.3f}  FAR {v['far'] * pct:.3f} %  FRR "
              f"{v['frr'] * pct:.2f} %  EER {v['eer'] * pct:.2f} %")
    d = op["default_threshold"]
    print(f"    shipped threshold {d['threshold']}: FAR {d['far'] * pct:.3f} %  FRR "
          f"{d['frr'] * pct:.2f} %")
    if "zh" in r:
        z = r["zh"]
        print(f"speakers-zh: {z['clips']} clips; pairs EER {z['pairs_eer'] * pct:.1f} %; top-1 "
              f"{z['top1_enrolled'] * pct:.0f} % of {z['tests_known']} tests ({len(z['enrolled'])} "
              f"voiceprints of 2-3 clips); FAR/FRR at {DEFAULT_THRESHOLD} "
              f"{z['far_at_default'] * pct:.1f} / {z['frr_at_default'] * pct:.1f} %; unknown "
              f"voices rejected {z['unknown_voices_rejected'] * pct:.0f} %")
    if "durations" in r:
        for kind, rows in r["durations"].items():
            print(f"  {kind}: " + "  ".join(
                f"{k}s FRR {v['frr'] * pct:.0f}% FAR {v['far'] * pct:.1f}%"
                for k, v in rows.items()))
    if "speed" in r:
        s = r["speed"]
        parts = s["embed_3s_parts_ms"]
        print(f"speed: {s['ms_per_audio_s']:.1f} ms per second of audio; 3 s utterance "
              f"{s['embed_3s_ms']:.1f} ms back to back, {s['embed_3s_after_idle_ms']:.1f} ms "
              f"after 0.3 s idle (preprocess {parts['preprocess']:.1f}, mel "
              f"{parts['mel']:.1f}, onnx {parts['onnx']:.1f} ms for {parts['partials']} "
              f"partial windows)")
        print("  identify among 10/1000/10000: " + " / ".join(
                  f"{v:.3f}" for v in s["identify_ms"].values())
              + " ms (x" + " / x".join(f"{v:.1f}" for v in s["identify_vs_10"].values())
              + "); first (uncached) " + " / ".join(
                  f"{v:.1f}" for v in s["identify_first_ms"].values())
              + " ms; after idle " + " / ".join(
                  f"{v:.2f}" for v in s["identify_after_idle_ms"].values())
              + f" ms\n  embed + identify(1000): {s['embed_plus_identify_1000_ms']:.1f} ms "
              f"(after idle {s['embed_plus_identify_1000_after_idle_ms']:.1f} ms)")


if __name__ == "__main__":
    raise SystemExit(main())
