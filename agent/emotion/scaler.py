"""Standard scaling of a front end's features (what sklearn's StandardScaler did in training)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# sklearn treats a (near) zero spread as 1, so constant features pass through centred.
_MIN_SCALE = 10 * np.finfo(np.float64).eps


@dataclass(frozen=True)
class Scaler:
    """Per-feature mean and scale; `kind` says how they broadcast over a feature matrix."""

    mean: np.ndarray
    scale: np.ndarray
    kind: str = "per_element"  # per_element: one (mean, scale) per (coefficient, frame)

    @classmethod
    def fit(cls, features: np.ndarray, kind: str = "per_element") -> Scaler:
        """Fit on a stack of feature matrices (clips x coefficients x frames)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 3 or len(x) < 2:
            raise ValueError(f"need a stack of at least two feature matrices, got {x.shape}")
        axes = (0,) if kind == "per_element" else (0, 2) if kind == "per_coefficient" else None
        if axes is None:
            raise ValueError(f"unknown scaler kind {kind!r}")
        mean = x.mean(axis=axes, keepdims=True)[0]
        std = x.std(axis=axes, keepdims=True)[0]
        std = np.where(std < _MIN_SCALE, 1.0, std)
        return cls(mean.astype(np.float32), std.astype(np.float32), kind)

    def transform(self, features: np.ndarray) -> np.ndarray:
        """(x - mean) / scale, float32, same shape as `features`."""
        return ((features - self.mean) / self.scale).astype(np.float32)

    def save(self, path: Path) -> None:
        """Write as .npz (`mean`, `scale`, `kind`; no pickles)."""
        np.savez(path, mean=self.mean, scale=self.scale, kind=np.array(self.kind))

    @classmethod
    def load(cls, path: Path) -> Scaler:
        """Read what `save` wrote."""
        with np.load(path, allow_pickle=False) as z:
            mean, scale = z["mean"].astype(np.float32), z["scale"].astype(np.float32)
            kind = str(z["kind"]) if "kind" in z else "per_element"
        if mean.shape != scale.shape:
            raise ValueError(f"{path}: mean {mean.shape} and scale {scale.shape} differ")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError(f"{path}: non-finite or non-positive statistics")
        return cls(mean, scale, kind)
