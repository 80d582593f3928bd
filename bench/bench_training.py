"""Training benchmarks (issue 4): time on the sample, rows/s at scale, the cost of isolation, CUDA.

    python -m bench --only training [--quick]

- Training on the sample (shipped training.yaml, isolated process, CPU), against the 30 s budget.
- Rows/s per epoch on a derived dataset of 1,000,000 rows (quick: 100,000): the sample's rows
  resampled with jittered numerics, trained isolated with the shipped settings; baseline: rows/s
  per epoch on the sample itself, in the same run (does throughput hold at scale?).
- Isolation overhead: the same training on the same derived data, isolated vs in this process,
  measured back to back (goal <= 1.2x); the two must give the same weights digest.
- CUDA: the same rows/s figure on a GPU where there is one; "n/a (no GPU)" otherwise.
- Loop throughput (issue 17): rows/s per epoch at the configured batch size, the training loop
  (secure_ml.training.loop, in this process) against today's loop before issue 17
  (bench/baseline_loop.py) on the same derived arrays, alternated, best epoch of each; goal >= 3x,
  and two runs of the new loop must give bit-identical weights.
- Sandbox set-up: starting ``true`` through the sandbox (secure_ml.training.sandbox.run_command, the
  path training and ``secure-ml sandbox run`` take) against starting it bare; median of 15 each,
  goal <= 100 ms over bare.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import Figure
from secure_ml.data import splitting
from secure_ml.settings import Settings
from secure_ml.training.sandbox import IsolationPolicy
from secure_ml.training.config import TrainingConfig
from secure_ml.training.features import DataSpec, Preprocessing
from secure_ml.training.trainer import fit, train_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "german_credit.csv"
SPEC = DataSpec("risk", ["job", "credit_amount", "duration", "age"],
                ["sex", "housing", "saving_accounts", "checking_account", "purpose"])
ISSUE = 4


def derived(frame: pd.DataFrame, rows: int, seed: int = 0) -> pd.DataFrame:
    """``rows`` rows resampled from ``frame`` with jittered numerics (labels and categories kept)."""
    rng = np.random.default_rng(seed)
    out = frame.iloc[rng.integers(0, len(frame), rows)].reset_index(drop=True)
    out["credit_amount"] = np.maximum(1, (out["credit_amount"] * rng.lognormal(0, 0.1, rows)).round()).astype(int)
    out["duration"] = np.clip(out["duration"] + rng.integers(-2, 3, rows), 1, 120)
    out["age"] = np.clip(out["age"] + rng.integers(-2, 3, rows), 18, 100)
    return out


def _config() -> tuple[TrainingConfig, IsolationPolicy]:
    config = Settings.from_env().load_config("training")
    return TrainingConfig.from_mapping(config["training"]), IsolationPolicy.from_mapping(config.get("isolation"))


def run(quick: bool) -> list[Figure]:
    config, policy = _config()
    frame = pd.read_csv(SAMPLE)
    train, _ = splitting.split(frame, "risk", test_fraction=0.2, seed=20261123)
    figures: list[Figure] = []

    # 1. The sample, as the pipeline trains it.
    sample_rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        train_model(train, SPEC, config, Path(tmp) / "m", isolation=policy,
                    on_progress=lambda e: sample_rates.append(float(e["rows_per_s"] or 0)))
        seconds = time.perf_counter() - started
    figures.append(Figure(ISSUE, f"train on the sample ({len(train)} rows, {config.epochs} epochs, isolated, CPU)",
                          seconds, "s", "budget", 30.0, "<= 30 s", seconds <= 30.0))
    sample_rate = float(np.median(sample_rates[1:] or sample_rates))

    # 2. and 3. A derived dataset: throughput, then isolated vs in-process on the same arrays.
    rows = 100_000 if quick else 1_000_000
    big = derived(train, rows)
    prep = Preprocessing.fit(big, SPEC)
    X, _ = prep.transform(big)
    y = prep.labels(big)
    epochs = 1 if quick else 2
    scaled = TrainingConfig.from_mapping({**config.hyperparameters(), "epochs": epochs, "checkpoint_every": 0})
    rates: list[float] = []
    started = time.perf_counter()
    isolated = fit(X, y, scaled, isolation=policy, on_progress=lambda e: rates.append(float(e["rows_per_s"] or 0)))
    isolated_s = time.perf_counter() - started
    started = time.perf_counter()
    in_process = fit(X, y, scaled, isolation=None)
    in_process_s = time.perf_counter() - started
    rate = float(np.median(rates))
    label = f"{rows:,}"
    figures.append(Figure(ISSUE, f"rows/s per epoch, {label} derived rows (isolated, CPU, batch {scaled.batch_size})",
                          rate, "rows/s", "sample rows/s", sample_rate, ">= 0.8x", rate >= 0.8 * sample_rate))
    same = isolated.weights_sha256 == in_process.weights_sha256
    figures.append(Figure(ISSUE, f"isolated vs in-process training, {label} rows x {epochs} epoch(s)"
                                 f"{'' if same else ' (WEIGHTS DIFFER)'}",
                          isolated_s, "s", "in-process s", in_process_s, "<= 1.2x",
                          same and isolated_s <= 1.2 * in_process_s))

    # 3b. Issue 14: the whole training step isolated vs in this process, interleaved.
    figures.append(isolation_cost(train, rows, epochs, config, policy))

    # 4. The loop against today's loop before issue 17, same arrays, same run.
    figures.append(loop_throughput(X[: 100_000 if quick else 300_000], y[: 100_000 if quick else 300_000], config))
    # 5. CUDA, where there is one.
    figures.append(_cuda(X, y, scaled, policy, rate, label))
    figures.append(sandbox_overhead())
    return figures


def isolation_cost(train: pd.DataFrame, rows: int, epochs: int, config: TrainingConfig, policy: IsolationPolicy,
                   rounds: int = 2) -> Figure:
    """Issue 14: the training step (train_model: encode the split, train, write the model directory)
    isolated against in this process, on ``rows`` derived rows, alternated ``rounds`` times; the ratio of
    the medians. Isolated, the sandbox child starts first and imports torch while the split is encoded
    (as in the pipeline); in-process, torch is already imported (the baseline pays no import)."""
    import statistics

    import torch  # noqa: F401 - the in-process baseline starts warm

    big = derived(train, rows)
    scaled = TrainingConfig.from_mapping({**config.hyperparameters(), "epochs": epochs, "checkpoint_every": 0})
    seconds: dict[str, list[float]] = {"isolated": [], "in-process": []}
    digests: set[str] = set()
    for _ in range(rounds):
        for name, isolation in (("isolated", policy), ("in-process", None)):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                result = train_model(big, SPEC, scaled, Path(tmp) / "m", isolation=isolation)
                seconds[name].append(time.perf_counter() - started)
                digests.add(result.weights_sha256)
    isolated, in_process = statistics.median(seconds["isolated"]), statistics.median(seconds["in-process"])
    same = len(digests) == 1
    runs = " / ".join(f"{a:.1f}" for a in seconds["isolated"])
    return Figure(14, f"training step isolated vs in-process, {rows:,} rows x {epochs} epoch(s), {rounds} runs each "
                      f"interleaved (isolated {runs} s){'' if same else ' (WEIGHTS DIFFER)'}",
                  isolated, "s", "in-process s", in_process, "<= 1.05x", same and isolated <= 1.05 * in_process)


def loop_throughput(X: Any, y: Any, config: TrainingConfig, rounds: int = 2) -> Figure:
    """Best rows/s per epoch of the new loop and of the old one, alternated ``rounds`` times (1 epoch each)."""
    from bench.baseline_loop import train_baseline

    one = TrainingConfig.from_mapping({**config.hyperparameters(), "epochs": 1, "checkpoint_every": 0})
    new_rates: list[float] = []
    old_rates: list[float] = []
    digests = set()
    for _ in range(rounds):
        result = fit(X, y, one, on_progress=lambda e: new_rates.append(float(e["rows_per_s"] or 0)))
        digests.add(result.weights_sha256)
        old_rates.extend(train_baseline(X, y, one)[2])
    new, old = max(new_rates), max(old_rates)
    same = len(digests) == 1
    return Figure(17, f"loop rows/s, {len(X):,} rows, batch {config.batch_size}, 1 thread"
                      f"{'' if same else ' (WEIGHTS DIFFER RUN TO RUN)'}",
                  new, "rows/s", "pre-issue-17 loop rows/s", old, ">= 3x", same and new >= 3 * old)


def sandbox_overhead(runs: int = 15) -> Figure:
    """Median wall time of a sandboxed start of ``true`` against a bare one."""
    import statistics
    import subprocess

    from secure_ml.training.sandbox import IsolationPolicy as Policy
    from secure_ml.training.sandbox import run_command

    policy = Policy()
    run_command(["true"], policy=policy)  # first use probes the host's namespaces once

    def median_ms(start: Any) -> float:
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            start()
            times.append(time.perf_counter() - began)
        return statistics.median(times) * 1000

    bare = median_ms(lambda: subprocess.run(["true"], check=True))
    boxed = median_ms(lambda: run_command(["true"], policy=policy))
    return Figure(ISSUE, "sandbox set-up: `true` sandboxed vs bare (median of 15)", boxed, "ms", "bare ms", bare,
                  "<= bare + 100 ms", boxed <= bare + 100)


def _cuda(X: Any, y: Any, config: TrainingConfig, policy: IsolationPolicy, cpu_rate: float, label: str) -> Figure:
    import torch

    if not torch.cuda.is_available():
        return Figure(ISSUE, f"rows/s per epoch, {label} rows on CUDA: n/a (no GPU)", math.nan, "rows/s",
                      "CPU rows/s", cpu_rate, "n/a (no GPU)", True)
    cuda = TrainingConfig.from_mapping({**config.hyperparameters(), "device": "cuda"})
    rates: list[float] = []
    fit(X, y, cuda, device="cuda", isolation=policy, on_progress=lambda e: rates.append(float(e["rows_per_s"] or 0)))
    rate = float(np.median(rates))
    return Figure(ISSUE, f"rows/s per epoch, {label} rows on CUDA ({torch.cuda.get_device_name(0)})", rate,
                  "rows/s", "CPU rows/s", cpu_rate, "reported", True)


if __name__ == "__main__":  # python -m bench.bench_training [ROWS] [EPOCHS] [ROUNDS]: the issue-14 row alone
    import os
    import sys

    rows_, epochs_, rounds_ = (int(a) for a in (sys.argv[1:] + ["1000000", "2", "2"][len(sys.argv) - 1:])[:3])
    config_, policy_ = _config()
    train_, _ = splitting.split(pd.read_csv(SAMPLE), "risk", test_fraction=0.2, seed=20261123)
    figure = isolation_cost(train_, rows_, epochs_, config_, policy_, rounds=rounds_)
    print(f"load {os.getloadavg()[0]:.2f}: {figure}")
