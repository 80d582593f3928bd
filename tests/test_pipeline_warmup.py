"""`secure-ml pipeline run` begins its later steps' fixed costs beside the ingest run (issue 17).

Touches: run_pipeline in this process on a real Dagster instance and home, on a drop the poisoning
screen rejects: Great Expectations in a warm worker process (the audit record says where the suite
ran), the training sandbox started before the ingest run; and that a pipeline run that stops early leaves no worker, sandbox or child process behind. Does not
touch: timing (bench/bench_scale.py measures the sample inside Dagster), a run that trains (the
trainer claiming its warm sandbox: tests/test_end_to_end.py runs the whole pipeline through the CLI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from secure_ml.data import validation as gx_validation
from secure_ml.data.poisoning import flip_labels
from secure_ml.settings import Settings
from secure_ml.training import sandbox
from tests.conftest import SAMPLE_CSV, land_file

pytestmark = pytest.mark.slow  # an ingest run on a real instance


def _children() -> set[int]:
    """Live child processes of this process (every thread's)."""
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        found |= {int(pid) for pid in (task / "children").read_text().split()}
    return {pid for pid in found if Path(f"/proc/{pid}/stat").exists()
            and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"}


def test_a_rejected_drop_validated_in_the_worker_leaves_nothing_running(settings: Settings, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_ml.definitions import _warm_up, run_pipeline

    monkeypatch.setattr(gx_validation, "_STATE", {})  # as in a fresh `secure-ml` process: GE not loaded yet
    before = _children()
    picked = {dg.AssetKey(name) for name in ("dataset", "validated_dataset", "trained_model", "model_evaluation")}
    warmed = _warm_up(settings, picked)  # what run_pipeline begins: a GE worker, a training sandbox
    assert len(warmed) == 1 and len(gx_validation._WORKER) == 1
    assert {warmed[0].started.process.pid, gx_validation._WORKER[0].pid} <= _children() - before
    for prepared in warmed:
        sandbox.discard(prepared)
    gx_validation.discard_worker()
    assert _children() == before

    poisoned, _ = flip_labels(pd.read_csv(SAMPLE_CSV), "risk", 0.10, seed=3)
    poisoned.to_csv(tmp_path / "german_credit-poisoned.csv", index=False)
    drop = land_file(settings, tmp_path / "german_credit-poisoned.csv")
    summary = run_pipeline(settings, drop=drop, tags={"secure_ml/drop": drop})
    assert not summary["success"] and [r["job"] for r in summary["runs"]] == ["ingest"]
    assert summary["failed_blocking_checks"] == ["validated_dataset:poisoning_below_limit"], summary
    log = settings.home / "audit" / "audit.jsonl"
    [validated] = [json.loads(line) for line in log.read_text().splitlines()
                   if json.loads(line)["action"] == "validation.expectations"]
    assert validated["details"]["ran"] == "worker" and validated["outcome"] == "pass"
    # the sandbox warmed for training ended with the run; the worker ended with its job
    assert not sandbox._WARM and not gx_validation._WORKER
    assert _children() == before, [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in _children() - before]
    assert os.getpid() not in _children()


def test_between_runs_the_freed_heap_goes_back_to_the_os() -> None:
    """run_pipeline calls release_memory after each run: what a run freed (pyarrow's pool, the C heap) is
    returned, so a 10M-row ingest's peak is not the training run's floor."""
    import io

    import numpy as np

    from secure_ml.definitions import release_memory

    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    rows = 2_000_000
    frame = pd.DataFrame({"a": np.arange(rows), "b": np.random.default_rng(0).random(rows),
                          "c": np.random.default_rng(1).choice(["good", "bad", "unknown"], rows)})
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    copies = [pd.read_parquet(io.BytesIO(buffer.getvalue())) for _ in range(3)]
    before = rss_mib()
    del frame, copies, buffer
    freed_but_kept = rss_mib()
    release_memory()
    after = rss_mib()
    print(f"RSS MiB: live {before:.0f}, freed {freed_but_kept:.0f}, released {after:.0f}")
    assert freed_but_kept - after > 50, (before, freed_but_kept, after)  # kept by the allocators, then returned
