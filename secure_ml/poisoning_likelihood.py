"""Label likelihood under a model of the reference: the drop-level test near its statistical limit.

    model = ReferenceModel.fit(x_ref, y_ref, n_classes=2, folds=5, seed=0)   # out-of-fold scores too
    scan = model.scan(x_drop, y_drop, duplicate_of=dup, groups=groups, alpha=0.045, global_share=0.75)
    scan.z_global, scan.limit_global            # the whole drop's label surprise, as a z statistic
    scan.worst_group, scan.z_groups             # the most surprising subgroup (one value, bin or label)
    scan.row_suspicion                          # 1 - calibrated probability of each row's label

Why this test: a uniform label flip at rate e turns the labels' conditional distribution p(y|x) into
(1 - e) p + e (1 - p) / (K - 1). The locally most powerful statistic for e > 0 is the efficient score
``sum_i (1 - p_i(y_i)) / ((K - 1) p_i(y_i))``, each term centred by its own expectation under p
(so rows that are merely hard do not count, and a drop of hard rows does not look poisoned).
p comes from a logistic regression fitted on the reference; probabilities are clipped at
``p_min`` so one confidently-wrong clean row cannot decide a drop.

The null is the reference's own out-of-fold (OOF) scores: each reference row is scored by the
fold model that never saw it, and a drop row that duplicates a reference row is scored by that
same fold model (no leak from a row the model was fitted on). New drop rows are scored by the
average of the fold models. The drop's total is compared with the OOF mean; its variance counts
both the drop's noise and the reference's (a two-sample comparison: the reference's calibration
is itself estimated from its N labels), and is inflated by the design effect of repeated rows.

Subgroups (one categorical value, one quantile bin of a numeric feature, one observed label class)
get the same statistic restricted to their rows, centred by the reference's OOF mean within the
group (shrunk towards the global mean). The global test and the subgroup maximum share one
false-alarm rate: the global limit takes ``global_share`` of ``alpha``; the subgroup limit is set by
simulating the subgroup statistics' joint normal null (their correlations are their overlaps) so
that P(global over or any subgroup over) = alpha exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

#: shrinkage (in reference rows) of a subgroup's OOF centre and variance towards the global ones
GROUP_PRIOR_ROWS = 30.0
#: simulated draws of the subgroup null (deterministic seed)
NULL_DRAWS = 4000
#: a limit no statistic reaches (finite, so reports stay valid JSON)
NO_LIMIT = 1e9


@dataclass
class Scan:
    z_global: float
    limit_global: float
    z_groups: dict[str, float]
    group_rows: dict[str, int]
    limit_groups: float
    row_suspicion: np.ndarray          # over the scored rows
    row_surprise: np.ndarray           # centred efficient-score term of each scored row
    observed: float
    expected: float
    duplicates: int
    detail: dict[str, object] = field(default_factory=dict)

    @property
    def worst_group(self) -> str:
        return max(self.z_groups, key=lambda g: self.z_groups[g]) if self.z_groups else ""

    @property
    def z_worst_group(self) -> float:
        return self.z_groups[self.worst_group] if self.z_groups else 0.0


def surprise(proba: np.ndarray, y: np.ndarray, p_min: float) -> np.ndarray:
    """Centred efficient score of a uniform flip for each row: s(y) - E_p[s] (0 in expectation)."""
    k = proba.shape[1]
    p = np.clip(proba, p_min, 1.0)
    s = (1.0 - p) / ((k - 1) * p)                              # s(c) for every class c
    expected = (proba * s).sum(axis=1)
    observed = np.where(y >= 0, s[np.arange(len(y)), np.maximum(y, 0)], (1.0 - p_min) / ((k - 1) * p_min))
    return observed - expected


@dataclass
class ReferenceModel:
    """Fold models fitted on the reference, and the reference's out-of-fold surprise."""

    models: list[object]
    fold_of: np.ndarray                 # fold of each reference row
    oof_proba: np.ndarray
    oof_surprise: np.ndarray
    n_classes: int
    p_min: float
    classes_seen: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, *, n_classes: int, folds: int = 5, seed: int = 0,
            p_min: float = 0.02, c: float = 1.0) -> ReferenceModel | None:
        """None when the reference cannot support the model (a class with fewer rows than folds)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold

        keep = y >= 0
        counts = np.bincount(y[keep], minlength=n_classes)
        present = np.flatnonzero(counts)
        if len(present) < 2 or counts[present].min() < folds:
            return None
        fold_of = np.full(len(y), -1, dtype=np.int16)
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        rows = np.flatnonzero(keep)
        oof = np.zeros((len(y), n_classes))
        models = []
        for f, (train, test) in enumerate(splitter.split(x[rows], y[rows])):
            model = LogisticRegression(C=c, max_iter=500)
            model.fit(x[rows[train]], y[rows[train]])
            models.append(model)
            fold_of[rows[test]] = f
            oof[rows[test]] = cls._expand(model, x[rows[test]], n_classes)
        oof[~keep] = 1.0 / n_classes
        return cls(models, fold_of, oof, surprise(oof, y, p_min), n_classes, p_min, present)

    @staticmethod
    def _expand(model: object, x: np.ndarray, n_classes: int) -> np.ndarray:
        proba = np.zeros((len(x), n_classes))
        proba[:, model.classes_] = model.predict_proba(x)  # type: ignore[attr-defined]
        return proba

    def predict(self, x: np.ndarray, duplicate_of: np.ndarray) -> np.ndarray:
        """Probabilities per row: the fold model that never saw a duplicated reference row, else the
        average of the fold models."""
        proba = np.zeros((len(x), self.n_classes))
        new = duplicate_of < 0
        if new.any():
            for model in self.models:
                proba[new] += self._expand(model, x[new], self.n_classes)
            proba[new] /= len(self.models)
        dup = np.flatnonzero(~new)
        if len(dup):
            proba[dup] = self.oof_proba[duplicate_of[dup]]
        return proba

    def scan(self, x: np.ndarray, y: np.ndarray, *, duplicate_of: np.ndarray,
             groups: Sequence[tuple[str, np.ndarray, np.ndarray]], alpha: float, global_share: float,
             min_group_rows: int = 20, deff: float = 1.0, seed: int = 0) -> Scan:
        """Test the drop (x, y) and each subgroup ``(name, drop_mask, reference_mask)`` at ``alpha``."""
        proba = self.predict(x, duplicate_of)
        c = surprise(proba, y, self.p_min)
        ref = self.oof_surprise
        big_n = len(ref)
        m_ref, v_ref = float(ref.mean()), max(float(ref.var()), 1e-12)
        n = len(c)
        new = duplicate_of < 0
        n_new = int(new.sum())
        observed = float(c.sum())
        variance = v_ref * (n + n_new ** 2 / big_n) * deff
        z_global = (observed - n * m_ref) / math.sqrt(variance)

        z_groups: dict[str, float] = {}
        rows: dict[str, int] = {}
        masks = []
        for name, mask, ref_mask in groups:
            n_g = int(mask.sum())
            if n_g < min_group_rows:
                continue
            ref_g = ref[ref_mask]
            big_g = len(ref_g)
            m_g = (float(ref_g.sum()) + GROUP_PRIOR_ROWS * m_ref) / (big_g + GROUP_PRIOR_ROWS)
            v_g = (float(((ref_g - m_g) ** 2).sum()) + GROUP_PRIOR_ROWS * v_ref) / (big_g + GROUP_PRIOR_ROWS)
            new_g = int((mask & new).sum())
            var_g = max(v_g, 1e-12) * (n_g + new_g ** 2 / (big_g + GROUP_PRIOR_ROWS)) * deff
            z_groups[name] = (float(c[mask].sum()) - n_g * m_g) / math.sqrt(var_g)
            rows[name] = n_g
            masks.append(mask)
        limit_global = NormalDist().inv_cdf(1 - alpha * global_share)
        limit_groups = _group_limit(masks, n, alpha, limit_global, seed) if masks else NO_LIMIT
        label_p = proba[np.arange(n), np.maximum(y, 0)] * (y >= 0)
        return Scan(z_global, limit_global, z_groups, rows, limit_groups, 1.0 - label_p, c,
                    observed, n * m_ref, int((~new).sum()),
                    {"reference_mean": m_ref, "reference_sd": math.sqrt(v_ref)})


def _group_limit(masks: list[np.ndarray], n: int, alpha: float, limit_global: float, seed: int) -> float:
    """The subgroup limit that makes P(global > its limit or max subgroup > this) = alpha under the null.

    The statistics are (approximately) jointly normal with correlations given by row overlaps:
    corr(g, h) = |g & h| / sqrt(|g| |h|), corr(global, g) = sqrt(|g| / n).
    """
    indicator = np.stack(masks, axis=1).astype(np.float32)
    overlap = (indicator.T @ indicator).astype(np.float64)
    sizes = np.diag(overlap).copy()
    g = len(sizes)
    corr = np.empty((g + 1, g + 1))
    corr[0, 0] = 1.0
    corr[0, 1:] = corr[1:, 0] = np.sqrt(sizes / n)
    corr[1:, 1:] = overlap / np.sqrt(np.outer(sizes, sizes))
    values, vectors = np.linalg.eigh(corr)
    root = vectors * np.sqrt(np.clip(values, 0, None))
    draws = np.random.default_rng(seed).standard_normal((NULL_DRAWS, g + 1)) @ root.T
    worst = draws[:, 1:].max(axis=1)
    worst[draws[:, 0] > limit_global] = np.inf      # already a false alarm through the global test
    budget = alpha - (1 - NormalDist().cdf(limit_global))
    if budget <= 0:          # the whole budget went to the global test: subgroups never block
        return NO_LIMIT
    return float(np.quantile(worst, 1 - alpha, method="higher"))


# -- subgroups ----------------------------------------------------------------------------------------
#: reference quantiles that bound each numeric feature's bins (the tails get their own bins, where a
#: backdoor trigger's rare values land)
BIN_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def subgroups(drop: pd.DataFrame, reference: pd.DataFrame, *, label: str, numeric: Sequence[str],
              categorical: Sequence[str], drop_labels: np.ndarray, reference_labels: np.ndarray,
              classes: Sequence[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, drop_mask, reference_mask)`` for each categorical value, numeric quantile bin and label class."""
    import pandas as pd

    groups: list[tuple[str, np.ndarray, np.ndarray]] = []
    for column in categorical:
        drop_values = drop[column].astype(str).to_numpy()
        ref_values = reference[column].astype(str).to_numpy()
        for value in pd.unique(reference[column].dropna().astype(str)):
            groups.append((f"{column}={value}", drop_values == value, ref_values == value))
    for column in numeric:
        ref = reference[column].to_numpy(dtype=np.float64, na_value=np.nan)
        finite = ref[np.isfinite(ref)]
        if not len(finite):
            continue
        edges = np.unique(np.quantile(finite, BIN_QUANTILES))
        values = drop[column].to_numpy(dtype=np.float64, na_value=np.nan)
        drop_bin = np.where(np.isfinite(values), np.searchsorted(edges, values, side="right"), -1)
        ref_bin = np.where(np.isfinite(ref), np.searchsorted(edges, ref, side="right"), -1)
        for b in range(len(edges) + 1):
            low = f"{edges[b - 1]:.4g}" if b > 0 else "-inf"
            high = f"{edges[b]:.4g}" if b < len(edges) else "inf"
            groups.append((f"{column} in ({low}, {high}]", drop_bin == b, ref_bin == b))
    for code, name in enumerate(classes):
        groups.append((f"{label}={name}", drop_labels == code, reference_labels == code))
    return groups
