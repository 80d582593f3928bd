"""The best a subgroup scan can do: power of the optimal test with the attacked subgroup known and unknown.

    known, unknown = scan_power(p_drop, p_ref, drop_groups, ref_groups, attacked, rate=0.2)

The attack flips ``rate`` of the labels of one subgroup. Told which subgroup, the Neyman-Pearson
test sums the rows' log-likelihood ratio log(((1 - e) p(y) + e (1 - p(y))) / p(y)) over that group
and compares it with its null. Not told, the best it can do is the same statistic in every
candidate subgroup, standardised, and the maximum compared with the maximum's null: the price of
not knowing is the gap between the two. Both take the reference model's probabilities as the truth
(``p_drop``, ``p_ref``: P(y = 1) per row); "learned" centres each group's statistic by the
reference rows of the same group (labels drawn from ``p_ref``), as any test that learns p from the
reference must. Everything by simulation (``draws`` label draws, seeded), one-sided at ``alpha``.

``python -m bench.scan_power 40 0`` prints both for German credit: with the probabilities the screen
uses (reference-only fold models) and with the pooled cross-fit (``likelihood_cross_fit``).
"""

from __future__ import annotations

import numpy as np


def _llr(p1: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-row log-likelihood ratio of a flip at ``rate`` for label 0 and for label 1."""
    p1 = np.clip(p1, 0.005, 0.995)
    after = (1 - rate) * p1 + rate * (1 - p1)
    return np.log((1 - after) / (1 - p1)), np.log(after / p1)


def scan_power(p_drop: np.ndarray, p_ref: np.ndarray, drop_groups: np.ndarray, ref_groups: np.ndarray,
               attacked: np.ndarray, attacked_ref: np.ndarray, *, rate: float = 0.2, alpha: float = 0.05,
               draws: int = 4000, seed: int = 0) -> dict[str, float]:
    """Power of the subgroup-known and subgroup-unknown optimal tests, p known and p learned.

    ``drop_groups`` (rows x groups) / ``ref_groups``: candidate subgroups; ``attacked``: the drop
    rows of the attacked subgroup, ``attacked_ref`` the reference rows of the same region."""
    rng = np.random.default_rng(seed)
    groups = np.column_stack([attacked, drop_groups]).astype(np.float64)       # column 0: the attacked one
    ref_in = np.column_stack([attacked_ref, ref_groups]).astype(np.float64)
    l0, l1 = _llr(p_drop, rate)
    r0, r1 = _llr(p_ref, rate)
    p = np.clip(p_drop, 0.005, 0.995)
    q = np.clip(p_ref, 0.005, 0.995)
    mean_row, ref_mean_row = (1 - p) * l0 + p * l1, (1 - q) * r0 + q * r1
    var_row = (1 - p) * l0 ** 2 + p * l1 ** 2 - mean_row ** 2
    ref_var_row = (1 - q) * r0 ** 2 + q * r1 ** 2 - ref_mean_row ** 2
    mean_g, var_g = mean_row @ groups, np.maximum(var_row @ groups, 1e-12)
    n_g, big_g = groups.sum(axis=0), ref_in.sum(axis=0)
    scale = np.where(big_g > 0, n_g / np.maximum(big_g, 1), 0.0)       # a drop group's share of its reference group
    ref_var_g = ref_var_row @ ref_in
    learned_sd = np.sqrt(var_g + scale ** 2 * ref_var_g)
    result: dict[str, list[np.ndarray]] = {k: [] for k in ("null_known", "null_learned", "alt_known", "alt_learned")}
    flip = attacked.astype(bool)
    for start in range(0, draws, 500):
        size = min(500, draws - start)
        y = rng.random((size, len(p))) < p
        ref_y = rng.random((size, len(q))) < q
        ref_dev = (np.where(ref_y, r1, r0) - ref_mean_row) @ ref_in            # reference groups' noise
        for name, labels in (("null", y), ("alt", y ^ (flip & (rng.random((size, len(p))) < rate)))):
            total = np.where(labels, l1, l0) @ groups - mean_g
            result[f"{name}_known"].append(total / np.sqrt(var_g))
            result[f"{name}_learned"].append((total - scale * ref_dev) / learned_sd)
    out: dict[str, float] = {}
    for kind in ("known", "learned"):
        null, alt = np.concatenate(result[f"null_{kind}"]), np.concatenate(result[f"alt_{kind}"])
        told = np.quantile(null[:, 0], 1 - alpha)
        scan = np.quantile(null[:, 1:].max(axis=1), 1 - alpha)
        out[f"told, p {kind}"] = float((alt[:, 0] > told).mean())
        out[f"not told, p {kind}"] = float((alt[:, 1:].max(axis=1) > scan).mean())
        out[f"scan limit, p {kind}"] = float(scan)
    return out


def subgroup_attack_power(index: int, seeds: range, min_rows: int = 20, cross_fit: bool = False) -> dict[str, float]:
    """Mean of :func:`scan_power` over the bench's fresh halves (seeds 200000+) of one data set, for
    its "20% of one subgroup" attack, the candidates being the scan's feature subgroups (values and
    quantile bins; the label classes left out: the attack does not follow a label).

    The probabilities are the screen's own (``ScreeningConfig()``: its folds and seed): the
    reference-only fold models, or with ``cross_fit`` the pooled cross-fit on the reference and the
    (clean) drop that ``ScreeningConfig(likelihood_cross_fit=True)`` uses."""
    from threadpoolctl import threadpool_limits

    from bench.bench_data import datasets
    from secure_ml.data.poisoning import FeatureSpace, ScreeningConfig
    from secure_ml.data.poisoning_likelihood import ReferenceModel, subgroups

    config = ScreeningConfig()
    name, frame, label, numeric, categorical, _, members = datasets()[index]
    runs: list[dict[str, float]] = []
    for seed in seeds:
        order = np.random.default_rng(200_000 + seed).permutation(len(frame))
        half = len(frame) // 2
        known = frame.iloc[order[:half]].reset_index(drop=True)
        clean = frame.iloc[order[half:]].reset_index(drop=True)
        space = FeatureSpace.fit(known, numeric, categorical)
        y_ref = known[label].to_numpy().astype(np.int64)
        x_ref, x_drop, fresh = space.transform(known), space.transform(clean), np.full(len(clean), -1)
        with threadpool_limits(limits=1):
            if cross_fit:
                model = ReferenceModel.cross_fit(x_ref, y_ref, x_drop, clean[label].to_numpy().astype(np.int64),
                                                 duplicate_of=fresh, drop_clusters=np.arange(len(clean)),
                                                 n_classes=2, folds=config.likelihood_folds, seed=config.seed)
            else:
                model = ReferenceModel.fit(x_ref, y_ref, n_classes=2, folds=config.likelihood_folds, seed=config.seed)
            assert model is not None
            p_drop = (model.drop_proba if cross_fit else model.predict(x_drop, fresh))[:, 1]
        found = subgroups(clean, known, label=label, numeric=numeric, categorical=categorical,
                          drop_labels=np.zeros(len(clean)), reference_labels=np.zeros(len(known)), classes=[])
        found = [(g, d, r) for g, d, r in found if d.sum() >= min_rows]
        runs.append(scan_power(p_drop, model.oof_proba[:, 1], np.column_stack([d for _, d, _ in found]),
                               np.column_stack([r for _, _, r in found]), members(known, clean),
                               members(known, known), seed=seed))
        runs[-1]["groups"] = float(len(found))
    return {"data set": name, "probabilities": "pooled cross-fit" if cross_fit else "reference only",  # type: ignore[dict-item]
            **{k: float(np.mean([r[k] for r in runs])) for k in runs[0]}}


if __name__ == "__main__":  # python -m bench.scan_power [SEEDS] [DATA SET INDICES]: the subgroup attack's ceiling
    import sys

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    for i in (int(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else range(3):
        for pooled in (False, True):
            print(subgroup_attack_power(i, range(count), cross_fit=pooled), flush=True)
