"""The encoded feature space and the small statistics the poisoning detectors share.

    space = FeatureSpace.fit(reference, numeric, categorical)   # standardised numbers, one-hot categories
    x = space.transform(drop)                                   # float32 rows, distances comparable
    psi(expected_counts, actual_counts)                         # population stability index
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: at most this many row positions are listed per detector (most suspicious first)
FIRST_INDICES = 50


@dataclass
class FeatureSpace:
    """Numeric features standardised by the reference, categories one-hot (unknown: all zero).

    Each categorical column contributes at most distance 1 between two rows, like one standard
    deviation of a numeric feature.
    """

    numeric: list[str]
    categorical: list[str]
    center: np.ndarray
    scale: np.ndarray
    categories: dict[str, list[Any]]

    @classmethod
    def fit(cls, frame: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str]) -> FeatureSpace:
        values = frame[list(numeric)].to_numpy(dtype=np.float64, na_value=np.nan) if numeric else np.empty((len(frame), 0))
        center = np.nanmean(values, axis=0) if len(frame) else np.zeros(len(numeric))
        scale = np.nanstd(values, axis=0) if len(frame) else np.ones(len(numeric))
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        center = np.where(np.isfinite(center), center, 0.0)
        categories = {c: sorted(frame[c].dropna().astype(str).unique().tolist()) for c in categorical}
        return cls(list(numeric), list(categorical), center, scale, categories)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        parts: list[np.ndarray] = []
        if self.numeric:
            values = frame[self.numeric].to_numpy(dtype=np.float64, na_value=np.nan)
            parts.append(np.nan_to_num((values - self.center) / self.scale).astype(np.float32))
        weight = np.float32(1 / math.sqrt(2))
        for column in self.categorical:
            cats = self.categories[column]
            codes = pd.Categorical(frame[column].astype(str), categories=cats).codes
            onehot = np.zeros((len(frame), len(cats)), dtype=np.float32)
            known = codes >= 0
            onehot[np.flatnonzero(known), codes[known]] = weight
            parts.append(onehot)
        return np.hstack(parts) if parts else np.zeros((len(frame), 0), dtype=np.float32)


def _label_text(series: pd.Series) -> pd.Series:
    """Labels as text, so 1 and 1.0 (an integer label read with a null beside it) are the same class."""
    if pd.api.types.is_float_dtype(series):
        present = series.dropna()
        if len(present) and (present % 1 == 0).all():
            series = series.astype("Int64")
    return series.astype(str).fillna("(missing)")


def _codes(series: pd.Series, classes: list[str]) -> np.ndarray:
    """Label codes (index into ``classes``; -1 for a label not among them), one small int per row."""
    return np.asarray(pd.Categorical(_label_text(series), categories=classes).codes, dtype=np.int16)


def _subsample(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _top(scores: np.ndarray, flagged: np.ndarray) -> list[int]:
    """Positions of flagged rows, most suspicious first, at most FIRST_INDICES."""
    positions = np.flatnonzero(flagged)
    order = np.argsort(-scores[positions], kind="stable")
    return [int(i) for i in positions[order][:FIRST_INDICES]]


def _excess_z(observed: float, expected: float, variance: float) -> float:
    return float((observed - expected) / math.sqrt(max(variance, 1e-9)))


def _row_keys(frame: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    """A 64-bit hash of each row's values (1 and 1.0 hash alike), one column at a time (bounded memory)."""
    keys = np.zeros(len(frame), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in features:
            series = frame[column]
            normal = series.astype(np.float64) if pd.api.types.is_numeric_dtype(series) else _label_text(series)
            hashed = pd.util.hash_pandas_object(normal, index=False).to_numpy()
            keys = (keys * np.uint64(0x100000001B3)) ^ hashed
    return keys


def _cross_validated_proba(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray | None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    counts = np.bincount(y)
    if len(counts) < 2 or counts[counts > 0].min() < folds:
        return None
    model = LogisticRegression(C=1.0, solver="liblinear", max_iter=300)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return np.asarray(cross_val_predict(model, x, y, cv=cv, method="predict_proba"))


def confident_learning_issues(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows whose confident class (probability over that class's threshold) is not their label."""
    n_classes = proba.shape[1]
    thresholds = np.array([proba[y == c, c].mean() if (y == c).any() else 1.0 for c in range(n_classes)])
    above = proba >= thresholds
    masked = np.where(above, proba, -1.0)
    confident = masked.argmax(axis=1)
    return above.any(axis=1) & (confident != y)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two histograms over the same bins."""
    e = np.clip(expected / max(expected.sum(), 1), 1e-4, None)
    a = np.clip(actual / max(actual.sum(), 1), 1e-4, None)
    return float(((a - e) * np.log(a / e)).sum())


def _round(value: float) -> float:
    return round(float(value), 4) if math.isfinite(value) else float(value)
