"""Many-models figures (issue 16): loading definitions for 20 models, and onboarding a new model.

- definitions for 20 models: what a code server does when it loads the location, in a fresh process
  (start Python, import the code location, build the definitions, resolve the asset graph), with 19
  models drafted by ``model add`` beside German credit; median of N; goal <= 2 x the same for German
  credit alone, in the same run. Also reported: the build alone in a warm process (imports done),
  which grows with the number of assets (Dagster builds every model's copies).
- onboarding: wall time of ``secure-ml model add breast_cancer --data breast_cancer.csv --label
  target --no-protected ...`` then ``secure-ml pipeline run --data breast_cancer.csv`` to a signed,
  registered candidate (two commands, a fresh home); reported beside ``pipeline run`` of German
  credit in a home of its own in the same run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import Figure

REPO = Path(__file__).resolve().parents[1]
REASON = "tumour measurements: no attribute of a person"


def _config(root: Path, sample: Path, extra_models: int, tag: str = "") -> Path:
    from secure_ml.config import SHIPPED_DIR
    from secure_ml.data.onboarding import draft_model

    config = root / f"config-{extra_models}{tag}"
    shutil.copytree(SHIPPED_DIR, config, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    for i in range(extra_models):
        name = f"model_{i:02d}"
        named = root / f"{name}.csv"
        shutil.copyfile(sample, named)
        draft_model(config, name, named, label="target", no_protected=REASON)
    return config


def _load(config: Path) -> float:
    from secure_ml.definitions import build_definitions
    from secure_ml.settings import Settings

    started = time.perf_counter()
    definitions = build_definitions(Settings.from_env({"SECURE_ML_CONFIG": str(config), "SECURE_ML_AUTOMATION": "off"}))
    definitions.resolve_asset_graph()
    return time.perf_counter() - started


_COLD = ("import time; t = time.perf_counter(); from secure_ml.definitions import build_definitions; "
         "from secure_ml.settings import Settings; build_definitions(Settings.from_env()).resolve_asset_graph(); "
         "print(time.perf_counter() - t)")


def _cold(config: Path) -> float:
    """Seconds to import and load the code location in a fresh interpreter (process start included)."""
    env = {**os.environ, "SECURE_ML_CONFIG": str(config), "SECURE_ML_AUTOMATION": "off", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _COLD], check=True, capture_output=True, env=env, cwd=REPO, timeout=600)
    return time.perf_counter() - started


def _cli(home: Path, config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SECURE_ML_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "SECURE_ML_CONFIG": str(config), "PYTHONPATH": str(REPO)}
    env.pop("SECURE_ML_KEK", None)
    return subprocess.run([sys.executable, "-m", "secure_ml", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=1800)


def run(quick: bool) -> list[Figure]:
    from sklearn.datasets import load_breast_cancer

    figures: list[Figure] = []
    n = 3 if quick else 7
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        root = Path(tmp)
        sample = root / "breast_cancer.csv"
        load_breast_cancer(as_frame=True).frame.to_csv(sample, index=False)
        one, twenty = _config(root, sample, 0), _config(root, sample, 19)
        cold_one = statistics.median(_cold(one) for _ in range(n))
        cold_many = statistics.median(_cold(twenty) for _ in range(n))
        figures.append(Figure(16, "code location load (fresh process), 20 models", cold_many, "s",
                              "1 model (German credit)", cold_one, "<= 2x", cold_many <= 2 * cold_one))
        _load(one), _load(twenty)  # imports and caches warm
        alone = statistics.median(_load(one) for _ in range(n))
        many = statistics.median(_load(twenty) for _ in range(n))
        figures.append(Figure(16, "definitions build alone (warm process), 20 models", many, "s",
                              "1 model", alone, "reported", True))
        if quick:
            return figures
        config = _config(root, sample, 0, "-onboarding")
        home = root / "home-bc"
        started = time.perf_counter()
        added = _cli(home, config, "model", "add", "breast_cancer", "--data", str(sample), "--label", "target",
                     "--no-protected", REASON)
        ran = _cli(home, config, "pipeline", "run", "--data", str(sample), "--select",
                   "dataset,validated_dataset,trained_model,model_evaluation,scan_report,model_signature,"
                   "attestation,registered_model")
        onboarding = time.perf_counter() - started
        ok = added.returncode == 0 and ran.returncode == 0 and "registered_model" in ran.stdout
        if not ok:
            print(added.stderr[-800:], ran.stdout[-1500:], ran.stderr[-800:], file=sys.stderr)
        demo_home = root / "home-gc"
        started = time.perf_counter()
        demo_run = _cli(demo_home, config, "pipeline", "run", "--select",
             "dataset,validated_dataset,trained_model,model_evaluation,scan_report,model_signature,attestation,"
             "registered_model")
        demo = time.perf_counter() - started
        ok = ok and demo_run.returncode == 0
        figures.append(Figure(16, "onboarding: model add + pipeline run -> signed candidate (breast cancer)",
                              onboarding, "s", "German credit pipeline run, same stages", demo, "reported", ok))
    return figures


def main(argv: list[str] | None = None) -> Any:
    for figure in run("--quick" in (argv or sys.argv[1:])):  # `python -m bench --only models` prints the table
        print(f"{figure.name}: {figure.value:.3f} {figure.unit}; {figure.baseline} {figure.baseline_value:.3f}; "
              f"ratio {figure.ratio:.2f} ({figure.goal}: {'met' if figure.ok else 'NOT met'})")


if __name__ == "__main__":
    main()
