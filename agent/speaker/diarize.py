"""Who spoke when: VAD segments -> sliding-window embeddings -> clustering -> labelled turns.

1. webrtcvad (30 ms frames) finds speech; pauses under `min_pause_s` are bridged.
2. Each speech region is cut into windows of the embedder's `window_s` every `hop_s` (the hop
   grows for long recordings so that at most `MAX_WINDOWS` windows are clustered).
3. Average-linkage agglomerative clustering on cosine: merge the two closest clusters until
   `num_speakers` remain, or, when that is not given, until no two clusters are closer than
   `threshold`; then clusters of fewer than 3 windows join their nearest large cluster.
4. Each 10 ms frame of speech takes the cluster whose mean cosine over the windows covering
   the frame is highest; runs of one label become segments, with a confidence: the mean over
   their windows of a softmax (temperature `TEMPERATURE`) of the window's cosines to the
   cluster centroids.
5. With a store, each cluster's speech (up to 30 s) is embedded as one utterance and
   identified; a match names the segments.

Synchronous and CPU-bound: run it in a worker thread.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import webrtcvad

from agent.constants import PIPELINE_RATE
from agent.errors import SpeakerError
from agent.speaker.embedder import Embedder
from agent.speaker.frontend import MAX_AUDIO_S, check_audio
from agent.speaker.scoring import normalize
from agent.speaker.store import VoiceprintStore

log = logging.getLogger(__name__)

FRAME = 480  # 30 ms VAD frames
MAX_WINDOWS = 1500  # bounds the O(n^2) clustering
MIN_CLUSTER_WINDOWS = 3
#: stop merging below this mean window-pair cosine (GE2E, 1.6 s windows). Tuned on the shared
#: speakers: with 0.5 s pauses between turns, 0.55-0.6 found every pair and trio; with 0.15 s
#: pauses 0.55 got the speaker count right most often.
DEFAULT_THRESHOLD = 0.55
TEMPERATURE = 0.05
RES = 0.01  # labelling resolution, seconds


@dataclass(frozen=True)
class Turn:
    """One diarized segment."""

    start: float
    end: float
    label: str
    confidence: float
    speaker_id: str | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"start": round(self.start, 2), "end": round(self.end, 2), "label": self.label,
                "confidence": round(self.confidence, 3), "speaker_id": self.speaker_id,
                "name": self.name}


@dataclass(frozen=True)
class Diarization:
    """Segments in time order plus one summary per speaker label."""

    segments: list[Turn]
    speakers: list[dict[str, Any]]
    audio_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"audio_s": round(self.audio_s, 2), "num_speakers": len(self.speakers),
                "speakers": self.speakers, "segments": [t.to_dict() for t in self.segments]}


def speech_regions(audio: np.ndarray, *, aggressiveness: int = 2, min_pause_s: float = 0.3,
                   min_speech_s: float = 0.25) -> list[tuple[float, float]]:
    """(start_s, end_s) of speech, pauses shorter than `min_pause_s` bridged."""
    n = len(audio) // FRAME
    pcm = (np.clip(audio[:n * FRAME], -1.0, 1.0) * 32767).astype(np.int16).tobytes()
    vad = webrtcvad.Vad(aggressiveness)
    flags = [vad.is_speech(pcm[i * FRAME * 2:(i + 1) * FRAME * 2], PIPELINE_RATE)
             for i in range(n)]
    fs = FRAME / PIPELINE_RATE
    regions: list[list[float]] = []
    for i, f in enumerate(flags):
        if not f:
            continue
        t = i * fs
        if regions and t - regions[-1][1] < min_pause_s:
            regions[-1][1] = t + fs
        else:
            regions.append([t, t + fs])
    return [(a, b) for a, b in regions if b - a >= min_speech_s]


def _cluster(x: np.ndarray, num_speakers: int | None, threshold: float) -> np.ndarray:
    """Average-linkage agglomerative clustering of normalised rows -> labels 0..k-1.

    Average linkage (the mean cosine over all cross pairs) rather than centroid linkage:
    GE2E vectors all lie in the positive orthant, so centroids of big clusters drift towards
    a common mean and look alike whoever speaks; the mean pairwise cosine does not.
    """
    n = len(x)
    sim = (x @ x.T).astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    size = np.ones(n)
    active = np.ones(n, dtype=bool)
    owner = np.arange(n)
    k = n
    target = num_speakers if num_speakers else 1
    while k > target:
        i, j = divmod(int(np.argmax(sim)), n)
        if num_speakers is None and sim[i, j] < threshold:
            break
        # Lance-Williams update for average linkage
        row = (size[i] * sim[i] + size[j] * sim[j]) / (size[i] + size[j])
        size[i] += size[j]
        owner[owner == j] = i
        active[j] = False
        row[~active] = -np.inf
        row[i] = -np.inf
        sim[i, :] = row
        sim[:, i] = row
        sim[j, :] = -np.inf
        sim[:, j] = -np.inf
        k -= 1
    _, labels = np.unique(owner, return_inverse=True)
    return labels.astype(np.int64)


def _absorb_small(emb: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    """Give the windows of clusters smaller than `min_size` to the nearest large cluster."""
    counts = np.bincount(labels)
    big = np.flatnonzero(counts >= min_size)
    if len(big) == 0 or len(big) == len(counts):
        return labels
    cents = normalize(np.stack([emb[labels == c].mean(axis=0) for c in big]))
    out = labels.copy()
    small = ~np.isin(labels, big)
    out[small] = big[np.argmax(emb[small] @ cents.T, axis=1)]
    return out


def diarize(audio: np.ndarray, embedder: Embedder, *, num_speakers: int | None = None,
            threshold: float = DEFAULT_THRESHOLD, hop_s: float = 0.4,
            store: VoiceprintStore | None = None, max_audio_s: float = 3600.0) -> Diarization:
    """Diarize 16 kHz mono float32 audio; SpeakerError on bad input or no speech."""
    if num_speakers is not None and not (isinstance(num_speakers, int) and 1 <= num_speakers <= 32):
        raise SpeakerError("bad_request", "num_speakers must be 1-32")
    x = check_audio(audio, max_s=max_audio_s)
    audio_s = len(x) / PIPELINE_RATE
    regions = speech_regions(x)
    if not regions:
        raise SpeakerError("silent", f"no speech found in {audio_s:.1f} s of audio")
    speech_s = sum(b - a for a, b in regions)
    hop = max(hop_s, speech_s / MAX_WINDOWS)
    starts: list[float] = []
    vecs: list[np.ndarray] = []
    groups: list[int] = []
    for g, (a, b) in enumerate(regions):
        seg = x[int(a * PIPELINE_RATE):int(b * PIPELINE_RATE)]
        st, v = embedder.embed_windows(seg, hop)
        starts.extend(a + st)
        vecs.append(v)
        groups.extend([g] * len(st))
    emb = np.concatenate(vecs)
    win_start = np.array(starts)
    grp = np.array(groups)
    win_end = np.array([min(s + embedder.window_s, regions[g][1]) for s, g in zip(win_start, grp,
                                                                                 strict=True)])
    labels = _cluster(emb, num_speakers, threshold)
    if num_speakers is None:  # a speaker heard in fewer than 3 windows is more likely noise
        labels = _absorb_small(emb, labels, MIN_CLUSTER_WINDOWS)
    used = np.unique(labels)
    cents = normalize(np.stack([emb[labels == c].mean(axis=0) for c in used]))
    sims = emb @ cents.T
    z = np.exp((sims - sims.max(axis=1, keepdims=True)) / TEMPERATURE)
    post = z / z.sum(axis=1, keepdims=True)
    turns = _turns(regions, (win_start, win_end), grp, sims, post)
    # name labels in order of first appearance; a cluster that wins no frame disappears
    order: dict[str, str] = {}
    for t in turns:
        order.setdefault(t.label, f"SPEAKER_{len(order):02d}")
    turns = [Turn(t.start, t.end, order[t.label], t.confidence) for t in turns]
    return _name(x, turns, embedder, store, audio_s, len(order))


def _turns(regions: list[tuple[float, float]], win: tuple[np.ndarray, np.ndarray],
           grp: np.ndarray, sims: np.ndarray, post: np.ndarray) -> list[Turn]:
    """Label each 10 ms frame by the mean cluster cosine of the windows covering it.

    Averaging every covering window (rather than taking the nearest one) puts a speaker
    change where the two speakers' evidence crosses, within a window's hop of the truth.
    Sums over windows go through difference arrays: memory and time linear in frames plus
    windows, however long a region is.
    """
    win_start, win_end = win
    turns: list[Turn] = []
    for g, (a, b) in enumerate(regions):
        idx = np.where(grp == g)[0]
        n = max(1, round((b - a) / RES))
        lo = np.clip(np.floor((win_start[idx] - a) / RES).astype(int), 0, n - 1)
        hi = np.clip(np.ceil((win_end[idx] - a) / RES).astype(int), lo + 1, n)
        acc = np.zeros((n + 1, 2 * sims.shape[1] + 1))
        vals = np.hstack([sims[idx], post[idx], np.ones((len(idx), 1))])
        np.add.at(acc, lo, vals)
        np.add.at(acc, hi, -vals)
        tot = np.cumsum(acc, axis=0)[:n]
        count = np.maximum(tot[:, -1:], 1e-9)
        k = sims.shape[1]
        score, frame_post = tot[:, :k] / count, tot[:, k:2 * k] / count
        lab = np.argmax(score, axis=1)
        cuts = np.flatnonzero(np.diff(lab)) + 1
        for s, e in itertools.pairwise([0, *cuts.tolist(), n]):
            c = int(lab[s])
            turns.append(Turn(a if s == 0 else a + s * RES, b if e == n else a + e * RES,
                              f"SPEAKER_{c:02d}", float(frame_post[s:e, c].mean())))
    return turns


def _name(x: np.ndarray, turns: list[Turn], embedder: Embedder, store: VoiceprintStore | None,
          audio_s: float, k: int) -> Diarization:
    """Per-label summaries; with a store, identify each label's speech and name its turns."""
    speakers: list[dict[str, Any]] = []
    names: dict[str, tuple[str | None, str | None]] = {}
    for c in range(k):
        label = f"SPEAKER_{c:02d}"
        mine = [t for t in turns if t.label == label]
        info: dict[str, Any] = {"label": label, "speech_s": round(sum(t.end - t.start
                                                                     for t in mine), 2),
                                "speaker_id": None, "name": None, "score": None}
        if store is not None and mine:
            parts = [x[int(t.start * PIPELINE_RATE):int(t.end * PIPELINE_RATE)] for t in mine]
            speech = np.concatenate(parts)[:int(MAX_AUDIO_S * PIPELINE_RATE)]
            try:
                vec = embedder.embed(speech)
            except SpeakerError as e:  # a label with too little speech stays anonymous
                log.debug("diarize: %s not identified: %s", label, e)
            else:
                best = store.identify(vec, embedder.model_id, top_k=1)
                if best:
                    info["score"] = round(best[0].score, 4)
                    if best[0].is_match:
                        info["speaker_id"], info["name"] = best[0].speaker_id, best[0].name
        names[label] = (info["speaker_id"], info["name"])
        speakers.append(info)
    named = [Turn(t.start, t.end, t.label, t.confidence, *names[t.label]) for t in turns]
    return Diarization(named, speakers, audio_s)
