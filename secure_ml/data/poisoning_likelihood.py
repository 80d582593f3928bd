"""Label likelihood under a model of the reference: the drop-level test near its statistical limit.

    model = ReferenceModel.fit(x_ref, y_ref, n_classes=2, folds=5, seed=0)   # out-of-fold scores too
    scan = model.scan(x_drop, y_drop, duplicate_of=dup, groups=groups, alpha=0.045, global_share=0.75)
    scan.z_global, scan.limit_global            # the whole drop's label surprise, as a z statistic
    scan.worst_group, scan.z_groups             # the most surprising subgroup (one value, bin or label)
    scan.row_suspicion                          # 1 - calibrated probability of each row's label
    pooled = ReferenceModel.cross_fit(x_ref, y_ref, x_drop, y_drop, duplicate_of=dup, drop_clusters=codes,
                                      n_classes=2)           # drop and reference pooled, every row out of fold

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
simulation (labels drawn from the model's own probabilities for the reference and the drop, every
statistic recomputed), so that P(global over or any subgroup over) = alpha under that null,
whatever the groups' sizes, overlaps and skew.

That null trusts the model's probabilities; on a nearly separable table the model is
over-confident and its probabilities understate how often a clean row is confidently wrong. So both
limits are also calibrated by permutation, which trusts nothing but exchangeability: the observed
scores of the drop's and the reference's rows (their real labels, out of fold) are shuffled between
the two and every statistic recomputed. Each limit is the larger of the two; the scan's
``detail["limits"]`` holds every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from secure_ml.errors import BadInput

if TYPE_CHECKING:
    import pandas as pd

#: shrinkage (in reference rows) of a subgroup's OOF centre and variance towards the global ones
GROUP_PRIOR_ROWS = 30.0
#: simulated draws of the subgroup null (deterministic seed)
NULL_DRAWS = 2000
#: shuffles of the permutation null (deterministic seed)
PERMUTATIONS = 1000
#: subgroup z statistics mapped to a normal scale by their null's skewness (``normal_equivalent``); off:
#: measured on the bench's targeted-flip seeds it moved the limit and the attacked group alike (0.775 both)
SKEW_CORRECTED = False
#: the largest skewness the mapping corrects for (beyond it the first-order expansion is poor)
MAX_SKEW = 2.0
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


def _draw(proba: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` label draws per row from its class probabilities (draws x rows)."""
    u = rng.random((size, len(proba)))
    if proba.shape[1] == 2:                                   # the common case, without a draws x rows x 2 array
        return (u > proba[:, 0]).astype(np.int64)
    cumulative = np.cumsum(proba, axis=1)
    return np.minimum((u[:, :, None] > cumulative[None, :, :]).sum(axis=2), proba.shape[1] - 1)


def _scores(proba: np.ndarray, p_min: float, bounded: bool) -> np.ndarray:
    """s(c) for every row and class: the flip's efficient score, or (bounded) the disagreement 1 - p."""
    if bounded:
        return 1.0 - proba
    k = proba.shape[1]
    return (1.0 - np.clip(proba, p_min, 1.0)) / ((k - 1) * np.clip(proba, p_min, 1.0))


def disagreement(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Centred disagreement with the calibrated probability: (1 - p(y)) - E_p[1 - p] (bounded)."""
    s = 1.0 - proba
    return s[np.arange(len(y)), np.maximum(y, 0)] - (proba * s).sum(axis=1)


def _surprise_draws(proba: np.ndarray, y: np.ndarray, p_min: float, bounded: bool = False) -> np.ndarray:
    s = _scores(proba, p_min, bounded)
    expected = (proba * s).sum(axis=1)
    return s[np.arange(s.shape[0])[None, :], y] - expected


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
    oof_labels: np.ndarray
    #: cross-fitted: the drop's own out-of-fold probabilities (``cross_fit``), used instead of ``predict``
    drop_proba: np.ndarray | None = None
    drop_fold: np.ndarray | None = None

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
        return cls(models, fold_of, oof, surprise(oof, y, p_min), n_classes, p_min, present, y)

    @classmethod
    def cross_fit(cls, x: np.ndarray, y: np.ndarray, x_drop: np.ndarray, y_drop: np.ndarray, *,
                  duplicate_of: np.ndarray, drop_clusters: np.ndarray, n_classes: int, folds: int = 10,
                  seed: int = 0, p_min: float = 0.02, c: float = 1.0) -> ReferenceModel | None:
        """Fold models fitted on the reference and the drop pooled: every row of both, reference and
        drop alike, is scored by the one fold model that never saw it, so each model learns from
        about twice the rows a reference-only model has (better probabilities where the reference
        is small). A drop row that repeats a reference row shares that row's fold, and identical
        drop rows (``drop_clusters``: one code per distinct row) share one fold, so no row is
        scored by a model that saw its twin. Each model is fitted on both sides' rows alike (only the
        fold assignment differs: stratified on the reference, random by distinct row on the drop),
        so under no poisoning their scores stay nearly exchangeable and the scan's permutation null
        close to exact; the flips'
        pull on the fitted model is shared by both sides' scores, and the drop-versus-reference
        contrast the scan measures keeps its sign and most of its size.
        None when the reference cannot support the model (a class with fewer rows than folds)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold

        keep = y >= 0
        counts = np.bincount(y[keep], minlength=n_classes)
        present = np.flatnonzero(counts)
        if len(present) < 2 or counts[present].min() < folds:
            return None
        fold_of = np.full(len(y), -1, dtype=np.int16)
        rows = np.flatnonzero(keep)
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for f, (_, test) in enumerate(splitter.split(x[rows], y[rows])):
            fold_of[rows[test]] = f
        drop_fold = np.full(len(y_drop), -1, dtype=np.int16)
        dup = duplicate_of >= 0
        drop_fold[dup] = fold_of[duplicate_of[dup]]
        new = ~dup & (y_drop >= 0)
        codes, cluster = np.unique(drop_clusters[new], return_inverse=True)
        order = np.random.default_rng(seed).permutation(len(codes))
        drop_fold[np.flatnonzero(new)] = (order % folds)[cluster]
        pooled_x, pooled_y = np.concatenate([x, x_drop]), np.concatenate([y, y_drop])
        pooled_fold = np.concatenate([fold_of, drop_fold])
        proba = np.full((len(pooled_y), n_classes), 1.0 / n_classes)
        models = []
        for f in range(folds):
            train, test = (pooled_fold != f) & (pooled_fold >= 0), pooled_fold == f
            model = LogisticRegression(C=c, max_iter=500)
            model.fit(pooled_x[train], pooled_y[train])
            models.append(model)
            if test.any():
                proba[test] = cls._expand(model, pooled_x[test], n_classes)
        oof, drop_proba = proba[:len(y)], proba[len(y):]
        dup_rows = np.flatnonzero(dup)
        drop_proba[dup_rows] = oof[duplicate_of[dup_rows]]      # a repeated row: exactly its twin's score
        return cls(models, fold_of, oof, surprise(oof, y, p_min), n_classes, p_min, present, y, drop_proba,
                   drop_fold)

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

    def _limits(self, proba: np.ndarray, duplicate_of: np.ndarray, drop_in: np.ndarray, ref_in: np.ndarray,
                new_in: np.ndarray, alpha: float, global_share: float, n_new: int, seed: int,
                min_rows: int, c_obs: np.ndarray, d_obs: np.ndarray
                ) -> tuple[float, float, dict[str, float], tuple[np.ndarray, ...] | None]:
        """(global limit, subgroup limit), calibrated by simulation: labels drawn from the model's own
        probabilities, for the reference (its OOF probabilities) and the drop alike, then every
        statistic computed as for the real drop. Skewed scores and small groups get the limits they
        need, not normal ones; the global limit is never below the normal one, nor below the
        permutation null's (``_permuted``), which does not assume the probabilities are right."""
        rng = np.random.default_rng(seed)
        n, big_n = len(proba), len(self.oof_proba)
        cells = (n + big_n) * max(drop_in.shape[1], 1)
        draws = int(min(NULL_DRAWS, max(200, 4e8 // cells)))
        dup = duplicate_of >= 0
        z_global, z_worst = [], []
        for start in range(0, draws, 100):
            size = min(100, draws - start)
            y_ref = _draw(self.oof_proba, size, rng)
            y_drop = _draw(proba, size, rng)
            y_drop[:, dup] = y_ref[:, duplicate_of[dup]]           # a repeated row repeats its label draw
            ref = _surprise_draws(self.oof_proba, y_ref, self.p_min)
            c = _surprise_draws(proba, y_drop, self.p_min)
            m_ref, v_ref = ref.mean(axis=1), np.maximum(ref.var(axis=1), 1e-12)
            z_global.append((c.sum(axis=1) - n * m_ref) / np.sqrt(v_ref * (n + n_new ** 2 / big_n)))
            if drop_in.shape[1]:
                ref_d = _surprise_draws(self.oof_proba, y_ref, self.p_min, bounded=True)
                c_d = _surprise_draws(proba, y_drop, self.p_min, bounded=True)
                z_worst.append(_group_z(c_d, ref_d, drop_in, ref_in, new_in, 1.0))
            else:
                z_worst.append(np.full(size, -np.inf))
        simulated = np.concatenate(z_global)
        shape = None
        if drop_in.shape[1]:
            z_all = np.concatenate(z_worst)
            shape = _null_shape(z_all) if SKEW_CORRECTED else None
            z_worst = [normal_equivalent(z_all, shape).max(axis=1)]
        e_global, e_worst = self._permuted(c_obs, d_obs, drop_in, ref_in, n_new, min(draws, PERMUTATIONS),
                                           min_rows, rng, shape)
        parts = {"normal": NormalDist().inv_cdf(1 - alpha * global_share),
                 "global_model": float(np.quantile(simulated, 1 - alpha * global_share)),
                 "global_permuted": float(np.quantile(e_global, 1 - alpha * global_share))}
        limit_global = max(parts["normal"], parts["global_model"], parts["global_permuted"])
        if not drop_in.shape[1]:
            return limit_global, NO_LIMIT, parts, None
        parts["groups_model"] = _limit_from_draws(simulated, np.concatenate(z_worst), alpha, limit_global)
        parts["groups_permuted"] = _limit_from_draws(e_global, e_worst, alpha, limit_global)
        return limit_global, max(parts["groups_model"], parts["groups_permuted"]), parts, shape

    def _permuted(self, c: np.ndarray, d: np.ndarray, drop_in: np.ndarray, ref_in: np.ndarray, n_new: int,
                  draws: int, min_rows: int, rng: np.random.Generator,
                  shape: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The same statistics with the rows' observed scores shuffled between the drop and the
        reference (a permutation null: under no poisoning the two are exchangeable). It needs no
        trust in the model's probabilities: where the model is over-confident (a nearly separable
        table) they understate the scores' tail; the rows' real labels do not. ``c``/``d``: the
        drop's surprise and disagreement.

        Every statistic is a function of a few sums over each side (overall and per subgroup), and
        one side's sums are the pool's less the other's: each shuffle draws only the smaller side's
        rows (without replacement) and sums over them, so its cost grows with the smaller side, not
        with the drop (a 20,000-row drop against a 1,000-row reference costs as 1,000 rows)."""
        n, big_n = len(c), len(self.oof_surprise)
        pool_c = np.concatenate([c, self.oof_surprise])
        pool_d = np.concatenate([d, disagreement(self.oof_proba, self.oof_labels)])
        groups = np.concatenate([drop_in, ref_in]).astype(np.float64)
        k = groups.shape[1]
        values = np.column_stack([pool_c, pool_c ** 2, pool_d, pool_d ** 2, np.ones(n + big_n)])
        total, total_g = values.sum(axis=0), values.T @ groups
        side, drop_side = min(n, big_n), n <= big_n
        chunk = max(1, int(4e6 // (side * (k + len(total)))))     # bounded memory per batch of shuffles
        z_global, z_worst = [], []
        for start in range(0, draws, chunk):
            picked = np.stack([rng.choice(n + big_n, side, replace=False) for _ in range(min(chunk, draws - start))])
            v = values[picked]                                        # shuffles x side rows x sums
            sums, sums_g = v.sum(axis=1), np.matmul(v.transpose(0, 2, 1), groups[picked])
            other, other_g = total - sums, total_g - sums_g
            (d_tot, d_g), (r_tot, r_g) = ((sums, sums_g), (other, other_g)) if drop_side else \
                ((other, other_g), (sums, sums_g))
            m_ref = r_tot[:, 0] / big_n
            v_ref = np.maximum(r_tot[:, 1] / big_n - m_ref ** 2, 1e-12)
            z_global.append((d_tot[:, 0] - n * m_ref) / np.sqrt(v_ref * (n + n_new ** 2 / big_n)))
            if not k:
                z_worst.append(np.full(len(picked), -np.inf))
                continue
            m_all = (r_tot[:, 2] / big_n)[:, None]
            v_all = np.maximum((r_tot[:, 3] / big_n)[:, None] - m_all ** 2, 1e-12)
            big_g, s1, s2 = r_g[:, 4], r_g[:, 2], r_g[:, 3]
            weight = big_g + GROUP_PRIOR_ROWS
            m_g = (s1 + GROUP_PRIOR_ROWS * m_all) / weight
            v_g = np.maximum((s2 - 2 * m_g * s1 + big_g * m_g ** 2 + GROUP_PRIOR_ROWS * v_all) / weight, 1e-12)
            n_g = d_g[:, 4]
            new_g = n_g * (n_new / max(n, 1))
            z = (d_g[:, 2] - n_g * m_g) / np.sqrt(v_g * (n_g + new_g ** 2 / weight))
            z_worst.append(np.where(n_g >= min_rows - 0.5, normal_equivalent(z, shape), -np.inf).max(axis=1))
        return np.concatenate(z_global), np.concatenate(z_worst)

    def scan(self, x: np.ndarray, y: np.ndarray, *, duplicate_of: np.ndarray,
             groups: Sequence[tuple[str, np.ndarray, np.ndarray]], alpha: float, global_share: float,
             min_group_rows: int = 20, deff: float = 1.0, seed: int = 0) -> Scan:
        """Test the drop (x, y) and each subgroup ``(name, drop_mask, reference_mask)`` at ``alpha``."""
        if self.drop_proba is not None and len(self.drop_proba) != len(x):
            raise BadInput(f"a cross-fitted model scores only the drop it was fitted with ({len(self.drop_proba)} "
                           f"rows), not {len(x)} rows")
        proba = self.predict(x, duplicate_of) if self.drop_proba is None else self.drop_proba
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

        kept = [(name, mask, ref_mask) for name, mask, ref_mask in groups if int(mask.sum()) >= min_group_rows]
        names = [name for name, _, _ in kept]
        z_groups: dict[str, float] = {}
        rows: dict[str, int] = {}
        drop_in = np.zeros((n, 0), dtype=np.float32)
        ref_in = np.zeros((big_n, 0), dtype=np.float32)
        if kept:
            drop_in = np.stack([m for _, m, _ in kept], axis=1).astype(np.float32)
            ref_in = np.stack([r for _, _, r in kept], axis=1).astype(np.float32)
        new_in = drop_in * new[:, None]
        if kept:
            # Subgroups use the bounded disagreement: in a small group one confidently-wrong clean row
            # would otherwise decide, and the limit that heavy tail needs would cost all the power.
            z = _group_z(disagreement(proba, y)[None, :], disagreement(self.oof_proba, self.oof_labels)[None, :],
                         drop_in, ref_in, new_in, deff)[0]
            z_groups = {name: float(v) for name, v in zip(names, z, strict=True)}
            rows = {name: int(v) for name, v in zip(names, drop_in.sum(axis=0), strict=True)}
        limit_global, limit_groups, parts, shape = self._limits(proba, duplicate_of, drop_in, ref_in, new_in, alpha,
                                                  global_share, n_new, seed, min_group_rows, c,
                                                  disagreement(proba, y))
        if kept and shape is not None:     # each group's z on the scale the limit is set on
            z_groups = {name: float(v) for name, v in zip(names, normal_equivalent(z[None, :], shape)[0], strict=True)}
        label_p = proba[np.arange(n), np.maximum(y, 0)] * (y >= 0)
        return Scan(z_global, limit_global, z_groups, rows, limit_groups, 1.0 - label_p, c,
                    observed, n * m_ref, int((~new).sum()),
                    {"reference_mean": m_ref, "reference_sd": math.sqrt(v_ref), "limits": parts})


def _group_z(c: np.ndarray, ref: np.ndarray, drop_in: np.ndarray, ref_in: np.ndarray, new_in: np.ndarray,
             deff: float) -> np.ndarray:
    """Subgroup z statistics for each row of ``c`` (draws x drop rows) against ``ref`` (draws x
    reference rows): each group's total against its reference OOF centre (shrunk towards the global
    one), its variance counting the drop's noise and the centre's."""
    m_ref = ref.mean(axis=1, keepdims=True)
    v_ref = np.maximum(ref.var(axis=1, keepdims=True), 1e-12)
    big_g = ref_in.sum(axis=0)[None, :]
    weight = big_g + GROUP_PRIOR_ROWS
    m_g = (ref @ ref_in + GROUP_PRIOR_ROWS * m_ref) / weight
    squares = (ref ** 2) @ ref_in - 2 * m_g * (ref @ ref_in) + big_g * m_g ** 2      # sum over g of (r - m_g)^2
    v_g = np.maximum((squares + GROUP_PRIOR_ROWS * v_ref) / weight, 1e-12)
    n_g = drop_in.sum(axis=0)[None, :]
    new_g = new_in.sum(axis=0)[None, :]
    variance = v_g * (n_g + new_g ** 2 / weight) * deff
    return np.asarray((c @ drop_in - n_g * m_g) / np.sqrt(variance))


def _null_shape(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard deviation and skewness (clipped to [0, MAX_SKEW]) of each group's z over the
    model's null draws (draws x groups)."""
    mean = z.mean(axis=0)
    sd = np.maximum(z.std(axis=0), 1e-9)
    skew = (((z - mean) / sd) ** 3).mean(axis=0)
    return mean, sd, np.clip(skew, 0.0, MAX_SKEW)


def normal_equivalent(z: np.ndarray, shape: tuple[np.ndarray, ...] | None) -> np.ndarray:
    """Each group's z mapped to the standard normal value of the same null tail (Cornish-Fisher,
    first order in the skewness g: z = m + s (u + g (u^2 - 1) / 6), solved for u). A small group's
    bounded, skewed statistic then no longer sets the scan's limit for every group. Non-decreasing in z,
    so the limits, set on draws of the mapped values, keep their false-alarm rate (flat only deep in
    the left tail, where no limit lies). None: unchanged."""
    if shape is None:
        return z
    mean, sd, skew = shape
    t = (z - mean) / sd
    a = skew / 6.0
    with np.errstate(invalid="ignore", divide="ignore"):
        root = (np.sqrt(np.maximum(1.0 + 4.0 * a * (a + t), 0.0)) - 1.0) / (2.0 * a)
    return np.where(a > 1e-6, root, t)


def _limit_from_draws(z_global: np.ndarray, z_worst: np.ndarray, alpha: float, limit_global: float) -> float:
    """The subgroup limit that makes P(global over its limit or worst subgroup over this) = alpha."""
    worst = np.where(z_global > limit_global, np.inf, z_worst)   # already a false alarm via the global test
    limit = float(np.quantile(worst, 1 - alpha, method="higher"))
    return limit if math.isfinite(limit) else NO_LIMIT


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
