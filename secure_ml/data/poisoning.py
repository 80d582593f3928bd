"""Poisoning screening: is this data drop consistent with the last version we trusted?

    report = screen(drop, reference, label="risk", numeric=[...], categorical=[...])
    report.blocked, report.drop_score          # drop-level verdict against the configured limits
    report.row_scores                          # per-row suspicion in [0, 1] (numpy array, drop order)
    report.summary()                           # JSON-ready: each detector's score, limit, count, indices

    config = ScreeningConfig.from_mapping(settings.load_config("validation")["poisoning"])
    report = screen(drop, reference, label=..., numeric=..., categorical=..., config=config)

Six detectors, each reporting a score, its limit, a count and the first 50 row positions (0-based
data rows of the drop, most suspicious first):

``outliers``
    per-feature statistical outliers: numeric values far outside the reference's spread (robust z
    against the reference median/MAD) and categories the reference never had. Score: how many
    standard errors the drop's outlier rate is above the reference's own rate.
``label_neighbours``
    label consistency against the *reference's* neighbourhood. A row with an exact (or near)
    duplicate in the reference must carry one of the labels the reference gave it; any other row is
    compared with the labels of its k nearest reference rows. Score: a one-sided z statistic of the
    drop's disagreement against what the reference's own label noise predicts (the Gini impurity of
    each neighbourhood), so ordinary label noise does not count and flipped labels do.
``label_cross_validated``
    confident learning (Northcutt et al.): out-of-fold predicted probabilities from a
    cross-validated logistic regression on the drop, per-class confidence thresholds, and the share
    of rows whose confident class is not their label, compared with the same share on the reference.
``label_likelihood``
    the test near the statistical limit for new rows (secure_ml/data/poisoning_likelihood.py): each row's
    label scored by the efficient score of a label flip under a logistic model fitted on the
    reference, out of fold where the row repeats a reference row, and the drop's total compared with
    what clean drops of the same size give by the reference's own out-of-fold scores. Score: z.
``label_subgroups``
    the same statistic in every subgroup (categorical value, numeric quantile bin, observed label
    class), for flips aimed at one region, backdoor triggers and class-conditional flips. Score: the
    largest z; ``worst_subgroup`` names the group.
``shift``
    population stability index (PSI) of every feature and of the label balance against the
    reference, above the PSI two samples of one population show anyway ((bins - 1)(1/n + 1/N)).
    Score: the largest such excess.

The drop score is the largest ``score / limit`` over detectors; the drop is blocked when it passes
``threshold`` (1.0 by default: any detector over its limit). One false-alarm rate, ``alpha`` (5%),
covers all of them: the likelihood scan's limits are computed for each drop at ``alpha -
legacy_alpha``; the other four have fixed limits calibrated on clean bootstrap resamples of the
trusted sample (seeds 10000+, distinct from the benchmark's) to stay within ``legacy_alpha``; see
``secure_ml/config/validation.yaml``. With no reference at all (a first version whose schema pins
no sample) the drop is blocked unless a data steward's sign-off is passed in.

At scale, the model-based parts (nearest neighbours, cross-validated predictions) run on a
deterministic subsample of at most ``max_model_rows`` rows of the drop and of the reference; the
exact-duplicate check, outliers and shift always use every row. ``report.subsampled`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from secure_ml.data.poisoning_attacks import bootstrap, flip_labels  # noqa: F401 - re-exported for callers
from secure_ml.data.poisoning_features import (  # noqa: F401 - FeatureSpace, psi, confident_learning_issues re-exported
    FIRST_INDICES, FeatureSpace, _codes, _cross_validated_proba, _excess_z, _label_text, _round, _row_keys, _subsample,
    _top, confident_learning_issues, psi)
from secure_ml.errors import BadInput, ConfigurationError

#: with no reference, the outlier rate a first version may have before it counts as excess
FIRST_VERSION_OUTLIER_RATE = 0.05
_NEAR_DUPLICATE = 1e-3  # encoded distance under which a reference row counts as the same record


@dataclass(frozen=True)
class ScreeningConfig:
    """Limits and knobs; the defaults are the calibrated ones shipped in validation.yaml."""

    threshold: float = 1.0
    outliers_limit: float = 8.0
    outlier_z: float = 6.0
    neighbours_limit: float = 5.0
    neighbours_k: int = 15
    duplicate_mismatch_rate: float = 0.01
    cross_validated_limit: float = 8.0
    cv_folds: int = 5
    shift_limit: float = 0.25
    max_model_rows: int = 20_000
    seed: int = 0
    # the label-likelihood scan (secure_ml.poisoning_likelihood): one false-alarm rate for all detectors
    alpha: float = 0.05
    legacy_alpha: float = 0.005
    global_share: float = 0.75
    likelihood_folds: int = 10
    # score drop and reference rows by fold models fitted on both pooled (ReferenceModel.cross_fit); off:
    # measured on the bench's targeted flips it did not help (README, poisoning screening); Python only
    likelihood_cross_fit: bool = False
    p_min: float = 0.1
    min_group_rows: int = 20

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> ScreeningConfig:
        """From validation.yaml's ``poisoning`` section; unknown keys are a configuration error."""
        raw = dict(raw or {})
        detectors = dict(raw.pop("detectors", {}) or {})
        flat: dict[str, Any] = {}
        for key in ("threshold", "max_model_rows", "seed", "alpha", "legacy_alpha"):
            if key in raw:
                flat[key] = raw.pop(key)
        if raw:
            raise ConfigurationError(f"validation.yaml poisoning: unknown keys {sorted(raw)}")
        names = {
            "outliers": {"limit": "outliers_limit", "robust_z": "outlier_z"},
            "label_neighbours": {"limit": "neighbours_limit", "k": "neighbours_k",
                                 "duplicate_mismatch_rate": "duplicate_mismatch_rate"},
            "label_cross_validated": {"limit": "cross_validated_limit", "folds": "cv_folds"},
            "shift": {"limit": "shift_limit"},
            "label_likelihood": {"folds": "likelihood_folds", "p_min": "p_min", "global_share": "global_share"},
            "label_subgroups": {"min_rows": "min_group_rows"},
        }
        for detector, values in detectors.items():
            if detector not in names:
                raise ConfigurationError(f"validation.yaml poisoning: unknown detector {detector!r}")
            for key, value in dict(values or {}).items():
                if key not in names[detector]:
                    raise ConfigurationError(f"validation.yaml poisoning.detectors.{detector}: unknown key {key!r}")
                flat[names[detector][key]] = value
        try:
            config = cls(**{k: type(getattr(cls, k))(v) for k, v in flat.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"validation.yaml poisoning: {exc}") from None
        if config.threshold <= 0 or config.neighbours_k < 1 or config.cv_folds < 2 or config.max_model_rows < 100:
            raise ConfigurationError("validation.yaml poisoning: threshold > 0, k >= 1, folds >= 2, "
                                     "max_model_rows >= 100 are required")
        if not (0 < config.alpha < 0.5 and 0 <= config.legacy_alpha < config.alpha and 0 < config.global_share <= 1
                and config.likelihood_folds >= 2 and 0 < config.p_min < 0.5 and config.min_group_rows >= 5):
            raise ConfigurationError("validation.yaml poisoning: 0 < alpha < 0.5, 0 <= legacy_alpha < alpha, "
                                     "0 < global_share <= 1, label_likelihood folds >= 2, 0 < p_min < 0.5 and "
                                     "label_subgroups min_rows >= 5 are required")
        return config


@dataclass
class DetectorResult:
    name: str
    score: float
    limit: float
    count: int
    indices: list[int]
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.score / self.limit if self.limit else float("inf")

    @property
    def over(self) -> bool:
        return self.score > self.limit

    def summary(self) -> dict[str, Any]:
        return {"score": _round(self.score), "limit": self.limit, "ratio": _round(self.ratio),
                "count": self.count, "indices": self.indices, "over_limit": self.over, **self.detail}


@dataclass
class PoisoningReport:
    detectors: list[DetectorResult]
    threshold: float
    row_scores: np.ndarray
    rows: int
    reference_rows: int
    subsampled: str = ""
    design_effect: float = 1.0
    #: why the drop has no trusted yardstick (a first version without a reference); "" when it has one
    unguarded: str = ""
    #: the data steward's sign-off that accepts an unguarded first version (who, when, audit entry)
    sign_off: dict[str, Any] | None = None

    @property
    def drop_score(self) -> float:
        return max((d.ratio for d in self.detectors), default=0.0)

    @property
    def blocked(self) -> bool:
        # A first version judged only against itself would become every later drop's yardstick.
        return self.drop_score > self.threshold or bool(self.unguarded and not self.sign_off)

    def detector(self, name: str) -> DetectorResult:
        return next(d for d in self.detectors if d.name == name)

    def reasons(self) -> list[str]:
        """One sentence per detector over its limit."""
        reasons = []
        if self.unguarded and not self.sign_off:
            reasons.append(self.unguarded)
        for d in self.detectors:
            if not d.over:
                continue
            where = f" in subgroup {d.detail['worst_subgroup']}" if d.detail.get("worst_subgroup") else ""
            reasons.append(f"{d.name} score {d.score:.3g} is over its limit {d.limit:.3g}{where} "
                           f"({d.count} {'subgroups' if d.name == 'label_subgroups' else 'rows'} flagged; "
                           f"first rows: {d.indices[:10]})")
        return reasons

    def summary(self) -> dict[str, Any]:
        return {
            "drop_score": _round(self.drop_score),
            "threshold": self.threshold,
            "blocked": self.blocked,
            "rows": self.rows,
            "reference_rows": self.reference_rows,
            "subsampled": self.subsampled,
            "duplicate_design_effect": _round(self.design_effect),
            "detectors": {d.name: d.summary() for d in self.detectors},
            "first_version": {"unguarded": self.unguarded, "sign_off": self.sign_off},
        }


# -- the encoded feature space -------------------------------------------------------------------
# -- screening -----------------------------------------------------------------------------------
def screen(
    drop: pd.DataFrame,
    reference: pd.DataFrame | None,
    *,
    label: str,
    numeric: Sequence[str],
    categorical: Sequence[str],
    config: ScreeningConfig | None = None,
    sign_off: Mapping[str, Any] | None = None,
) -> PoisoningReport:
    """Screen ``drop`` against ``reference`` (the last accepted version or the pinned sample).

    With no reference the drop is blocked unless ``sign_off`` (a data steward's recorded sign-off for
    this very drop) is given: a first version screened only against itself is no evidence.
    """
    from threadpoolctl import threadpool_limits

    # Small dense problems: BLAS threads only contend (10x slower on a busy 2-core machine).
    with threadpool_limits(limits=1):
        report = _screen(drop, reference, label=label, numeric=numeric, categorical=categorical,
                         config=config or ScreeningConfig())
    if report.reference_rows == 0:
        report.unguarded = ("no trusted reference: a first version cannot be accepted on its own screening; "
                            "pin a reference sample in the schema (secure-ml schema init) or have a data "
                            "steward sign the drop off (secure-ml data sign-off)")
        report.sign_off = dict(sign_off) if sign_off else None
    return report


def _screen(drop: pd.DataFrame, reference: pd.DataFrame | None, *, label: str, numeric: Sequence[str],
            categorical: Sequence[str], config: ScreeningConfig) -> PoisoningReport:
    features = [*numeric, *categorical]
    missing = [c for c in [label, *features] if c not in drop.columns]
    if missing:
        raise BadInput(f"poisoning screening: the drop lacks columns {missing}")
    if len(drop) == 0:
        raise BadInput("poisoning screening: the drop has no rows")
    if reference is not None:
        missing = [c for c in [label, *features] if c not in reference.columns]
        if missing:
            raise BadInput(f"poisoning screening: the reference lacks columns {missing}")
        if len(reference) == 0:
            reference = None
    base = reference if reference is not None else drop
    space = FeatureSpace.fit(base, numeric, categorical)
    drop_labels = _label_text(drop[label])
    classes = sorted(set(_label_text(base[label]).unique().tolist()) | set(drop_labels.unique().tolist()))
    y_drop = _codes(drop_labels, classes)
    del drop_labels

    model_rows = _subsample(len(drop), config.max_model_rows, config.seed)
    ref_rows = _subsample(len(base), config.max_model_rows, config.seed + 1)
    notes = []
    if len(model_rows) < len(drop):
        notes.append(f"model-based scores on a deterministic subsample of {len(model_rows)} of {len(drop)} drop rows")
    if len(ref_rows) < len(base):
        notes.append(f"nearest neighbours among a deterministic subsample of {len(ref_rows)} of {len(base)} reference rows")

    # Identical rows within a drop are not independent evidence: inflate variances by the design
    # effect of these clusters (sum of squared cluster sizes / rows; 1 when every row is distinct).
    drop_keys = _row_keys(drop, [label, *features])
    sizes = pd.Series(drop_keys).value_counts().to_numpy(dtype=np.float64)
    deff = float((sizes ** 2).sum() / len(drop))
    detectors = [_outliers(drop, base, numeric, categorical, config, is_reference=reference is not None, deff=deff)]
    row_scores = np.zeros(len(drop))
    if reference is not None:
        neighbours, ref_score = _label_neighbours(drop, reference, y_drop, classes, space, label, features,
                                                  model_rows, ref_rows, config, deff)
        detectors.append(neighbours)
        row_scores += 0.4 * ref_score
    else:
        detectors.append(DetectorResult("label_neighbours", 0.0, config.neighbours_limit, 0, [],
                                        {"note": "no reference version yet: nothing to compare labels with"}))
    cv, cv_score = _label_cross_validated(drop, reference, y_drop, classes, space, label, model_rows, ref_rows,
                                          config, deff)
    detectors.append(cv)
    row_scores += (0.15 if reference is not None else 1.0) * cv_score
    detectors.extend(_likelihood(drop, reference, y_drop, classes, space, label, numeric, categorical,
                                 model_rows, ref_rows, config, deff, row_scores))
    detectors.append(_shift(drop, reference, label, numeric, categorical, config))
    report = PoisoningReport(detectors, config.threshold, row_scores, len(drop),
                             0 if reference is None else len(reference), "; ".join(notes))
    report.design_effect = deff
    return report


# -- (1) outliers --------------------------------------------------------------------------------
def _outlier_flags(frame: pd.DataFrame, base: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str],
                   z_limit: float) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    worst = np.zeros(len(frame))
    per_feature: dict[str, int] = {}
    for column in numeric:
        ref = base[column].to_numpy(dtype=np.float64, na_value=np.nan)
        median = float(np.nanmedian(ref))
        mad = float(np.nanmedian(np.abs(ref - median))) * 1.4826
        spread = mad if mad > 0 else (float(np.nanstd(ref)) or 1.0)
        values = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
        z = np.nan_to_num(np.abs(values - median) / spread, nan=0.0)
        per_feature[column] = int((z > z_limit).sum())
        np.maximum(worst, z, out=worst)
    flags = worst > z_limit
    for column in categorical:
        known = set(base[column].dropna().astype(str).unique().tolist())
        unseen = ~frame[column].astype(str).isin(known).to_numpy() & frame[column].notna().to_numpy()
        per_feature[column] = int(unseen.sum())
        flags |= unseen
        worst[unseen] = np.maximum(worst[unseen], z_limit * 2)
    return flags, worst, per_feature


def _outliers(drop: pd.DataFrame, base: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str],
              config: ScreeningConfig, *, is_reference: bool, deff: float) -> DetectorResult:
    flags, worst, per_feature = _outlier_flags(drop, base, numeric, categorical, config.outlier_z)
    n = len(drop)
    if is_reference:
        ref_flags, _, _ = _outlier_flags(base, base, numeric, categorical, config.outlier_z)
        rate = max(float(ref_flags.mean()), 1.0 / max(len(base), 1), 1e-3)
    else:  # a first version has no yardstick: tolerate the tail a skewed feature has anyway
        rate = FIRST_VERSION_OUTLIER_RATE
    count = int(flags.sum())
    score = _excess_z(count, n * rate, n * rate * (1 - rate) * deff)
    return DetectorResult("outliers", score, config.outliers_limit, count, _top(worst, flags),
                          {"reference_rate": _round(rate), "per_feature": per_feature,
                           "robust_z": config.outlier_z})


# -- (2a) label consistency against the reference's neighbourhood --------------------------------
def _label_neighbours(drop: pd.DataFrame, reference: pd.DataFrame, y_drop: np.ndarray, classes: list[str],
                      space: FeatureSpace, label: str, features: Sequence[str], model_rows: np.ndarray,
                      ref_rows: np.ndarray, config: ScreeningConfig, deff: float) -> tuple[DetectorResult, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    n, n_classes = len(drop), len(classes)
    y_drop_codes = y_drop
    y_ref_codes = _codes(reference[label], classes)

    # Exact duplicates, on every row: the labels the reference gave the very same record.
    ref_keys = _row_keys(reference, features)
    dup_table = pd.crosstab(pd.Series(ref_keys, name="k"), pd.Series(y_ref_codes, name="y"))
    dup_table = dup_table.reindex(columns=range(n_classes), fill_value=0)
    known = np.array(dup_table.reindex(pd.Index(_row_keys(drop, features))).fillna(0).to_numpy(dtype=np.int32))
    del dup_table, ref_keys

    # Near duplicates and neighbourhoods, on the (sub)sampled rows only (m of them).
    m = len(model_rows)
    neighbour_counts = np.zeros((m, n_classes), dtype=np.float32)
    near_counts = np.zeros((m, n_classes), dtype=np.int32)
    k = min(config.neighbours_k, len(ref_rows))
    if k >= 1:
        ref_x = space.transform(reference.iloc[ref_rows])
        ref_y = y_ref_codes[ref_rows]
        finder = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(ref_x)
        for start in range(0, m, 4096):
            distance, found = finder.kneighbors(space.transform(drop.iloc[model_rows[start:start + 4096]]))
            labels = ref_y[found]
            for c in range(n_classes):
                neighbour_counts[start:start + 4096, c] = (labels == c).sum(axis=1)
                near_counts[start:start + 4096, c] = ((labels == c) & (distance <= _NEAR_DUPLICATE)).sum(axis=1)
    known[model_rows] = np.maximum(known[model_rows], near_counts)
    is_dup = known.any(axis=1)
    prior = np.bincount(y_ref_codes[y_ref_codes >= 0], minlength=n_classes) / max(len(y_ref_codes), 1)

    # Rows seen before: disagreement is a label the reference never gave this record.
    eps = config.duplicate_mismatch_rate
    safe_y = np.maximum(y_drop_codes, 0)
    own = np.take_along_axis(known, safe_y[:, None].astype(np.intp), axis=1)[:, 0]
    dup_mismatch = is_dup & (own == 0)
    # New rows: the neighbourhood's label distribution (smoothed by the prior), and what its own
    # noise predicts the disagreement to be (Gini impurity) with that prediction's variance.
    smooth = neighbour_counts + prior
    p = smooth / smooth.sum(axis=1, keepdims=True)
    p_label = p[np.arange(m), safe_y[model_rows]]
    gini = 1 - (p ** 2).sum(axis=1)
    var_new = (p * (1 - p) ** 2).sum(axis=1) - gini ** 2
    new = ~is_dup[model_rows]

    observed = dup_mismatch.sum() + (1 - p_label[new]).sum()
    expected = is_dup.sum() * eps + gini[new].sum()
    variance = is_dup.sum() * eps * (1 - eps) + var_new[new].sum()
    score = _excess_z(float(observed), float(expected), float(variance) * deff)

    row = np.zeros(n)
    row[is_dup] = 1 - own[is_dup] / known[is_dup].sum(axis=1)
    new_rows = model_rows[new]
    row[new_rows] = 1 - p_label[new]
    flagged = dup_mismatch.copy()
    flagged[new_rows[p_label[new] < 0.2]] = True
    detail = {
        "seen_before": int(is_dup.sum()),
        "seen_before_relabelled": int(dup_mismatch.sum()),
        "new_rows_scored": int(new.sum()),
        "new_rows_disagreeing": int((p_label[new] < 0.5).sum()),
        "expected_disagreement": _round(float(expected)),
        "observed_disagreement": _round(float(observed)),
        "k": k,
    }
    return DetectorResult("label_neighbours", score, config.neighbours_limit, int(flagged.sum()),
                          _top(row, flagged), detail), row


# -- (2b) confident learning on cross-validated predictions --------------------------------------
def _label_cross_validated(drop: pd.DataFrame, reference: pd.DataFrame | None, y_drop: np.ndarray,
                           classes: list[str], space: FeatureSpace, label: str, model_rows: np.ndarray,
                           ref_rows: np.ndarray, config: ScreeningConfig, deff: float) -> tuple[DetectorResult, np.ndarray]:
    y_codes = y_drop[model_rows].astype(np.int64)
    proba = _cross_validated_proba(space.transform(drop.iloc[model_rows]), y_codes, config.cv_folds, config.seed)
    row = np.zeros(len(drop))
    if proba is None:
        return DetectorResult("label_cross_validated", 0.0, config.cross_validated_limit, 0, [],
                              {"note": f"too few rows per class for {config.cv_folds}-fold cross-validation"}), row
    issues = confident_learning_issues(proba, y_codes)
    self_confidence = proba[np.arange(len(y_codes)), y_codes]
    row[model_rows] = 1 - self_confidence
    rate = float(issues.mean())
    ref_rate = rate
    if reference is not None:
        y_ref = _codes(reference[label], classes)[ref_rows].astype(np.int64)
        keep = y_ref >= 0
        ref_proba = _cross_validated_proba(space.transform(reference.iloc[ref_rows[keep]]), y_ref[keep],
                                           config.cv_folds, config.seed)
        if ref_proba is not None:
            ref_rate = float(confident_learning_issues(ref_proba, y_ref[keep]).mean())
    n = len(y_codes)
    base_rate = min(max(ref_rate, 1e-3), 1 - 1e-3)
    score = _excess_z(rate * n, base_rate * n, n * base_rate * (1 - base_rate) * deff) if reference is not None else 0.0
    flagged = np.zeros(len(drop), dtype=bool)
    flagged[model_rows[issues]] = True
    return DetectorResult("label_cross_validated", score, config.cross_validated_limit, int(issues.sum()),
                          _top(row, flagged),
                          {"issue_rate": _round(rate), "reference_issue_rate": _round(ref_rate),
                           "rows_scored": n}), row


# -- (2c) label likelihood under a model of the reference, whole drop and subgroups -----------------
def _likelihood(drop: pd.DataFrame, reference: pd.DataFrame | None, y_drop: np.ndarray, classes: list[str],
                space: FeatureSpace, label: str, numeric: Sequence[str], categorical: Sequence[str],
                model_rows: np.ndarray, ref_rows: np.ndarray, config: ScreeningConfig, deff: float,
                row_scores: np.ndarray) -> list[DetectorResult]:
    from secure_ml.data.poisoning_likelihood import ReferenceModel, subgroups

    from statistics import NormalDist

    alpha = config.alpha - config.legacy_alpha
    limit = NormalDist().inv_cdf(1 - alpha * config.global_share)
    limits = (limit, limit)
    if reference is None:
        note = {"note": "no reference version yet: nothing to compare labels with"}
        return [DetectorResult("label_likelihood", 0.0, limits[0], 0, [], dict(note)),
                DetectorResult("label_subgroups", 0.0, limits[1], 0, [], dict(note))]
    ref = reference.iloc[ref_rows]
    y_ref = _codes(ref[label], classes).astype(np.int64)
    scored = drop.iloc[model_rows]
    y = y_drop[model_rows].astype(np.int64)
    # A drop row that repeats a reference row is scored by the fold model that never saw it.
    features = [*numeric, *categorical]
    first_of = pd.Series(np.arange(len(ref)), index=_row_keys(ref, features))
    first_of = first_of[~first_of.index.duplicated()]
    scored_keys = _row_keys(scored, features)
    duplicate_of = first_of.reindex(scored_keys).fillna(-1).to_numpy(dtype=np.int64)
    x_ref, x_scored = space.transform(ref), space.transform(scored)
    if config.likelihood_cross_fit:
        model = ReferenceModel.cross_fit(x_ref, y_ref, x_scored, y, duplicate_of=duplicate_of,
                                         drop_clusters=pd.factorize(scored_keys)[0], n_classes=len(classes),
                                         folds=config.likelihood_folds, seed=config.seed, p_min=config.p_min)
    else:
        model = ReferenceModel.fit(x_ref, y_ref, n_classes=len(classes), folds=config.likelihood_folds,
                                   seed=config.seed, p_min=config.p_min)
    if model is None:
        note = {"note": f"too few reference rows per class for {config.likelihood_folds}-fold scoring"}
        return [DetectorResult("label_likelihood", 0.0, limits[0], 0, [], dict(note)),
                DetectorResult("label_subgroups", 0.0, limits[1], 0, [], dict(note))]
    groups = subgroups(scored, ref, label=label, numeric=numeric, categorical=categorical, drop_labels=y,
                       reference_labels=y_ref, classes=classes)
    scan = model.scan(x_scored, y, duplicate_of=duplicate_of, groups=groups, alpha=alpha,
                      global_share=config.global_share, min_group_rows=config.min_group_rows, deff=deff,
                      seed=config.seed)
    row = np.zeros(len(drop))
    row[model_rows] = scan.row_suspicion
    row_scores += 0.45 * row
    suspicious = np.zeros(len(drop), dtype=bool)
    suspicious[model_rows[scan.row_suspicion > 0.8]] = True
    likelihood = DetectorResult(
        "label_likelihood", scan.z_global, scan.limit_global, int(suspicious.sum()), _top(row, suspicious),
        {"alpha": _round(alpha * config.global_share), "observed_surprise": _round(scan.observed),
         "expected_surprise": _round(scan.expected), "rows_scored": len(model_rows),
         "scored_out_of_fold": scan.duplicates, "folds": config.likelihood_folds})
    over = sorted((g for g, z in scan.z_groups.items() if z > scan.limit_groups), key=lambda g: -scan.z_groups[g])
    worst = scan.worst_group
    in_worst = np.zeros(len(drop), dtype=bool)
    if worst:
        mask = next(m for name, m, _ in groups if name == worst)
        in_worst[model_rows[mask & (scan.row_suspicion > 0.5)]] = True
    top = sorted(scan.z_groups, key=lambda g: -scan.z_groups[g])[:5]
    subgroup = DetectorResult(
        "label_subgroups", scan.z_worst_group, scan.limit_groups, len(over), _top(row, in_worst),
        {"worst_subgroup": worst, "worst_subgroup_rows": scan.group_rows.get(worst, 0),
         "subgroups_over_limit": over[:20], "most_surprising": {g: _round(scan.z_groups[g]) for g in top},
         "subgroups_tested": len(scan.z_groups), "min_rows": config.min_group_rows})
    return [likelihood, subgroup]


# -- (3) shift against the reference --------------------------------------------------------------
def _shift(drop: pd.DataFrame, reference: pd.DataFrame | None, label: str, numeric: Sequence[str],
           categorical: Sequence[str], config: ScreeningConfig) -> DetectorResult:
    if reference is None:
        return DetectorResult("shift", 0.0, config.shift_limit, 0, [],
                              {"note": "no reference version yet: nothing to compare distributions with"})
    per_feature: dict[str, float] = {}
    floor: dict[str, float] = {}     # the PSI two samples of one population show anyway: (bins - 1)(1/n + 1/N)
    sizes = 1 / max(len(drop), 1) + 1 / max(len(reference), 1)
    for column in numeric:
        ref = reference[column].to_numpy(dtype=np.float64, na_value=np.nan)
        ref = ref[np.isfinite(ref)]
        edges = np.unique(np.quantile(ref, np.linspace(0, 1, 11)[1:-1])) if len(ref) else np.array([])
        values = drop[column].to_numpy(dtype=np.float64, na_value=np.nan)
        values = values[np.isfinite(values)]
        bins = len(edges) + 1
        per_feature[column] = psi(np.bincount(np.searchsorted(edges, ref, side="right"), minlength=bins),
                                  np.bincount(np.searchsorted(edges, values, side="right"), minlength=bins))
        floor[column] = (bins - 1) * sizes
    for column in [*categorical, label]:
        ref_counts = _label_text(reference[column]).value_counts()
        drop_counts = _label_text(drop[column]).value_counts()
        cats = sorted(set(ref_counts.index) | set(drop_counts.index))
        per_feature[column] = psi(ref_counts.reindex(cats, fill_value=0).to_numpy(),
                                  drop_counts.reindex(cats, fill_value=0).to_numpy())
        floor[column] = (len(cats) - 1) * sizes
    excess = {c: v - floor[c] for c, v in per_feature.items()}
    worst = max(excess, key=lambda c: excess[c])
    ref_share = _label_text(reference[label]).value_counts(normalize=True).sort_index()
    drop_share = _label_text(drop[label]).value_counts(normalize=True).sort_index()
    over = [c for c, v in excess.items() if v > config.shift_limit]
    return DetectorResult("shift", excess[worst], config.shift_limit, len(over), [],
                          {"psi": {c: _round(v) for c, v in per_feature.items()}, "most_shifted": worst,
                           "features_over_limit": over,
                           "label_share": {str(k): _round(float(v)) for k, v in drop_share.items()},
                           "reference_label_share": {str(k): _round(float(v)) for k, v in ref_share.items()}})


# -- simulation helpers (benchmarks, tests, calibration) -----------------------------------------
