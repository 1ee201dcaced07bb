"""Scoring: EER/FAR/FRR arithmetic, the Gaussian-tail threshold, centroids, s-norm, quality,
and the shipped operating point on speaker-disjoint halves of the shared speakers."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from agent import models
from agent.errors import ModelError
from agent.speaker.embedder import Ge2eEmbedder
from agent.speaker.scoring import (
    CALIBRATION_FAR,
    DEFAULT_THRESHOLD,
    MIN_ENROL_SPEECH_S,
    Cohort,
    EnrolmentQuality,
    asnorm,
    best_of,
    centroid,
    cosine,
    d_prime,
    eer,
    far_frr,
    model_threshold,
    threshold_for_far,
)

from .conftest import SHARED, need_shared


def test_eer_and_rates_on_known_distributions() -> None:
    rng = np.random.default_rng(0)
    # two unit-variance Gaussians 2 apart: EER = Phi(-1) = 15.87 %, at the midpoint
    tg, im = rng.normal(2, 1, 200_000), rng.normal(0, 1, 200_000)
    e, thr = eer(tg, im)
    assert e == pytest.approx(0.1587, abs=0.003) and thr == pytest.approx(1.0, abs=0.02)
    far, frr = far_frr(tg, im, thr)
    assert far == pytest.approx(e, abs=0.003) and frr == pytest.approx(e, abs=0.003)
    assert d_prime(tg, im) == pytest.approx(2.0, abs=0.02)
    # separable scores: EER 0 and a threshold between the two sets
    e, thr = eer(np.array([0.9, 0.8]), np.array([0.1, 0.3]))
    assert e == 0.0 and 0.3 < thr <= 0.8
    assert far_frr(np.array([0.9, 0.7]), np.array([0.1, 0.77]), 0.76) == (0.5, 0.5)
    with pytest.raises(ValueError):
        eer(np.array([]), np.array([0.1]))


def test_threshold_for_far_extrapolates_the_tail() -> None:
    rng = np.random.default_rng(1)
    small = rng.normal(0.55, 0.067, 400)  # like the shared impostor trials
    thr = threshold_for_far(small, 0.001)
    # on a population 1000 times larger from the same distribution, FAR is near the target
    # (within the error of a mean and std estimated from 400 trials)
    big = rng.normal(0.55, 0.067, 400_000)
    assert 0.0002 < np.mean(big >= thr) < 0.005
    # the empirical quantile of 400 trials could not say anything below 1/400
    assert thr > np.quantile(small, 1 - 1 / 400) - 0.05
    assert threshold_for_far(small, 0.01) < thr
    with pytest.raises(ValueError):
        threshold_for_far(np.array([0.5]), 0.01)


def test_centroid_best_of_cosine() -> None:
    rng = np.random.default_rng(2)
    v = rng.normal(size=(3, 64)).astype(np.float32)
    c = centroid(v)
    assert np.linalg.norm(c) == pytest.approx(1.0, abs=1e-6)
    # scale of a sample does not weigh it more: samples are normalised first
    assert np.allclose(centroid(v * np.array([[1.0], [10.0], [0.1]], np.float32)), c, atol=1e-6)
    t = v[1] + 0.01 * rng.normal(size=64).astype(np.float32)
    assert best_of(v, t) == pytest.approx(cosine(v[1], t), abs=1e-6)
    assert best_of(v, t) > cosine(c, t)
    assert cosine(np.zeros(4), np.ones(4)) == 0.0


def test_asnorm_centres_impostor_scores() -> None:
    rng = np.random.default_rng(3)
    cohort = rng.normal(size=(500, 64))
    cohort /= np.linalg.norm(cohort, axis=1, keepdims=True)
    coh = Cohort(cohort.astype(np.float32), top_k=50)
    e = rng.normal(size=(5, 64))
    t = rng.normal(size=(40, 64))
    raw = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (
        t / np.linalg.norm(t, axis=1, keepdims=True)).T
    s = asnorm(raw, e, t, coh)
    assert s.shape == raw.shape
    # random voices score far below the top-k cohort mean: strongly negative after s-norm,
    # and the order of raw scores is kept for a fixed enrolment and test set
    assert s.mean() < -1.0
    assert np.corrcoef(raw.ravel(), s.ravel())[0, 1] > 0.9


def test_quality_and_model_thresholds() -> None:
    q = EnrolmentQuality(speech_s=MIN_ENROL_SPEECH_S - 1, samples=2)
    assert not q.ok and q.warning and f"{MIN_ENROL_SPEECH_S:g} s" in q.warning
    d = q.to_dict()
    assert d["ok"] is False and d["samples"] == 2
    assert EnrolmentQuality(speech_s=MIN_ENROL_SPEECH_S, samples=1).warning is None
    assert model_threshold("ge2e-resemblyzer") == DEFAULT_THRESHOLD
    assert model_threshold("ge2e-resemblyzer", 0.8) == 0.8
    assert model_threshold("speaker-campplus-zh-en") == DEFAULT_THRESHOLD  # warns: unmeasured


def test_operating_point_on_unseen_speakers() -> None:
    """Calibrate on 5 shared speakers, count FAR/FRR on the other 5 (and the other way)."""
    need_shared()
    try:
        emb = Ge2eEmbedder(models.path("ge2e-resemblyzer"))
    except ModelError as e:
        pytest.skip(f"speaker model ge2e-resemblyzer not installed ({e.message})")
    root = SHARED / "data" / "speakers-en"
    spks = sorted(p.name for p in root.iterdir() if p.is_dir())
    vecs = {s: [emb.embed(sf.read(p, dtype="float32")[0][:8 * 16000])
                for p in sorted((root / s).glob("*.flac"))[:6]] for s in spks}

    def trials(group: list[str]) -> tuple[np.ndarray, np.ndarray]:
        prints = {s: centroid(vecs[s][:3]) for s in group}
        tg = [float(prints[s] @ v) for s in group for v in vecs[s][3:]]
        im = [float(prints[s] @ v) for s in group for o in group if o != s for v in vecs[o][3:]]
        return np.array(tg), np.array(im)

    halves = (spks[::2], spks[1::2])
    for cal, ev in (halves, halves[::-1]):
        thr = threshold_for_far(trials(cal)[1], CALIBRATION_FAR)
        tg, im = trials(ev)
        far, frr = far_frr(tg, im, thr)
        assert far <= 0.01 and frr <= 0.05, (thr, far, frr)
        far, frr = far_frr(tg, im, DEFAULT_THRESHOLD)
        assert far <= 0.01 and frr <= 0.05, (far, frr)
