"""Data-stage figures (issue 3): poisoning detection at drop and row level, and validation at scale.

    python -m bench --only data [--quick]

Drop level: bootstrap resamples of the German Credit sample (seeds 0..19; the limits were
calibrated on seeds 10000+), clean and with 5% / 10% of labels flipped, screened against the
sample as the trusted reference. Reported: the share blocked, beside the confident-learning
detector alone (its own limit) as the baseline.

Row level: AUROC of our per-row score for the flipped rows at 5%, beside two baselines run on the
same drops: plain kNN label disagreement within the drop, and cross-validated confident learning
(1 - out-of-fold probability of the given label) within the drop.

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
print(json.dumps({"rows": len(frame), "seconds": done - loaded, "load_seconds": loaded - started,
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
    ]


# -- calibration (how the limits in validation.yaml were chosen) -----------------------------------
def calibrate(seeds: range = range(10_000, 10_200)) -> dict[str, dict[str, float]]:
    """Worst and 99th-percentile clean score of each detector on seeds the benchmark never uses:
    bootstrap drops of the sample against the sample, and bootstrap drops of half the sample
    against the other half (rows the reference never saw)."""
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
                scores.setdefault(detector.name, []).append(detector.score)
        for name, values in scores.items():
            table[f"{scenario}: {name}"] = {"max": float(np.max(values)), "q99": float(np.quantile(values, 0.99))}
    return table


if __name__ == "__main__":  # python -m bench.bench_data --calibrate
    if "--calibrate" in sys.argv:
        for row, values in calibrate().items():
            print(f"{row:<40} max {values['max']:8.3f}   q99 {values['q99']:8.3f}")
