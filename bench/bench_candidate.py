"""1,000,000 rows from drop to signed and registered candidate, against one plain torch training (issue 17).

    python -m bench --only candidate [--quick]          # quick: 100,000 rows, 2 epochs
    BENCH_CANDIDATE_EPOCHS=2 python -m bench --only candidate     # 1,000,000 rows, 2 epochs each side
    BENCH_CANDIDATE_ROWS=300000 python -m bench --only candidate  # 300,000 rows, the shipped epochs

A German-credit-shaped drop (the sample bootstrapped, numerics jittered; bench_data's generator)
lands in a fresh SECURE_ML_HOME and the ingest job's selection plus the training job's (dataset ->
... -> attestation: the signed candidate) and ``registered_model`` (the release group's registration, as
a candidate the promotion policy judges) are materialised in one ``dg.materialize``,
checks included (``reproducible`` replays chain segments). Baseline, in the same run: one plain torch training
of the same MLP (bench/baseline_loop.py: today's loop before issue 17, the shipped batch size,
epochs, seed and one thread) on the train split of the same drop, preprocessed the same way;
only the training is timed. Each side runs in its own fresh Python process, so each peak RSS
(ru_maxrss of the process, and of its largest child: the training sandbox) is its own.
Goal: pipeline <= 1.3x the plain training, peak RSS <= 2 GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import Figure

ISSUE = 17
REPO = Path(__file__).resolve().parents[1]

_PIPELINE = r"""
import json, os, resource, sys, time
from pathlib import Path
import dagster as dg
from tests._dagster_servers import make_home
base, drop, config = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
home = make_home(base, automation="off", extra={"SECURE_ML_CONFIG": config} if config else None)
for key, value in home.environ.items():
    os.environ[key] = value
from secure_ml.definitions import build_definitions
from sensors.landing import landing_selection, retraining_selection
target = home.settings.landing_dir / drop.name
os.replace(drop, target)
old = time.time() - 3600
os.utime(target, (old, old))
defs = build_definitions(home.settings)
automation = home.settings.config.automation  # the ingest job's selection, then the training job's
instance = dg.DagsterInstance.from_config(str(home.dagster_home))
started = time.perf_counter()
result = dg.materialize([*defs.assets, *(defs.asset_checks or [])], instance=instance, resources=defs.resources,
                        selection=(landing_selection(automation) | retraining_selection(automation)
                                   | dg.AssetSelection.assets("registered_model")),
                        run_config={"ops": {"dataset": {"config": {"drop": drop.name}}},
                                    "loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                        raise_on_error=False)
seconds = time.perf_counter() - started
steps = {}
for record in instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS):
    data = record.dagster_event.event_specific_data if record.dagster_event else None
    steps[record.step_key] = round(float(getattr(data, "duration_ms", 0.0) or 0.0) / 1000, 2)
checks = {e.check_name: bool(e.passed) for e in result.get_asset_check_evaluations()}
failed = [e.step_failure_data.error.message.strip()[:300] for e in result.get_step_failure_events()]
print(json.dumps({"seconds": seconds, "success": result.success, "steps": steps, "failed": failed,
                  "checks_failed": [n for n, ok in checks.items() if not ok],
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""

_PLAIN = r"""
import json, resource, sys, time
import pandas as pd
from bench.baseline_loop import train_baseline
from secure_ml.data import splitting
from secure_ml.settings import Settings
from secure_ml.training.config import TrainingConfig
from secure_ml.training.features import DataSpec, Preprocessing
frame = pd.read_csv(sys.argv[1])
train, _ = splitting.split(frame, "risk", test_fraction=0.2, seed=20261123)
spec = DataSpec("risk", ["job", "credit_amount", "duration", "age"],
                ["sex", "housing", "saving_accounts", "checking_account", "purpose"])
prep = Preprocessing.fit(train, spec)
X, y = prep.transform(train)[0], prep.labels(train)
config = TrainingConfig.from_mapping(Settings.from_env().load_config("training")["training"])
config = TrainingConfig.from_mapping({**config.hyperparameters(), "epochs": int(sys.argv[2]) or config.epochs})
started = time.perf_counter()
train_baseline(X, y, config)
print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(X), "width": int(X.shape[1]),
                  "epochs": config.epochs, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _worker(code: str, *args: str, timeout: int = 3600) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GX_ANALYTICS_ENABLED": "false", "DAGSTER_TELEMETRY_DISABLED": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker failed: {done.stderr.strip().splitlines()[-3:]}")
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def run(quick: bool) -> list[Figure]:
    import pandas as pd

    from bench.bench_data import _derived

    import shutil

    import yaml

    rows, epochs = (100_000, 2) if quick else (1_000_000, 0)  # 0: the shipped training.yaml's epochs
    # On a loaded machine the full run's baseline alone takes long: BENCH_CANDIDATE_EPOCHS=N cuts both sides,
    # BENCH_CANDIDATE_ROWS=N the drop.
    epochs = int(os.environ.get("BENCH_CANDIDATE_EPOCHS", epochs))
    rows = int(os.environ.get("BENCH_CANDIDATE_ROWS", rows))
    with tempfile.TemporaryDirectory(prefix="bench-candidate-") as tmp:
        base = Path(tmp)
        config_dir = ""
        if epochs:
            config_dir = str(shutil.copytree(REPO / "secure_ml" / "config", base / "config"))
            training = yaml.safe_load((base / "config" / "training.yaml").read_text())
            training["training"]["epochs"] = epochs
            (base / "config" / "training.yaml").write_text(yaml.safe_dump(training))
        _derived(rows, base / "derived.parquet")
        drop = base / f"german_credit-{rows}.csv"
        pd.read_parquet(base / "derived.parquet").to_csv(drop, index=False)
        plain = _worker(_PLAIN, str(drop), str(epochs))
        (base / "pipeline").mkdir()
        pipeline = _worker(_PIPELINE, str(base / "pipeline"), str(drop), config_dir)
    print(f"# candidate: {json.dumps(pipeline)}\n# plain: {json.dumps(plain)}", file=sys.stderr)
    if not pipeline["success"]:
        raise RuntimeError(f"the {rows}-row drop did not become a registered candidate: {pipeline['failed']}")
    label = f"{rows:,} rows" + (f", {epochs} epochs" if epochs else "")
    peak = max(float(pipeline["rss"]), float(pipeline["rss_child"])) / 2**30  # type: ignore[arg-type]
    seconds, plain_s = float(pipeline["seconds"]), float(plain["seconds"])  # type: ignore[arg-type]
    return [
        Figure(ISSUE, f"{label}: drop -> signed, registered candidate (checks included)", seconds, "s",
               "one plain torch training (s)", plain_s, "<= 1.3x", seconds <= 1.3 * plain_s),
        Figure(ISSUE, f"{label}: peak RSS, pipeline process or its largest child", peak, "GiB",
               "plain training peak RSS (GiB)", float(plain["rss"]) / 2**30,  # type: ignore[arg-type]
               "<= 2 GiB", peak <= 2.0),
        Figure(ISSUE, f"{label}: trained_model step", float(pipeline["steps"].get("trained_model", 0.0)),  # type: ignore[union-attr]
               "s", "one plain torch training (s)", plain_s, "report", True),
    ]
