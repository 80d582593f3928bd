"""Re-checking a training run from its recorded chain, without training again (Proof-of-Learning spot checks).

    report = verify_segments(model_dir, train_frame, k=3, run_id=run_id, isolation=IsolationPolicy())
    report.passed, report.reason()        # every chosen segment re-executed to the chain's digest
    report.metadata()                     # segments, which were checked, detection probability

``model_dir`` is a model directory (secure_ml.training.record); ``train_frame`` is the train
split its record names (``data.train_sha256``). First the chain itself: each stored state must
hash to the digest the training record holds, and the last state's weights must be
``model.safetensors`` (secure_ml.training.chain; a tampered chain is an IntegrityError). Then
the train split must encode to the inputs the record says were trained on. Then k segments,
chosen from the run id hashed with the data digest (the trainer cannot predict them), are
re-executed from their recorded start states, all in one sandbox start (one torch import), and
each end state's digest is compared with the chain's. A trainer who faked a fraction f of the
segments is caught with probability at least 1 - (1 - f)^k.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secure_ml.errors import BadInput, IntegrityError
from secure_ml.training.chain import CHAIN_FILE, TrainingChain, choose_segments, detection_probability, exact_detection
from secure_ml.training.checkpoints import run_fingerprint
from secure_ml.training.config import TrainingConfig
from secure_ml.training.features import Preprocessing
from secure_ml.training.loop import SEGMENT_ENTRY, replay_segments
from secure_ml.training.sandbox import IsolationPolicy, run_isolated

Runner = Callable[..., dict[str, Any]]  # run_isolated's keywords (secure_ml.training.trainer.Runner)

FAKED_FRACTIONS = (0.1, 0.25, 0.5)


@dataclass
class SegmentReport:
    """What a spot check of a training chain found."""

    total: int
    k: int
    checked: list[tuple[int, int]]
    mismatched: list[tuple[int, int]]
    seconds: float
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checked) and not self.mismatched

    def detection(self) -> dict[str, float]:
        """Chance of catching a trainer who faked a fraction f of the segments, for a few f."""
        chance = {f"f={f:g}": round(detection_probability(f, len(self.checked)), 4) for f in FAKED_FRACTIONS}
        chance["one_faked_segment_exact"] = round(exact_detection(self.total, 1, len(self.checked)), 4)
        return chance

    def reason(self) -> str:
        spans = ", ".join(f"epochs {a}-{b}" for a, b in self.checked)
        if self.mismatched:
            bad = ", ".join(f"epochs {a}-{b}" for a, b in self.mismatched)
            return (f"re-executed {len(self.checked)} of {self.total} segments: {bad} did not reach the state the "
                    "chain records (faked or non-deterministic training, or other code)")
        return (f"re-executed {len(self.checked)} of {self.total} segments ({spans}): each reached the state the "
                f"chain records; detection probability 1-(1-f)^{len(self.checked)} = "
                f"{detection_probability(0.1, len(self.checked)):.2f} at f=0.1")

    def metadata(self) -> dict[str, Any]:
        return {"segments_total": self.total, "segments_checked": len(self.checked),
                "checked": [list(s) for s in self.checked], "mismatched": [list(s) for s in self.mismatched],
                "detection_formula": f"1 - (1 - f)^{len(self.checked)}", "detection_probability": self.detection(),
                "seconds": round(self.seconds, 3)}


def training_config(record: Mapping[str, Any]) -> TrainingConfig:
    """The configuration a record says the model was trained with."""
    hyper = record.get("hyperparameters")
    if not isinstance(hyper, Mapping):
        raise BadInput("the training record has no hyperparameters")
    return TrainingConfig.from_mapping({k: v for k, v in hyper.items() if k in TrainingConfig.__dataclass_fields__})


def read_model_dir(model_dir: Path) -> tuple[dict[str, Any], bytes, bytes, Preprocessing]:
    """(training record, weights bytes, chain bytes, preprocessing) of a model directory."""
    try:
        record = json.loads((model_dir / "training_record.json").read_text())
        prep = Preprocessing.from_json(json.loads((model_dir / "preprocessing.json").read_text()))
        weights = (model_dir / "model.safetensors").read_bytes()
    except (OSError, ValueError) as exc:
        raise BadInput(f"model directory {model_dir} is unreadable ({exc})") from None
    if not isinstance(record, dict):
        raise BadInput("training_record.json is not a JSON object")
    try:
        chain = (model_dir / CHAIN_FILE).read_bytes()
    except OSError:
        raise IntegrityError(f"the model has no {CHAIN_FILE}: trained before training chains were "
                             "recorded, it can only be checked by training again") from None
    return record, weights, chain, prep


def verify_segments(model_dir: Path, frame: Any, *, k: int, run_id: str, isolation: IsolationPolicy | None,
                    segments: Sequence[int] | None = None, runner: Runner | None = None) -> SegmentReport:
    """Check the chain, then re-execute k segments (or the ``segments`` indexes given) from their start
    states. Raises IntegrityError when the chain, the record, the weights or the data do not agree.
    ``runner`` replaces the local sandbox (run_isolated's keywords; a training pod on Kubernetes)."""
    started = time.perf_counter()
    record, weights, chain_bytes, prep = read_model_dir(model_dir)
    result = record.get("result") or {}
    recorded = result.get("chain") or []
    chain = TrainingChain.from_bytes(chain_bytes)
    chain.verify(recorded, weights)
    config = training_config(record)
    device = str(record.get("device") or "cpu")
    X, _ = prep.transform(frame, where="train split")
    y = prep.labels(frame, where="train split")
    del frame  # encoded: let it go (a caller that keeps no reference of its own frees it before the replay)
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    y32 = np.ascontiguousarray(y, dtype=np.float32)
    data = record.get("data") or {}
    # Replaying on other data would prove nothing about the model: the inputs must be the ones trained on.
    if run_fingerprint(X32, y32, config, device).inputs != data.get("encoded_sha256"):
        raise IntegrityError("the train split does not encode to the inputs the training record names "
                             "(data.encoded_sha256): other data, preprocessing or configuration")
    spans = chain.segments
    if segments is None:
        picks = choose_segments(len(spans), k, run_id=run_id, data_sha256=str(data.get("train_sha256") or ""))
    else:
        bad = [i for i in segments if not 0 <= i < len(spans)]
        if bad:
            raise BadInput(f"segment {bad[0]} does not exist: the chain has segments 0..{len(spans) - 1}")
        picks = sorted(set(segments))
    chosen = [spans[i] for i in picks]
    digests, facts = _replay(X32, y32, config, chain_bytes, chosen, device, isolation, runner)
    expected = {int(e["epoch"]): str(e["state_sha256"]) for e in recorded}
    mismatched = [span for span, digest in zip(chosen, digests, strict=True) if expected[span[1]] != digest]
    return SegmentReport(len(spans), k, chosen, mismatched, time.perf_counter() - started, facts)


def _replay(X: np.ndarray, y: np.ndarray, config: TrainingConfig, chain_bytes: bytes, spans: list[tuple[int, int]],
            device: str, isolation: IsolationPolicy | None,
            runner: Runner | None = None) -> tuple[list[str], dict[str, Any]]:
    if isolation is None:
        return replay_segments(X, y, config, chain_bytes, spans, device=device), {"isolated": False}
    got: dict[str, Any] = {}

    def handle(kind: str, payload: bytes) -> None:
        if kind == "R":
            got["segments"] = json.loads(payload)["segments"]

    header = {"config": config.hyperparameters(), "rows": int(X.shape[0]), "width": int(X.shape[1]),
              "device": device, "segments": [list(s) for s in spans]}
    blobs = [memoryview(X).cast("B"), memoryview(y).cast("B"), chain_bytes]
    applied = (runner or run_isolated)(header, blobs, entry=SEGMENT_ENTRY, policy=isolation, on_frame=handle,
                           threads=config.threads)
    replies = got.get("segments") or []
    if [(int(a), int(b)) for a, b, _ in replies] != spans:
        raise IntegrityError("the segment replay ended without a digest for every segment")
    return [str(d) for _, _, d in replies], {"isolated": bool(applied.get("level_met"))}
