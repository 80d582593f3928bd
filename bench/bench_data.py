"""Data-stage figures (issue 3): poisoning detection at drop and row level, and validation at scale.

    python -m bench --only data [--quick]

Drop level: bootstrap resamples of the German Credit sample (seeds 0..19; the limits were
calibrated on seeds 10000+), clean and with 5% / 10% of labels flipped, screened against the
sample as the trusted reference. Reported: the share blocked, beside the confident-learning
detector alone (its own limit) as the baseline.

Row level: AUROC of our per-row score for the flipped rows at 5%, beside two baselines run on the
same drops: plain kNN label disagreement within the drop, and cross-validated confident learning
(1 - out-of-fold probability of the given label) within the drop.

Rows the reference never saw (issue 20): three data sets (German Credit, and scikit-learn's bundled
breast-cancer and diabetes tables, diabetes binarised at its median), each split into halves with
a fresh seed per drop (seeds 200000+): the reference is one half, the drop the other, clean or
poisoned (5/10/20% uniform flips, 20% of one subgroup flipped, 10% of class 1 flipped to 0, a 5%
trigger backdoor). Reported: the share blocked by the whole screen, by today's detectors alone (the
four fixed-limit ones), and by two drop-level baselines at the same 5% false-alarm rate (kNN label
disagreement against the reference, and the confident-learning issue rate, each against the
reference's own rate, two-proportion z); beside the power of the optimal (Neyman-Pearson) test
that knows the attack and takes the reference model's probabilities as the truth.

Scale: validated_dataset's core work (PII scan, the Great Expectations suite, poisoning screen,
split, Parquet + encryption of both sets) on a derived dataset of 1,000,000 rows (quick: 100,000)
in a fresh subprocess: wall time against a plain Parquet write+read of the same frame, and peak
memory above the post-import baseline against the frame's in-memory size. The model-based
poisoning scores run on a deterministic 20,000-row subsample at that size (they say so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import Figure

ISSUE = 3
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "german_credit.csv"
NUMERIC = ["job", "credit_amount", "duration", "age"]
CATEGORICAL = ["sex", "housing", "saving_accounts", "checking_account", "purpose"]


def run(quick: bool) -> list[Figure]:
    figures = _detection(seeds=5 if quick else 20)
    figures += unseen_figures(clean_seeds=20 if quick else 200, attack_seeds=5 if quick else 40)
    figures += _scale(rows=100_000 if quick else 1_000_000)
    return figures


# -- detection --------------------------------------------------------------------------------------
def _knn_baseline(drop, k: int = 15) -> np.ndarray:  # type: ignore[no-untyped-def]
    from sklearn.neighbors import NearestNeighbors

    from secure_ml.data.poisoning import FeatureSpace

    x = FeatureSpace.fit(drop, NUMERIC, CATEGORICAL).transform(drop)
    y = drop["risk"].to_numpy()
    _, found = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return (y[found[:, 1:]] != y[:, None]).mean(axis=1)


def _cl_baseline(drop) -> np.ndarray:  # type: ignore[no-untyped-def]
    from secure_ml.data.poisoning import FeatureSpace, _cross_validated_proba

    x = FeatureSpace.fit(drop, NUMERIC, CATEGORICAL).transform(drop)
    y = drop["risk"].to_numpy()
    proba = _cross_validated_proba(x, y, 5, 0)
    assert proba is not None
    return 1 - proba[np.arange(len(y)), y]


def _detection(seeds: int) -> list[Figure]:
    import pandas as pd
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    from secure_ml.data.poisoning import ScreeningConfig, bootstrap, flip_labels, screen
    from secure_ml.settings import Settings

    reference = pd.read_csv(SAMPLE)
    config = ScreeningConfig.from_mapping(Settings.from_env().load_config("validation").get("poisoning"))

    def cl_score(drop) -> float:  # type: ignore[no-untyped-def]
        report = screen(drop, reference, label="risk", numeric=NUMERIC, categorical=CATEGORICAL, config=config)
        return report.detector("label_cross_validated").score

    # Baseline detector: confident learning alone (drop issue rate against the reference's), its
    # limit set like ours, just above the worst clean score on calibration seeds (10000+).
    cl_limit = max(cl_score(bootstrap(reference, 10_000 + seed)) for seed in range(seeds))
    blocked: dict[float, list[bool]] = {0.0: [], 0.05: [], 0.10: []}
    baseline: dict[float, list[bool]] = {0.0: [], 0.05: [], 0.10: []}
    auc: dict[str, list[float]] = {"ours": [], "knn": [], "cl": []}
    for fraction in blocked:
        for seed in range(seeds):
            drop = bootstrap(reference, seed)
            mask = None
            if fraction:
                drop, mask = flip_labels(drop, "risk", fraction, seed=100_000 + seed)
            report = screen(drop, reference, label="risk", numeric=NUMERIC, categorical=CATEGORICAL, config=config)
            blocked[fraction].append(report.blocked)
            baseline[fraction].append(report.detector("label_cross_validated").score > cl_limit)
            if fraction == 0.05 and mask is not None:
                auc["ours"].append(roc_auc_score(mask, report.row_scores))
                with threadpool_limits(limits=1):
                    auc["knn"].append(roc_auc_score(mask, _knn_baseline(drop)))
                    auc["cl"].append(roc_auc_score(mask, _cl_baseline(drop)))
    unseen = _unseen_rows_auroc(reference, config, seeds)
    rate = {f: float(np.mean(v)) for f, v in blocked.items()}
    base = {f: float(np.mean(v)) for f, v in baseline.items()}
    mean = {k: float(np.mean(v)) for k, v in auc.items()}
    best = max(mean["knn"], mean["cl"])
    which = "kNN" if mean["knn"] >= mean["cl"] else "CV confident learning"
    print(f"# data: {seeds} seeds per level; row AUROC at 5%: ours {mean['ours']:.3f}, kNN {mean['knn']:.3f}, "
          f"CV confident learning {mean['cl']:.3f}; CL baseline limit {cl_limit:.2f}", file=sys.stderr)
    print(f"# data: rows the reference never saw (half the sample vs the other half), 5% flips: row AUROC ours "
          f"{unseen['ours']:.3f}, kNN {unseen['knn']:.3f}, CL {unseen['cl']:.3f}; drops blocked {unseen['blocked']:.2f}",
          file=sys.stderr)
    return [
        Figure(ISSUE, "10%-flip drops blocked (share)", rate[0.10], "share", "CL detector alone", base[0.10],
               ">= 0.95", rate[0.10] >= 0.95),
        Figure(ISSUE, "5%-flip drops blocked (share)", rate[0.05], "share", "CL detector alone", base[0.05],
               ">= 0.80", rate[0.05] >= 0.80),
        Figure(ISSUE, "clean drops wrongly blocked (share)", rate[0.0], "share", "CL detector alone", base[0.0],
               "<= 0.05", rate[0.0] <= 0.05),
        Figure(ISSUE, "row AUROC, flipped rows at 5%", mean["ours"], "AUROC", f"best baseline ({which})", best,
               ">= 1.0x", mean["ours"] >= best),
        # Harder than the goal's setting: no row of the drop is in the reference, so only the
        # neighbourhood (not duplicates) can speak. Reported, no goal.
        Figure(ISSUE, "row AUROC at 5%, rows unseen by the reference", unseen["ours"], "AUROC",
               "best baseline", max(unseen["knn"], unseen["cl"]), "report", True),
    ]


def _unseen_rows_auroc(reference, config, seeds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    from secure_ml.data.poisoning import flip_labels, screen

    scores: dict[str, list[float]] = {"ours": [], "knn": [], "cl": [], "blocked": []}
    for seed in range(seeds):
        order = np.random.default_rng(200_000 + seed).permutation(len(reference))
        known = reference.iloc[order[:500]].reset_index(drop=True)
        drop, mask = flip_labels(reference.iloc[order[500:]].reset_index(drop=True), "risk", 0.05, seed=300_000 + seed)
        report = screen(drop, known, label="risk", numeric=NUMERIC, categorical=CATEGORICAL, config=config)
        scores["ours"].append(roc_auc_score(mask, report.row_scores))
        scores["blocked"].append(float(report.blocked))
        with threadpool_limits(limits=1):
            scores["knn"].append(roc_auc_score(mask, _knn_baseline(drop)))
            scores["cl"].append(roc_auc_score(mask, _cl_baseline(drop)))
    return {k: float(np.mean(v)) for k, v in scores.items()}


# -- rows the reference never saw (issue 20) ----------------------------------------------------------
UNSEEN_ISSUE = 20
SCENARIOS = ("clean", "5% flips", "10% flips", "20% flips", "20% of one subgroup", "10% of class 1 -> 0",
             "5% trigger backdoor")
METHODS = ("ours", "today", "knn", "cl", "optimal", "optimal_learned")


def datasets():  # type: ignore[no-untyped-def]
    """(name, frame, label, numeric, categorical, subgroup description, subgroup membership)."""
    import pandas as pd
    from sklearn.datasets import load_breast_cancer, load_diabetes

    german = pd.read_csv(SAMPLE)
    cancer = load_breast_cancer(as_frame=True).frame
    diabetes = load_diabetes(as_frame=True).frame
    diabetes["target"] = (diabetes["target"] > diabetes["target"].median()).astype("int64")
    top = lambda column: (f"{column} in its top quarter",  # noqa: E731
                          lambda known, drop: (drop[column] > known[column].quantile(0.75)).to_numpy())
    return [
        ("German credit", german, "risk", NUMERIC, CATEGORICAL, "purpose=radio/TV",
         lambda known, drop: (drop["purpose"] == "radio/TV").to_numpy()),
        ("breast cancer", cancer, "target", [c for c in cancer.columns if c != "target"], [], *top("mean radius")),
        ("diabetes (> median)", diabetes, "target", [c for c in diabetes.columns if c != "target"], [], *top("bmi")),
    ]


def _poison(scenario: str, drop, known, label: str, numeric, categorical, members, seed: int):  # type: ignore[no-untyped-def]
    """(poisoned drop, per-row P(1 -> 0), per-row P(0 -> 1)) for the optimal test; rates None: n/a."""
    from secure_ml.data.poisoning import flip_labels
    from secure_ml.data.poisoning_attacks import flip_class, flip_subgroup, rare_trigger, trigger_backdoor

    n = len(drop)
    if scenario == "clean":
        return drop, np.zeros(n), np.zeros(n)
    if scenario.endswith("% flips"):
        rate = int(scenario.split("%")[0]) / 100
        return flip_labels(drop, label, rate, seed=seed)[0], np.full(n, rate), np.full(n, rate)
    if scenario == "20% of one subgroup":
        inside = members(known, drop)
        return flip_subgroup(drop, label, inside, fraction=0.2, seed=seed)[0], 0.2 * inside, 0.2 * inside
    if scenario == "10% of class 1 -> 0":
        return flip_class(drop, label, source=1, target=0, fraction=0.1, seed=seed)[0], np.full(n, 0.1), np.zeros(n)
    trigger = rare_trigger(known, list(numeric), list(categorical))
    return trigger_backdoor(drop, label, trigger, target=0, fraction=0.05, seed=seed)[0], None, None


def _optimal_power(p1: np.ndarray, q10: np.ndarray, q01: np.ndarray, alpha: float = 0.05,
                   reference_rows: int = 0) -> float:
    """Power of the Neyman-Pearson test of 'no flips' against the known flip pattern, the model's
    P(y=1|x) taken as the truth (normal approximation of the log-likelihood ratio).

    With ``reference_rows`` N > 0, the test's null mean is not known but estimated from N reference
    rows of the same population (as any test that learns p from the reference must): both variances
    grow by the reference's share, n/N."""
    from statistics import NormalDist

    p1 = np.clip(p1, 0.005, 0.995)
    null = np.stack([1 - p1, p1], axis=1)
    after = p1 * (1 - q10) + (1 - p1) * q01
    alt = np.stack([1 - after, after], axis=1)
    ratio = np.log(alt / null)
    mean0, mean1 = (null * ratio).sum(), (alt * ratio).sum()
    var0 = ((null * ratio ** 2).sum(axis=1) - (null * ratio).sum(axis=1) ** 2).sum()
    var1 = ((alt * ratio ** 2).sum(axis=1) - (alt * ratio).sum(axis=1) ** 2).sum()
    if var1 <= 0 or mean1 <= mean0:
        return alpha
    extra = var0 * len(p1) / reference_rows if reference_rows else 0.0
    limit = mean0 + NormalDist().inv_cdf(1 - alpha) * np.sqrt(var0 + extra)
    return float(1 - NormalDist().cdf((limit - mean1) / np.sqrt(var1 + extra)))


def _two_proportion_z(drop_rate: float, n: int, ref_rate: float, big_n: int) -> float:
    pooled = (drop_rate * n + ref_rate * big_n) / (n + big_n)
    return (drop_rate - ref_rate) / max(np.sqrt(pooled * (1 - pooled) * (1 / n + 1 / big_n)), 1e-9)


def _knn_drop_z(known, drop, label: str, numeric, categorical, k: int = 15) -> float:  # type: ignore[no-untyped-def]
    """kNN baseline: the drop's disagreement with its k nearest reference rows' majority, against the
    reference's own leave-one-out disagreement."""
    from sklearn.neighbors import NearestNeighbors

    from secure_ml.data.poisoning import FeatureSpace

    space = FeatureSpace.fit(known, numeric, categorical)
    x_ref, y_ref = space.transform(known), known[label].to_numpy()
    finder = NearestNeighbors(n_neighbors=k + 1).fit(x_ref)
    _, own = finder.kneighbors(x_ref)
    ref_vote = (y_ref[own[:, 1:]].mean(axis=1) > 0.5).astype(y_ref.dtype)
    _, found = finder.kneighbors(space.transform(drop), n_neighbors=k)
    drop_vote = (y_ref[found].mean(axis=1) > 0.5).astype(y_ref.dtype)
    return _two_proportion_z(float((drop_vote != drop[label].to_numpy()).mean()), len(drop),
                             float((ref_vote != y_ref).mean()), len(known))


def _unseen_one(args):  # type: ignore[no-untyped-def]
    """One (data set, scenario, seed): what each method decided."""
    index, scenario, seed = args
    from threadpoolctl import threadpool_limits

    from secure_ml.data.poisoning import FeatureSpace, screen
    from secure_ml.data.poisoning_likelihood import ReferenceModel

    name, frame, label, numeric, categorical, _, members = datasets()[index]
    order = np.random.default_rng(200_000 + seed).permutation(len(frame))
    half = len(frame) // 2
    known = frame.iloc[order[:half]].reset_index(drop=True)
    clean = frame.iloc[order[half:]].reset_index(drop=True)
    drop, q10, q01 = _poison(scenario, clean, known, label, numeric, categorical, members, seed=300_000 + seed)
    report = screen(drop, known, label=label, numeric=numeric, categorical=categorical)
    legacy = ("outliers", "label_neighbours", "label_cross_validated", "shift")
    cl = report.detector("label_cross_validated").detail
    with threadpool_limits(limits=1):
        knn_z = _knn_drop_z(known, drop, label, numeric, categorical)
        optimal = optimal_learned = float("nan")
        if q10 is not None:
            space = FeatureSpace.fit(known, numeric, categorical)
            model = ReferenceModel.fit(space.transform(known), known[label].to_numpy().astype(np.int64),
                                       n_classes=2, folds=10)
            assert model is not None
            p1 = model.predict(space.transform(clean), np.full(len(clean), -1))[:, 1]
            optimal = 0.05 if scenario == "clean" else _optimal_power(p1, q10, q01)
            optimal_learned = 0.05 if scenario == "clean" else _optimal_power(p1, q10, q01, reference_rows=len(known))
    cl_z = _two_proportion_z(cl.get("issue_rate", 0.0), int(cl.get("rows_scored", len(drop))),
                             cl.get("reference_issue_rate", 0.0), len(known))
    return (name, scenario, {"ours": float(report.blocked),
                             "today": float(any(report.detector(d).over for d in legacy)),
                             "knn": float(knn_z > 1.645), "cl": float(cl_z > 1.645), "optimal": optimal,
                             "optimal_learned": optimal_learned,
                             "subgroup": report.detector("label_subgroups").detail.get("worst_subgroup", "")})


def unseen_table(clean_seeds: int, attack_seeds: int, workers: int = 2) -> dict[tuple[str, str], dict[str, float]]:
    """Blocked share per (data set, scenario) and method, over fresh halves."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(i, scenario, seed) for i in range(3) for scenario in SCENARIOS
            for seed in range(clean_seeds if scenario == "clean" else attack_seeds)]
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    named: dict[tuple[str, str], list[str]] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for name, scenario, decided in pool.map(_unseen_one, jobs, chunksize=4):
            cell = results.setdefault((name, scenario), {m: [] for m in METHODS})
            for method in METHODS:
                cell[method].append(float(decided[method]))
            named.setdefault((name, scenario), []).append(str(decided["subgroup"]))
    table = {key: {m: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan") for m, v in cell.items()}
             for key, cell in results.items()}
    for key, subgroups in named.items():
        table[key]["runs"] = len(subgroups)
        table[key]["named"] = max(set(subgroups), key=subgroups.count)   # type: ignore[assignment]
    return table


def markdown(table: dict[tuple[str, str], dict[str, float]]) -> str:
    lines = ["| data set | drop | runs | ours | today's screen | kNN baseline | confident learning "
             "| optimal, p known | optimal, p learned |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (name, scenario), cell in table.items():
        optimal = ["n/a" if np.isnan(cell[k]) else f"{cell[k]:.2f}" for k in ("optimal", "optimal_learned")]
        lines.append(f"| {name} | {scenario} | {int(cell['runs'])} | **{cell['ours']:.2f}** | {cell['today']:.2f} | "
                     f"{cell['knn']:.2f} | {cell['cl']:.2f} | {optimal[0]} | {optimal[1]} |")
    return "\n".join(lines)


def unseen_figures(clean_seeds: int, attack_seeds: int) -> list[Figure]:
    table = unseen_table(clean_seeds, attack_seeds)
    print("# data: rows the reference never saw (blocked share; optimal = Neyman-Pearson, model as truth)\n"
          + markdown(table), file=sys.stderr)
    cell = lambda name, scenario: table[(name, scenario)]  # noqa: E731
    figures = []
    for name, *_ in datasets():
        clean = cell(name, "clean")
        figures.append(Figure(UNSEEN_ISSUE, f"{name}: clean unseen drops blocked (share)", clean["ours"], "share",
                              "today's screen", clean["today"], "<= 0.05", clean["ours"] <= 0.05))
    german, cancer = cell("German credit", "10% flips"), cell("breast cancer", "5% flips")
    figures.append(Figure(UNSEEN_ISSUE, "German credit: 10% flips on unseen rows blocked", german["ours"], "share",
                          "today's screen", german["today"], ">= 0.7", german["ours"] >= 0.7))
    figures.append(Figure(UNSEEN_ISSUE, "breast cancer: 5% flips on unseen rows blocked", cancer["ours"], "share",
                          "today's screen", cancer["today"], ">= 0.95", cancer["ours"] >= 0.95))
    for name, *_ in datasets():
        targeted = cell(name, "20% of one subgroup")
        figures.append(Figure(UNSEEN_ISSUE, f"{name}: 20% of one subgroup flipped, blocked", targeted["ours"],
                              "share", "today's screen", targeted["today"], ">= 0.9", targeted["ours"] >= 0.9))
    return figures


# -- scale ------------------------------------------------------------------------------------------
_WORKER = r"""
import json, os, resource, sys, tempfile, time
from pathlib import Path
import numpy as np, pandas as pd, psutil
from secure_ml.data import pii
from secure_ml.data import splitting
from secure_ml.data import validation
from secure_ml.custody.audit import AuditLog
from secure_ml.custody.keys import LocalKeyring
from secure_ml.data.poisoning import ScreeningConfig, screen
from secure_ml.data.schema import load_reference, load_schema
from secure_ml.settings import Settings
from secure_ml.custody.store import ArtifactStore

data_path, schema_path = sys.argv[1], sys.argv[2]
settings = Settings.from_env()
config = settings.load_config("validation")
schema = load_schema(schema_path)
reference = load_reference(schema)
screening = ScreeningConfig.from_mapping(config.get("poisoning"))
validation.validate(reference, schema)            # GE imported and its context built: not data work
home = Path(tempfile.mkdtemp())
store = ArtifactStore(home / "artifacts", LocalKeyring.create(home / "keyring.json"), AuditLog(home / "audit.jsonl"), actor="bench")
process = psutil.Process()
# Measure the data work alone: reset the high-water mark after the imports and GE's warm-up.
Path("/proc/self/clear_refs").write_text("5")
base_rss = process.memory_info().rss

started = time.perf_counter()
frame = pd.read_parquet(data_path)
loaded = time.perf_counter()
size = int(frame.memory_usage(deep=True).sum())
plan = pii.plan_handling(pii.detect(frame), pii.parse_rules(config.get("pii", {}).get("rules")))
frame = pii.apply(frame, plan, None)
result = validation.validate(frame, schema, extra_columns=pii.handled_columns(plan), redact=pii.redact_text)
report = screen(frame, reference, label=schema.label, numeric=schema.numeric, categorical=schema.categorical,
                config=screening)
in_test = splitting.assign_test(frame, schema.label, test_fraction=0.2, seed=1)
store.put_dataframe(frame[~in_test].reset_index(drop=True))   # one set at a time, as the asset does
store.put_dataframe(frame[in_test].reset_index(drop=True))
done = time.perf_counter()
peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmHWM:"))

# the baseline in the same process: a plain Parquet write + read of the same frame
t0 = time.perf_counter()
path = home / "plain.parquet"
frame.to_parquet(path, index=False)
pd.read_parquet(path)
plain = time.perf_counter() - t0

# screening cost against today's screen, same process, same frame: the full screen, then the
# screen without the label-likelihood scan (today's four detectors), best of two each
import secure_ml.data.poisoning as poisoning
def timed():
    t = time.perf_counter()
    screen(frame, reference, label=schema.label, numeric=schema.numeric, categorical=schema.categorical,
           config=screening)
    return time.perf_counter() - t
screen_new = min(timed(), timed())
scan = poisoning._likelihood
poisoning._likelihood = lambda *args, **kwargs: []
screen_old = min(timed(), timed())
poisoning._likelihood = scan
print(json.dumps({"rows": len(frame), "seconds": done - loaded, "load_seconds": loaded - started,
                  "screen_seconds": screen_new, "screen_today_seconds": screen_old,
                  "plain_seconds": plain, "bytes": size, "peak_extra": peak - base_rss,
                  "valid": result.success, "blocked": report.blocked, "subsampled": report.subsampled}))
"""


def _derived(rows: int, path: Path) -> None:
    """A larger dataset derived from the sample: resampled rows, numeric values jittered in range."""
    import pandas as pd

    from secure_ml.data.poisoning import bootstrap

    frame = bootstrap(pd.read_csv(SAMPLE), seed=42, rows=rows)
    rng = np.random.default_rng(43)
    frame["credit_amount"] = np.clip(frame["credit_amount"] * rng.uniform(0.95, 1.05, rows), 250, 20000).astype("int64")
    frame["age"] = np.clip(frame["age"] + rng.integers(-1, 2, rows), 19, 80).astype("int64")
    frame.to_parquet(path, index=False)


def _scale(rows: int) -> list[Figure]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "derived.parquet"
        _derived(rows, data)
        schema = REPO / "secure_ml" / "config" / "schemas" / "german_credit.yaml"
        env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "GX_ANALYTICS_ENABLED": "false",
               "PYTHONPATH": str(REPO), "SECURE_ML_HOME": str(Path(tmp) / "home")}
        done = subprocess.run([sys.executable, "-c", _WORKER, str(data), str(schema)], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"scale worker failed: {done.stderr.strip().splitlines()[-1:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"# data: {out['rows']} rows, {out['bytes'] / 2**20:.0f} MiB in memory, core work {out['seconds']:.1f}s "
          f"(read {out['load_seconds']:.1f}s), peak +{out['peak_extra'] / 2**20:.0f} MiB; valid={out['valid']} "
          f"blocked={out['blocked']}; {out['subsampled']}", file=sys.stderr)
    label = f"{out['rows'] // 1000}k rows"
    return [
        Figure(ISSUE, f"validated_dataset core work, {label}", out["seconds"], "s", "Parquet write+read",
               out["plain_seconds"], "<= 60 s", out["seconds"] <= 60),
        Figure(ISSUE, f"validated_dataset throughput, {label}", out["rows"] / out["seconds"], "rows/s",
               "Parquet write+read rows/s", out["rows"] / out["plain_seconds"], "report", True),
        # The goal is set at 1,000,000 rows; at the quick size fixed costs (libraries' working sets) dominate.
        Figure(ISSUE, f"validated_dataset peak memory, {label}", out["peak_extra"] / 2**20, "MiB",
               "dataset in memory (MiB)", out["bytes"] / 2**20,
               "<= 4.0x" if out["rows"] >= 1_000_000 else "report (4x at 1M)",
               out["peak_extra"] <= 4 * out["bytes"] or out["rows"] < 1_000_000),
        Figure(UNSEEN_ISSUE, f"poisoning screen cost, {label}", out["screen_seconds"], "s",
               "today's screen (s)", out["screen_today_seconds"], "<= 2.0x",
               out["screen_seconds"] <= 2.0 * out["screen_today_seconds"]),
    ]


# -- calibration (how the limits in validation.yaml were chosen) -----------------------------------
def calibrate(seeds: range = range(10_000, 10_200)) -> dict[str, dict[str, float]]:
    """Worst and 99th-percentile clean score of each detector on seeds the benchmark never uses:
    bootstrap drops of the sample against the sample, and bootstrap drops of half the sample
    against the other half (rows the reference never saw). The likelihood scan's limits are computed
    per drop, so its rows give score/limit; the "share" rows give how often the fixed-limit detectors,
    and the whole screen, blocked a clean drop (printed in the max column)."""
    import pandas as pd

    from secure_ml.data.poisoning import bootstrap, screen

    full = pd.read_csv(SAMPLE)
    table: dict[str, dict[str, float]] = {}
    for scenario in ("bootstrap", "unseen rows"):
        scores: dict[str, list[float]] = {}
        for seed in seeds:
            if scenario == "bootstrap":
                reference, drop = full, bootstrap(full, seed)
            else:
                order = np.random.default_rng(seed).permutation(len(full))
                reference = full.iloc[order[:500]].reset_index(drop=True)
                drop = bootstrap(full.iloc[order[500:]].reset_index(drop=True), seed)
            report = screen(drop, reference, label="risk", numeric=NUMERIC, categorical=CATEGORICAL)
            for detector in report.detectors:
                if detector.name in ("label_likelihood", "label_subgroups"):   # per-drop limits: score/limit
                    scores.setdefault(f"{detector.name} (score/limit)", []).append(detector.ratio)
                else:
                    scores.setdefault(detector.name, []).append(detector.score)
            legacy = any(d.over for d in report.detectors if d.name not in ("label_likelihood", "label_subgroups"))
            scores.setdefault("fixed-limit detectors blocked (share)", []).append(float(legacy))
            scores.setdefault("whole screen blocked (share)", []).append(float(report.blocked))
        for name, values in scores.items():
            table[f"{scenario}: {name}"] = ({"max": float(np.mean(values)), "q99": float("nan")} if "share" in name
                                            else {"max": float(np.max(values)), "q99": float(np.quantile(values, 0.99))})
    return table


if __name__ == "__main__":  # python -m bench.bench_data --calibrate | --unseen CLEAN_DROPS ATTACKED_DROPS
    if "--unseen" in sys.argv:
        at = sys.argv.index("--unseen")
        print(markdown(unseen_table(int(sys.argv[at + 1]), int(sys.argv[at + 2]))))
    elif "--calibrate" in sys.argv:
        for row, values in calibrate().items():
            print(f"{row:<40} max {values['max']:8.3f}   q99 {values['q99']:8.3f}")
