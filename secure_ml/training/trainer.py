"""Deterministic, isolated training of a tabular MLP, with encrypted checkpoints and a full record.

    config = TrainingConfig.from_mapping(settings.load_config("training")["training"])
    result = train_model(train_frame, DataSpec(label="risk", numeric=[...], categorical=[...]),
                         config, out_dir, isolation=IsolationPolicy(), checkpoints=CheckpointStore(...),
                         provenance={"train_sha256": ..., "actor": "alice"}, on_progress=print)
    result.weights_sha256        # same data + code + config => the same digest, on CPU
    predict = load_predictor(out_dir)          # secure_ml.training.predictor

How: preprocessing is fitted here (in the caller's process; secure_ml.training.features); only
the encoded float arrays cross to the isolated training process (secure_ml.training.sandbox,
which runs the entry point secure_ml.training.loop names), which has no network, no secrets and
no keys. Every ``checkpoint_every`` epochs it sends a checkpoint that the caller encrypts
(secure_ml.training.checkpoints); a run that dies resumes from the newest checkpoint whose tag,
digest and versioned fingerprint verify. Checkpoints of the same data made by other code or
another fingerprint version are reported in the record (``result.checkpoints_superseded``) and
the audit log, and training starts fresh. The model directory and its record are written by
secure_ml.training.record.

Every ``segment_epochs`` epochs (and at epoch 0 and the end) the full state is recorded: the
digests go into the record (``result.chain``), the states into ``training_chain.safetensors``, so
secure_ml.training.proof can later re-execute any segment instead of training again.

The pieces, one concern each: config (settings, device), features (preprocessing), model (the
network), engine (the fast epoch), loop (the training loop and sandbox entry points), chain (the
recorded states), proof (replaying segments), checkpoints, record (model directory,
record, model card), predictor (loading), sandbox with policy, confine and child (the isolated
process), watch (its behaviour against recent runs); this module runs them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from secure_ml.custody.integrity import sha256_bytes
from secure_ml.errors import IntegrityError
from secure_ml.training.chain import CHAIN_FILE
from secure_ml.training.checkpoints import CheckpointStore, checkpoint_meta, run_fingerprint
from secure_ml.training.config import TrainingConfig, resolve_device
from secure_ml.training.features import DataSpec, Preprocessing
from secure_ml.training.loop import ENTRY, fit_arrays
from secure_ml.training.record import RECORD_FORMAT, code_version, environment, hardware, write_model_dir
from secure_ml.training.sandbox import IsolationPolicy, Prepared, claim_or_prepare, run_isolated

Progress = Callable[[dict[str, Any]], None]
# What runs the training entry point on one job, isolated: sandbox.run_isolated (the default), or a
# pod's handover (secure_ml.training.handover.run_handed_over, bound to its launch by the caller).
Runner = Callable[..., dict[str, Any]]


@dataclass
class FitResult:
    weights: bytes
    losses: list[float]
    device: str
    resumed_from_epoch: int | None
    isolation: dict[str, Any]
    seconds: float
    checkpoints_written: int = 0
    checkpoints_superseded: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    chain: bytes = b""                                       # the chain's states (training_chain.safetensors)
    chain_entries: list[dict[str, Any]] = field(default_factory=list)   # epoch and state digest of each
    runtime: dict[str, Any] = field(default_factory=dict)    # the torch build that trained (loop.runtime)

    @property
    def weights_sha256(self) -> str:
        return sha256_bytes(self.weights)


def fit(X: np.ndarray, y: np.ndarray, config: TrainingConfig, *, device: str = "cpu",
        isolation: IsolationPolicy | None = None, checkpoints: CheckpointStore | None = None,
        on_progress: Progress | None = None, on_start: Callable[[int], None] | None = None,
        runner: Runner | None = None, prepared: Prepared | None = None) -> FitResult:
    """Train on encoded arrays: isolated when ``isolation`` is given (the pipeline always gives
    one), in this process otherwise (the benchmark's baseline). ``runner`` replaces the local
    sandbox (run_isolated's keywords): the Kubernetes training pod's handover. ``prepared``: the
    sandbox child already started for this training (sandbox.prepare), which then gets the job."""
    fp = run_fingerprint(X, y, config, device)
    superseded = checkpoints.superseded(fp) if checkpoints is not None else []
    resume = checkpoints.latest(fp.digest) if checkpoints is not None else None
    got: dict[str, Any] = {"losses": [], "checkpoints": 0}
    started = time.perf_counter()

    def handle(kind: str, payload: bytes) -> None:
        if kind == "P":
            event = json.loads(payload)
            if "isolation" in event:
                got["facts"] = event["isolation"]
            elif on_progress is not None:
                on_progress(event)
        elif kind == "C" and checkpoints is not None:
            checkpoints.save(fp, int(checkpoint_meta(payload)["epoch"]), payload)
            got["checkpoints"] += 1
        elif kind == "W":
            got["weights"] = payload
        elif kind == "K":
            got["chain"] = payload
        elif kind == "R":
            got["result"] = json.loads(payload)

    X32 = np.ascontiguousarray(X, dtype=np.float32)
    y32 = np.ascontiguousarray(y, dtype=np.float32)
    facts: dict[str, Any] = {"isolated": False}
    if isolation is None:
        fit_arrays(X32, y32, config, device=device, fingerprint=fp.digest,
                   resume=resume[1] if resume else None, emit=handle)
    else:
        header = {"config": config.hyperparameters(), "rows": int(X32.shape[0]), "width": int(X32.shape[1]),
                  "device": device, "fingerprint": fp.digest}
        blobs: list[bytes | memoryview] = [memoryview(X32).cast("B"), memoryview(y32).cast("B")]
        if resume is not None:
            blobs.append(resume[1])
        extra = {"prepared": prepared} if prepared is not None and runner is None else {}
        applied = (runner or run_isolated)(header, blobs, entry=ENTRY, policy=isolation, on_frame=handle,
                                           threads=config.threads, on_start=on_start, **extra)
        # Isolated means: every layer of the configured level was in place, as measured.
        facts = {"isolated": bool(applied.get("level_met")), **applied}
        child = got.get("facts") or {}
        facts.update({"uid": child.get("uid"), "interfaces": child.get("interfaces"),
                      "environment": child.get("env")})
    if "weights" not in got or "result" not in got or "chain" not in got:
        raise IntegrityError("the training process ended without returning weights")
    if checkpoints is not None:
        checkpoints.clear(fp.digest)
        for stale in superseded:  # reported in this run's record and the audit log: not kept to be reported again
            checkpoints.clear(stale["checkpoints"])
    result = got["result"]
    return FitResult(got["weights"], list(result["losses"]), str(result["device"]), result.get("resumed_from_epoch"),
                     facts, time.perf_counter() - started, got["checkpoints"], superseded,
                     {"digest": fp.digest, **fp.facts()}, got["chain"], list(result["chain"]),
                     dict(result.get("runtime") or {}))


@dataclass
class TrainingResult:
    directory: Path
    weights_sha256: str
    device: str
    epochs: int
    final_loss: float
    train_rows: int
    record: dict[str, Any] = field(repr=False)
    unknown_categories: dict[str, Any] = field(default_factory=dict)


def train_model(frame: Any, spec: DataSpec, config: TrainingConfig, out_dir: Path | str, *,
                isolation: IsolationPolicy | None, checkpoints: CheckpointStore | None = None,
                provenance: Mapping[str, Any] | None = None, on_progress: Progress | None = None,
                on_start: Callable[[int], None] | None = None, cuda_available: bool | None = None,
                runner: Runner | None = None) -> TrainingResult:
    """Fit preprocessing on ``frame`` (the training split), train, and write the model directory. The frame
    is let go once encoded: a caller that keeps no reference of its own frees it before training.

    Isolated on the local sandbox, the child is started first: it sets up and imports torch while
    this process fits the preprocessing and encodes the split (two cores: that fixed cost overlaps)."""
    out_dir = Path(out_dir)
    provenance = dict(provenance or {})
    device, device_note = resolve_device(config, cuda_available=cuda_available)
    started_at = datetime.now(UTC)
    ready = claim_or_prepare(isolation, entry=ENTRY, threads=config.threads) \
        if isolation is not None and runner is None else None
    try:
        prep = Preprocessing.fit(frame, spec)
        X, _ = prep.transform(frame, where="training split")
        y = prep.labels(frame, where="training split")
        rows = len(frame)
        del frame  # the float32 matrix is what trains (10M rows: the frame is about as large again)
        result = fit(X, y, config, device=device, isolation=isolation, checkpoints=checkpoints,
                     on_progress=on_progress, on_start=on_start, runner=runner, prepared=ready)
    finally:
        if ready is not None:
            ready.close()  # a no-op once the run took it
    finished_at = datetime.now(UTC)
    weights_sha = result.weights_sha256
    record = {
        "format": RECORD_FORMAT,
        "seeds": {"seed": config.seed, "torch_manual_seed": config.seed,
                  "epoch_dropout_seed": "seed + 1 + epoch", "epoch_shuffle_seed": "seed * 1009 + epoch"},
        "hyperparameters": {**config.hyperparameters(), "optimizer": "Adam (fused)", "loss": "binary cross-entropy",
                            "architecture": "MLP (Linear-ReLU-Dropout)*, single logit"},
        "determinism": {"torch.use_deterministic_algorithms": True, "threads": config.threads,
                        "CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
        "data": {"label": spec.label, "numeric": list(spec.numeric), "categorical": list(spec.categorical),
                 "train_rows": rows, "inputs": prep.width,
                 "train_sha256": provenance.get("train_sha256"), "test_sha256": provenance.get("test_sha256"),
                 "dataset_sha256": provenance.get("dataset_sha256"),
                 "dvc_version": provenance.get("dvc_version"), "source": provenance.get("source"),
                 "encoded_sha256": result.fingerprint["inputs_sha256"]},
        "code": code_version(),
        "environment": environment(result.runtime or None),
        "hardware": hardware(device, result.runtime or None),
        "device": device,
        "device_note": device_note,
        "isolation": result.isolation,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "duration_s": round((finished_at - started_at).total_seconds(), 3),
        "actor": provenance.get("actor") or "unknown",
        "result": {"weights_sha256": weights_sha, "epochs": config.epochs, "final_loss": result.losses[-1],
                   "losses": result.losses, "resumed_from_epoch": result.resumed_from_epoch,
                   "checkpoints_written": result.checkpoints_written,
                   "checkpoint_fingerprint": result.fingerprint,
                   "checkpoints_superseded": result.checkpoints_superseded,
                   # Proof-of-Learning: the digest of every segment boundary's state (secure_ml.training.chain)
                   "chain": result.chain_entries, "chain_file": CHAIN_FILE},
    }
    write_model_dir(out_dir, result.weights, prep, config, record, chain=result.chain)
    return TrainingResult(out_dir, weights_sha, device, config.epochs, result.losses[-1], rows, record)

