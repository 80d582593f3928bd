"""Offline replay of subgroup-scan variants on the bench's own splits (issue 20, targeted flips).

    python -m bench.subgroup_variants collect DIR INDEX SCENARIO FIRST LAST   # e.g. 0 "20% of one subgroup" 0 40
    python -m bench.subgroup_variants analyse "DIR/d0_clean_*.npz" "DIR/d0_20p_of_one_subgroup_*.npz"
    python -m bench.subgroup_variants levers INDEX SCENARIO FIRST LAST VARIANT   # the whole screen, as run

``levers`` runs the real screen (``bench_data``'s splits and attacks, seeds 200000+ / 300000+) with
one variant of the scan's probabilities or scale and prints one JSON line per drop: ``plain`` (the
screen as shipped), ``cross_fit`` (``ScreeningConfig(likelihood_cross_fit=True)``: drop and
reference pooled, each row scored out of fold), ``skew`` (each subgroup's z mapped to a normal
scale by its null's skewness, ``poisoning_likelihood.SKEW_CORRECTED``).

``collect`` screens each drop as ``bench_data._unseen_one`` does (seeds 200000+ / 300000+), keeps the
reference model, drop and subgroups the scan saw, and stores for the observed drop, 1000 label draws
from the model and 1000 permutations: the whole-drop z, and per subgroup the reference-centred z
("zc", the scan's) and the z centred by the model's own expectation ("zu"), each for the bounded
disagreement and the efficient score. ``analyse`` replays the one-alpha decision (0.045 for the
scan, the fixed-limit detectors as they decided) for each variant: global share, re-standardising
each group by its simulated null, Fisher / Cauchy / min-p combinations. Numbers only; no pickle.
"""
from __future__ import annotations

import glob
import sys
import zipfile
from pathlib import Path
from statistics import NormalDist

import numpy as np

import secure_ml.data.poisoning_likelihood as L

A = 0.045   # the scan's share of the one alpha (0.05 less the fixed-limit detectors' 0.005)

def score_tables(model, proba, pmin, kind):
    """s(c) per row per class, and per-row E and Var under proba."""
    s = L._scores(proba, pmin, kind == "disagree")
    e = (proba * s).sum(1); v = np.maximum((proba * s**2).sum(1) - e**2, 1e-12)
    return s, e, v

def draws_model(model, proba, D, rng):
    yr = L._draw(model.oof_proba, D, rng); yd = L._draw(proba, D, rng)
    return yd, yr

def replay(model, x, y, dup, groups, minrows, D=1000, seed=0):
    rng = np.random.default_rng(seed)
    proba = model.predict(x, dup)
    n, N = len(y), len(model.oof_labels)
    kept = [(nm, m, r) for nm, m, r in groups if m.sum() >= minrows]
    G = np.stack([m for _, m, _ in kept], 1).astype(float); GR = np.stack([r for _, _, r in kept], 1).astype(float)
    out = {"names": [k[0] for k in kept]}
    # pools: observed drop then ref
    yd_obs, yr_obs = y, model.oof_labels
    yd_sim, yr_sim = draws_model(model, proba, D, rng)
    perm = np.argsort(rng.random((D, n + N)), axis=1)
    res = {}
    for kind in ("eff", "disagree"):
        pmin = model.p_min
        sd, ed, vd = score_tables(model, proba, pmin, kind)
        sr, er, vr = score_tables(model, model.oof_proba, pmin, kind)
        obs_d = sd[np.arange(n), yd_obs] - ed; obs_r = sr[np.arange(N), yr_obs] - er
        sim_d = np.take_along_axis(np.broadcast_to(sd, (D,)+sd.shape), yd_sim[:,:,None], 2)[:,:,0] - ed
        sim_r = np.take_along_axis(np.broadcast_to(sr, (D,)+sr.shape), yr_sim[:,:,None], 2)[:,:,0] - er
        pool = np.concatenate([obs_d, obs_r]); poolv = np.concatenate([vd, vr]); poolG = np.concatenate([G, GR])
        # permutation: first n of perm go to drop
        pd_idx, pr_idx = perm[:, :n], perm[:, n:]
        per_d = pool[pd_idx]; per_r = pool[pr_idx]
        for name, Pd, Pr, Vd_, Gd_, Gr_ in (
            ("obs", obs_d[None], obs_r[None], vd[None], G[None], GR[None]),
            ("sim", sim_d, sim_r, np.broadcast_to(vd, sim_d.shape), None, None),
            ("perm", per_d, per_r, poolv[pd_idx], "perm", None)):
            if Gd_ is None:
                gd = Pd @ G; vg = Vd_ @ G; nd = G.sum(0)[None]
                gr, gr2, ngr = Pr @ GR, (Pr**2) @ GR, GR.sum(0)[None]
            elif isinstance(Gd_, str):
                W = np.zeros((D, n + N)); np.put_along_axis(W, pd_idx, 1.0, 1); R = 1 - W
                gd = (W * pool) @ poolG; vg = (W * poolv) @ poolG; nd = W @ poolG
                gr, gr2, ngr = (R * pool) @ poolG, (R * pool**2) @ poolG, R @ poolG
            else:
                gd = Pd @ G; vg = Vd_ @ G; nd = G.sum(0)[None]; gr, gr2, ngr = Pr @ GR, (Pr**2) @ GR, GR.sum(0)[None]
            m_ref = Pr.mean(1, keepdims=True); v_ref = np.maximum(Pr.var(1, keepdims=True), 1e-12)
            # global ref-centred
            zglob = ((Pd.sum(1, keepdims=True) - n * m_ref) / np.sqrt(v_ref * (n + n**2 / N)))[:, 0]
            # global uncentred (model variance)
            zglob_u = Pd.sum(1) / np.sqrt(Vd_.sum(1))
            # group ref-centred, shrunk (existing)
            w = ngr + L.GROUP_PRIOR_ROWS
            m_g = (gr + L.GROUP_PRIOR_ROWS * m_ref) / w
            v_g = np.maximum((gr2 - 2 * m_g * gr + ngr * m_g**2 + L.GROUP_PRIOR_ROWS * v_ref) / w, 1e-12)
            zc = (gd - nd * m_g) / np.sqrt(v_g * (nd + nd**2 / w))
            zu = gd / np.sqrt(np.maximum(vg, 1e-12))
            valid = nd >= minrows
            res[(kind, name)] = {"zglob": zglob, "zglob_u": zglob_u, "zc": np.where(valid, zc, -np.inf),
                                 "zu": np.where(valid, zu, -np.inf)}
    return out["names"], res

def collect(out: Path, ds: int, scen: str, seeds: range) -> None:
    from bench.bench_data import _poison, datasets
    from secure_ml.data import poisoning

    captured = {}
    original = L.ReferenceModel.scan

    def capture(self, x, y, *, duplicate_of, groups, alpha, global_share, min_group_rows=20, deff=1.0, seed=0):
        captured["v"] = (self, x, y, duplicate_of, groups, alpha, global_share, min_group_rows, deff)
        return original(self, x, y, duplicate_of=duplicate_of, groups=groups, alpha=alpha,
                        global_share=global_share, min_group_rows=min_group_rows, deff=deff, seed=seed)

    L.ReferenceModel.scan = capture
    name, frame, label, numeric, categorical, _, members = datasets()[ds]
    for seed in seeds:
        order = np.random.default_rng(200_000 + seed).permutation(len(frame)); half = len(frame)//2
        known = frame.iloc[order[:half]].reset_index(drop=True); clean = frame.iloc[order[half:]].reset_index(drop=True)
        drop, *_ = _poison(scen, clean, known, label, numeric, categorical, members, seed=300_000 + seed)
        rep = poisoning.screen(drop, known, label=label, numeric=numeric, categorical=categorical)
        legacy = any(rep.detector(d).over for d in ("outliers", "label_neighbours", "label_cross_validated", "shift"))
        model, x, y, dup, groups, alpha, gs, minrows, deff = captured["v"]
        names, res = replay(model, x, y, dup, groups, minrows)
        np.savez_compressed(out / f"d{ds}_{scen.replace(' ','_').replace('%','p').replace('>','')}_{seed}.npz",
                            legacy=legacy, ours=rep.blocked, names=np.array(names),
                            **{f"{k[0]}|{k[1]}|{s}": v for k, d in res.items() for s, v in d.items()})
        print(seed, rep.blocked, legacy, flush=True)


def q(x, a): return float(np.quantile(x, 1 - a, method="higher"))
def load(pattern):
    out = []
    for f in sorted(glob.glob(pattern)):
        try:
            z = np.load(f); out.append({k: z[k] for k in z.files})
        except (OSError, ValueError, zipfile.BadZipFile):   # a file still being written
            pass
    return out
def decide(d, kind, sub, share=0.75, comb="max", std=False):
    g = {s: d[f"eff|{s}|zglob"] for s in ("obs", "sim", "perm")}
    sg = {s: d[f"{kind}|{s}|{sub}"] for s in ("obs", "sim", "perm")}
    if std:   # re-standardise each group by its model-simulated null mean and sd
        m = np.mean(np.where(np.isfinite(sg["sim"]), sg["sim"], np.nan), 0); s_ = np.nanstd(np.where(np.isfinite(sg["sim"]), sg["sim"], np.nan), 0)
        sg = {k: (v - m) / np.maximum(s_, 1e-9) for k, v in sg.items()}
    mx = {s: sg[s].max(1) for s in sg}
    if comb == "max":
        lg = max(NormalDist().inv_cdf(1 - A * share), q(g["sim"], A * share), q(g["perm"], A * share))
        ls = []
        for s in ("sim", "perm"):
            w = np.where(g[s] > lg, np.inf, mx[s]); ls.append(q(w, A))
        ls = max(ls)
        return bool(g["obs"][0] > lg or mx["obs"][0] > ls)
    from scipy.stats import norm

    k = sg["obs"].shape[1]
    def T(gz, sz):
        pg = norm.sf(gz); ps = np.minimum(1, k * norm.sf(sz))
        if comb == "fisher": return -2 * (np.log(np.maximum(pg, 1e-300)) + np.log(np.maximum(ps, 1e-300)))
        if comb == "cauchy": return 0.5 * np.tan((0.5 - pg) * np.pi) + 0.5 * np.tan((0.5 - ps) * np.pi)
        if comb == "minp": return -np.log(np.minimum(pg, ps))
    t = {s: T(g[s], mx[s]) for s in g}
    lim = max(q(t["sim"], A), q(t["perm"], A))
    return bool(t["obs"][0] > lim)
def analyse(clean_pattern: str, attacked_pattern: str) -> None:
    clean = load(clean_pattern); att = load(attacked_pattern)
    print(f"clean {len(clean)} attacked {len(att)}; ours as run: clean {np.mean([d['ours'] for d in clean]):.3f} attacked {np.mean([d['ours'] for d in att]):.3f}")
    for kind in ("disagree", "eff"):
        for sub in ("zc", "zu"):
            for std in (False, True):
                for comb, share in (("max", 0.75), ("max", 0.5), ("max", 0.25), ("fisher", 0), ("cauchy", 0), ("minp", 0)):
                    r = [np.mean([bool(d["legacy"]) or decide(d, kind, sub, share, comb, std) for d in ds]) for ds in (clean, att)]
                    print(f"{kind:9s} {sub} std={int(std)} {comb:6s} {share:.2f}  clean {r[0]:.3f}  attacked {r[1]:.3f}")


def levers(ds: int, scen: str, seeds: range, variant: str) -> None:
    import json

    from bench.bench_data import _poison, datasets
    from secure_ml.data.poisoning import ScreeningConfig, screen

    if variant not in ("plain", "cross_fit", "skew"):
        raise SystemExit(f"unknown variant {variant!r}: plain, cross_fit or skew")
    L.SKEW_CORRECTED = variant == "skew"
    config = ScreeningConfig(likelihood_cross_fit=variant == "cross_fit")
    name, frame, label, numeric, categorical, _, members = datasets()[ds]
    for seed in seeds:
        order = np.random.default_rng(200_000 + seed).permutation(len(frame)); half = len(frame) // 2
        known = frame.iloc[order[:half]].reset_index(drop=True); clean = frame.iloc[order[half:]].reset_index(drop=True)
        drop, *_ = _poison(scen, clean, known, label, numeric, categorical, members, seed=300_000 + seed)
        rep = screen(drop, known, label=label, numeric=numeric, categorical=categorical, config=config)
        whole, groups = rep.detector("label_likelihood"), rep.detector("label_subgroups")
        print(json.dumps({"seed": seed, "blocked": rep.blocked, "z_global": whole.score, "limit_global": whole.limit,
                          "z_group": groups.score, "limit_groups": groups.limit,
                          "worst": groups.detail.get("worst_subgroup")}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "levers":
        levers(int(sys.argv[2]), sys.argv[3], range(int(sys.argv[4]), int(sys.argv[5])), sys.argv[6])
    elif sys.argv[1] == "collect":
        collect(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], range(int(sys.argv[5]), int(sys.argv[6])))
    else:
        analyse(sys.argv[2], sys.argv[3])
