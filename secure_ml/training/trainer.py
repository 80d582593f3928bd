"""Deterministic, isolated training of a tabular MLP, with encrypted checkpoints and a full record.

    config = TrainingConfig.from_mapping(settings.load_config("training")["training"])
    result = train_model(train_frame, DataSpec(label="risk", numeric=[...], categorical=[...]),
                         config, out_dir, isolation=IsolationPolicy(), checkpoints=CheckpointStore(...),
                         provenance={"train_sha256": ..., "actor": "alice"}, on_progress=print)
    result.weights_sha256        # same data + code + config => the same digest, on CPU
    predict = load_predictor(out_dir)          # rows (dicts) -> probabilities

What it writes into ``out_dir``: ``model.safetensors`` (weights; never a pickle),
``config.json`` (architecture, decision threshold), ``preprocessing.json`` (the standardisation
and one-hot categories, fitted on the training split only), ``training_record.json`` (seeds,
hyper-parameters, data digests, code commit and dirty flag, Python/torch/package versions from
requirements.lock, hardware, device, isolation facts, start/end, actor) and ``MODEL_CARD.md``.

How: preprocessing is fitted here (in the caller's process); only the encoded float arrays
cross to the isolated training process (secure_ml.sandbox), which has no network, no secrets
and no keys. Every ``checkpoint_every`` epochs it sends a checkpoint (safetensors: weights,
optimiser state, epoch) that the caller encrypts (:class:`CheckpointStore`, AES-256-GCM via
secure_ml.crypto); a run that dies resumes from the newest checkpoint whose tag and digest
verify, and ends with the same weights as an uninterrupted run, because each epoch's shuffling
and dropout are seeded from (seed, epoch) alone.

A category not seen in training becomes the all-zero code (no known category's weight applies)
and is counted in :meth:`Preprocessing.transform`'s report; NaN or infinite numbers are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from secure_ml.custody import crypto
from secure_ml.custody.audit import AuditLog
from secure_ml.custody.integrity import SHA256_HEX, atomic_write, atomic_write_bytes, sha256_bytes
from secure_ml.custody.keys import KeyProvider
from secure_ml.errors import BadInput, ConfigurationError, Error, IntegrityError
from secure_ml.governance import code_identity
from secure_ml.training.sandbox import IsolationPolicy, run_isolated

REPO = Path(__file__).resolve().parents[2]
MODEL_FORMAT = "secure-ml-model/1"
PREPROCESSING_FORMAT = "secure-ml-preprocessing/1"
RECORD_FORMAT = "secure-ml-training-record/1"
CHECKPOINT_FORMAT = "secure-ml-checkpoint/1"
DEVICES = ("cpu", "cuda", "auto")
MODEL_FILES = ("model.safetensors", "config.json", "preprocessing.json", "training_record.json", "MODEL_CARD.md")
RECORD_REQUIRED = ("format", "seeds", "hyperparameters", "data", "code", "environment", "hardware", "device",
                   "isolation", "started_at", "finished_at", "actor", "result")

Progress = Callable[[dict[str, Any]], None]


# -- configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters and run settings (``training:`` in training.yaml)."""

    hidden: tuple[int, ...] = (32, 16)
    dropout: float = 0.1
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 0.003
    weight_decay: float = 0.0001
    seed: int = 20261123
    threads: int = 1
    device: str = "cpu"
    cuda_fallback: bool = False
    checkpoint_every: int = 5
    threshold: float = 0.5

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> TrainingConfig:
        data = dict(data or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"training: unknown setting {unknown[0]!r}")
        try:
            config = cls(
                hidden=tuple(int(h) for h in data.get("hidden", cls.hidden)),
                dropout=float(data.get("dropout", cls.dropout)),
                epochs=int(data.get("epochs", cls.epochs)),
                batch_size=int(data.get("batch_size", cls.batch_size)),
                learning_rate=float(data.get("learning_rate", cls.learning_rate)),
                weight_decay=float(data.get("weight_decay", cls.weight_decay)),
                seed=int(data.get("seed", cls.seed)),
                threads=int(data.get("threads", cls.threads)),
                device=str(data.get("device", cls.device)),
                cuda_fallback=bool(data.get("cuda_fallback", cls.cuda_fallback)),
                checkpoint_every=int(data.get("checkpoint_every", cls.checkpoint_every)),
                threshold=float(data.get("threshold", cls.threshold)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"training: a setting has the wrong type ({exc})") from None
        return config.validated()

    def validated(self) -> TrainingConfig:
        problems = [
            (not self.hidden or any(h < 1 for h in self.hidden), "hidden must list positive layer widths"),
            (not 0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.epochs < 1, "epochs must be at least 1"),
            (self.batch_size < 1, "batch_size must be at least 1"),
            (not (self.learning_rate > 0 and math.isfinite(self.learning_rate)), "learning_rate must be positive"),
            (self.weight_decay < 0, "weight_decay must not be negative"),
            (self.threads < 1, "threads must be at least 1"),
            (self.device not in DEVICES, f"device must be one of {', '.join(DEVICES)}"),
            (self.checkpoint_every < 0, "checkpoint_every must be 0 (never) or more"),
            (not 0 < self.threshold < 1, "threshold must be in (0, 1)"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigurationError(f"training: {message}")
        return self

    def hyperparameters(self) -> dict[str, Any]:
        """What determines the weights (the digest of this is part of the checkpoint binding)."""
        values = asdict(self)
        values["hidden"] = list(self.hidden)
        return values


def resolve_device(config: TrainingConfig, *, cuda_available: bool | None = None) -> tuple[str, str]:
    """(device, note). A GPU asked for but absent is an error unless ``cuda_fallback`` is set."""
    if config.device == "cpu":
        return "cpu", ""
    if cuda_available is None:
        import torch

        cuda_available = bool(torch.cuda.is_available())
    if cuda_available:
        return "cuda", ""
    if config.device == "auto":
        return "cpu", "device auto: no CUDA GPU here, trained on the CPU"
    if config.cuda_fallback:
        return "cpu", "device cuda asked for but no CUDA GPU is available: fell back to the CPU (cuda_fallback: true)"
    raise ConfigurationError("training.device is 'cuda' but no CUDA GPU is available on this machine "
                             "(torch.cuda.is_available() is False); set device: cpu, or cuda_fallback: true "
                             "to train on the CPU instead")


# -- preprocessing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    label: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]

    def __init__(self, label: str, numeric: Sequence[str], categorical: Sequence[str]) -> None:
        object.__setattr__(self, "label", str(label))
        object.__setattr__(self, "numeric", tuple(str(c) for c in numeric))
        object.__setattr__(self, "categorical", tuple(str(c) for c in categorical))

    @classmethod
    def from_validated(cls, validated: Mapping[str, Any]) -> DataSpec:
        try:
            return cls(validated["label"], validated["numeric"], validated["categorical"])
        except (KeyError, TypeError):
            raise BadInput("validated_dataset lacks label, numeric or categorical") from None


@dataclass(frozen=True)
class Preprocessing:
    """Standardisation of numerics and one-hot codes of categoricals; JSON only (no pickle)."""

    label: str
    numeric: dict[str, tuple[float, float]]
    categorical: dict[str, tuple[str, ...]]

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(c) for c in self.categorical.values())

    @classmethod
    def fit(cls, frame: Any, spec: DataSpec) -> Preprocessing:
        """Fit on the training split only; refuses empty, one-class or non-finite training data."""
        import pandas as pd

        missing = [c for c in (spec.label, *spec.numeric, *spec.categorical) if c not in frame.columns]
        if missing:
            raise BadInput(f"training split lacks column {missing[0]!r}")
        if len(frame) == 0:
            raise BadInput("the training split is empty: nothing to train on")
        labels = _labels(frame[spec.label], "training split")
        classes = sorted(set(labels.tolist()))
        if len(classes) < 2:
            raise BadInput(f"the training split has one class only ({spec.label} = {int(classes[0])}): "
                           "a classifier needs both")
        numeric: dict[str, tuple[float, float]] = {}
        for name in spec.numeric:
            values = _numbers(frame[name], name, "training split")
            std = float(values.std())
            numeric[name] = (float(values.mean()), std if std > 0 and math.isfinite(std) else 1.0)
        categorical: dict[str, tuple[str, ...]] = {}
        for name in spec.categorical:
            column = frame[name]
            known = sorted({str(v) for v in column[pd.notna(column)].tolist()})
            categorical[name] = tuple(known)
        return cls(spec.label, numeric, categorical)

    def transform(self, frame: Any, *, where: str = "data") -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
        """(float32 matrix, unknown categories per column: {count, values}). Non-finite numbers refused."""
        import pandas as pd

        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise BadInput(f"{where} lacks column {missing[0]!r}")
        out = np.zeros((len(frame), self.width), dtype=np.float32)
        for i, (name, (mean, std)) in enumerate(self.numeric.items()):
            out[:, i] = (_numbers(frame[name], name, where) - mean) / std
        column = len(self.numeric)
        unknown: dict[str, dict[str, Any]] = {}
        for name, categories in self.categorical.items():
            values = frame[name]
            index = {c: j for j, c in enumerate(categories)}
            codes = np.array([index.get(str(v), -1) if pd.notna(v) else -1 for v in values.tolist()], dtype=np.int64)
            rows = np.flatnonzero(codes >= 0)
            out[rows, column + codes[rows]] = 1.0
            if (codes < 0).any():
                seen = values[codes < 0]
                shown = sorted({"<missing>" if pd.isna(v) else str(v)[:40] for v in seen.tolist()})
                unknown[name] = {"count": int((codes < 0).sum()), "values": shown[:10]}
            column += len(categories)
        return out, unknown

    def labels(self, frame: Any, *, where: str = "data") -> np.ndarray:
        if self.label not in frame.columns:
            raise BadInput(f"{where} lacks the label column {self.label!r}")
        return _labels(frame[self.label], where).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PREPROCESSING_FORMAT,
            "label": self.label,
            "features": self.features,
            "numeric": {n: {"mean": m, "std": s} for n, (m, s) in self.numeric.items()},
            "categorical": {n: {"categories": list(c), "unknown": "all-zero code"} for n, c in self.categorical.items()},
            "fitted_on": "training split only",
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preprocessing:
        try:
            if data.get("format") != PREPROCESSING_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            # The order of ``features`` is the column order of the encoding (JSON objects carry none).
            order = [str(f) for f in data["features"]]
            if sorted(order) != sorted([*data["numeric"], *data["categorical"]]):
                raise ValueError("features do not match numeric and categorical")
            numeric = {n: (float(data["numeric"][n]["mean"]), float(data["numeric"][n]["std"]))
                       for n in order if n in data["numeric"]}
            categorical = {n: tuple(str(c) for c in data["categorical"][n]["categories"])
                           for n in order if n in data["categorical"]}
            if any(not (math.isfinite(m) and math.isfinite(s) and s > 0) for m, s in numeric.values()):
                raise ValueError("a non-finite mean or scale")
            return cls(str(data["label"]), numeric, categorical)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"preprocessing.json is not usable ({exc})") from None


def _labels(column: Any, where: str) -> np.ndarray:
    import pandas as pd

    if column.isna().any():
        raise BadInput(f"{where}: the label has {int(column.isna().sum())} missing values")
    values = pd.to_numeric(column, errors="coerce")
    if values.isna().any() or not set(values.unique().tolist()) <= {0, 1}:
        raise BadInput(f"{where}: the label must be 0 or 1")
    return values.to_numpy(dtype=np.float64)


def _numbers(column: Any, name: str, where: str) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise BadInput(f"{where}: feature {name!r} has {int(bad.sum())} NaN, infinite or non-numeric values "
                       f"(first at row {int(np.flatnonzero(bad)[0])})")
    return values


# -- the model and the loop (run inside the isolated process, or in-process for the benchmark) ----
def preload() -> None:
    """Import everything training needs (the sandbox drops privileges right after)."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    # A two-row, two-epoch run touches every lazily imported module (optimiser, checkpoint, weights).
    rows = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    warm = TrainingConfig(hidden=(2,), epochs=2, batch_size=2, checkpoint_every=1)
    checkpoint: list[bytes] = []
    fit_arrays(rows, np.array([0.0, 1.0], dtype=np.float32), warm, device="cpu", fingerprint="warm-up", resume=None,
               emit=lambda kind, payload: checkpoint.append(payload) if kind == "C" else None)
    fit_arrays(rows, np.array([0.0, 1.0], dtype=np.float32), warm, device="cpu", fingerprint="warm-up",
               resume=checkpoint[0], emit=lambda kind, payload: None)


def build_model(inputs: int, hidden: Sequence[int], dropout: float) -> Any:
    """Linear/ReLU/Dropout blocks and a single-logit head; state keys ``layers.N.weight``."""
    import torch

    class TabularMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            blocks: list[torch.nn.Module] = []
            width = inputs
            for size in hidden:
                blocks += [torch.nn.Linear(width, size), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
                width = size
            blocks.append(torch.nn.Linear(width, 1))
            self.layers = torch.nn.Sequential(*blocks)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x).squeeze(-1)  # type: ignore[no-any-return]

    return TabularMLP()


def _deterministic(threads: int) -> None:
    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any inter-op work started
        torch.set_num_interop_threads(1)


def fit_arrays(X: np.ndarray, y: np.ndarray, config: TrainingConfig, *, device: str, fingerprint: str,
               resume: bytes | None, emit: Callable[[str, bytes], None]) -> None:
    """The training loop. Emits ``P`` (progress JSON), ``C`` (checkpoint bytes), ``W`` (weights)
    and ``R`` (result JSON). Each epoch's shuffle and dropout are seeded from (seed, epoch), so a
    resumed run repeats exactly what an uninterrupted one would have done."""
    import torch
    from safetensors.torch import load as load_tensors
    from safetensors.torch import save as save_tensors

    _deterministic(config.threads)
    torch.manual_seed(config.seed)
    model = build_model(X.shape[1], config.hidden, config.dropout).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(device)
    losses: list[float] = []
    start = 0
    if resume is not None:
        start, losses = _restore(load_tensors(resume), _checkpoint_meta(resume), model, optimiser,
                                 fingerprint, config, device)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    n = len(features)
    started = time.perf_counter()
    for epoch in range(start, config.epochs):
        model.train()
        torch.manual_seed(config.seed + 1 + epoch)  # dropout masks of this epoch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1009 + epoch)).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        epoch_start = time.perf_counter()
        for first in range(0, n, config.batch_size):
            batch = order[first:first + config.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(features[batch]), targets[batch])
            (loss / len(batch)).backward()
            optimiser.step()
            total += loss.detach().double()
        mean_loss = float(total.item()) / n
        if not math.isfinite(mean_loss):
            raise BadInput(f"training diverged at epoch {epoch + 1} (loss {mean_loss}); lower the learning rate")
        losses.append(mean_loss)
        seconds = time.perf_counter() - epoch_start
        emit("P", json.dumps({"epoch": epoch + 1, "epochs": config.epochs, "loss": mean_loss,
                              "seconds": seconds, "rows_per_s": n / seconds if seconds > 0 else None}).encode())
        done = epoch + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.epochs:
            emit("C", _checkpoint(model, optimiser, done, losses, fingerprint))
    model.eval()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    emit("W", save_tensors(state, metadata={"format": MODEL_FORMAT}))
    emit("R", json.dumps({"losses": losses, "resumed_from_epoch": start or None, "device": device,
                          "seconds": time.perf_counter() - started}).encode())


def _checkpoint(model: Any, optimiser: Any, epoch: int, losses: list[float], fingerprint: str) -> bytes:
    from safetensors.torch import save as save_tensors

    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for index, state in optimiser.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = value.detach().to("cpu").contiguous()
    meta = {"format": CHECKPOINT_FORMAT, "epoch": str(epoch), "losses": json.dumps(losses),
            "fingerprint": fingerprint}
    return save_tensors(tensors, metadata=meta)


def _checkpoint_meta(data: bytes) -> dict[str, str]:
    """The metadata of a safetensors checkpoint (its JSON header), without loading tensors."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        meta = header.get("__metadata__") or {}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError
        return {str(k): str(v) for k, v in meta.items()}
    except (ValueError, AttributeError):
        raise IntegrityError("checkpoint is not a secure-ml checkpoint") from None


def _restore(tensors: dict[str, Any], meta: dict[str, str], model: Any, optimiser: Any, fingerprint: str,
             config: TrainingConfig, device: str) -> tuple[int, list[float]]:
    # A checkpoint from other data, code or hyper-parameters would silently change the model.
    if meta.get("fingerprint") != fingerprint:
        raise IntegrityError("checkpoint belongs to another training run (data, code or configuration differ)")
    epoch = int(meta["epoch"])
    if not 0 < epoch < config.epochs:
        raise IntegrityError(f"checkpoint epoch {epoch} is outside this run's 1..{config.epochs - 1}")
    model.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
    groups = optimiser.state_dict()["param_groups"]
    optimiser.load_state_dict({"state": state, "param_groups": groups})
    return epoch, list(json.loads(meta["losses"]))


def child_train(header: Mapping[str, Any], blobs: list[bytes], send: Callable[[str, bytes], None],
                facts: Mapping[str, Any]) -> None:
    """Entry point inside the sandbox: decode the job and train."""
    config = TrainingConfig.from_mapping(header["config"])
    rows, width = int(header["rows"]), int(header["width"])
    if len(blobs) < 2 or len(blobs[0]) != rows * width * 4 or len(blobs[1]) != rows * 4:
        raise BadInput("the training process received data of the wrong size")
    X = np.frombuffer(blobs[0], dtype=np.float32).reshape(rows, width)
    y = np.frombuffer(blobs[1], dtype=np.float32)
    resume = blobs[2] if len(blobs) > 2 and blobs[2] else None
    send("P", json.dumps({"isolation": dict(facts)}).encode())
    device = str(header["device"])
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigurationError("the training process sees no CUDA GPU")
    fit_arrays(X, y, config, device=device, fingerprint=str(header["fingerprint"]), resume=resume, emit=send)


# -- encrypted checkpoints -------------------------------------------------------------------------
class CheckpointStore:
    """Checkpoints encrypted at rest (secure_ml.crypto), one directory per training fingerprint.

    A file is named by its epoch and the SHA-256 of its plaintext; reading it checks every
    AES-GCM tag and that digest, and a file that fails either is renamed ``*.rejected`` (kept
    as evidence, audited) and never resumed from.
    """

    def __init__(self, root: Path | str, keys: KeyProvider, audit: AuditLog | None = None, *,
                 actor: str = "training", keep: int = 2) -> None:
        self.root = Path(root)
        self.keys = keys
        self.audit = audit
        self.actor = actor
        self.keep = max(1, keep)

    def _dir(self, fingerprint: str) -> Path:
        if not SHA256_HEX.match(fingerprint):
            raise BadInput("checkpoint fingerprint must be a SHA-256 digest")
        return self.root / fingerprint

    def _record(self, action: str, fingerprint: str, outcome: str = "ok", **details: Any) -> None:
        if self.audit is not None:
            self.audit.record(self.actor, action, subject=f"training:{fingerprint[:16]}", outcome=outcome,
                              details=details)

    def files(self, fingerprint: str) -> list[Path]:
        """Checkpoint files, newest epoch first."""
        directory = self._dir(fingerprint)
        return sorted(directory.glob("epoch-*.ckpt.smle"), reverse=True) if directory.is_dir() else []

    def save(self, fingerprint: str, epoch: int, data: bytes) -> Path:
        directory = self._dir(fingerprint)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / f"epoch-{epoch:06d}-{sha256_bytes(data)}.ckpt.smle"
        with atomic_write(path, mode=0o600) as out:
            crypto.encrypt_stream(io.BytesIO(data), out, self.keys)
        for old in self.files(fingerprint)[self.keep:]:
            old.unlink(missing_ok=True)
        self._record("training.checkpoint.write", fingerprint, epoch=epoch, size=len(data))
        return path

    def latest(self, fingerprint: str) -> tuple[int, bytes] | None:
        """(epoch, plaintext) of the newest checkpoint that authenticates, else None."""
        for path in self.files(fingerprint):
            match = re.fullmatch(r"epoch-(\d{6})-([0-9a-f]{64})\.ckpt\.smle", path.name)
            try:
                if match is None:
                    raise IntegrityError("checkpoint file name is malformed")
                buffer = io.BytesIO()
                with path.open("rb") as src:
                    crypto.decrypt_stream(src, buffer, self.keys)
                data = buffer.getvalue()
                if sha256_bytes(data) != match.group(2):
                    raise IntegrityError("checkpoint decrypts to bytes with another digest")
                meta = _checkpoint_meta(data)
                if meta.get("fingerprint") != fingerprint or int(meta.get("epoch", -1)) != int(match.group(1)):
                    raise IntegrityError("checkpoint belongs to another run or epoch")
            except Error as exc:
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".rejected"))
                self._record("training.checkpoint.reject", fingerprint, outcome="fail", file=path.name,
                             reason=exc.explain())
                continue
            epoch = int(match.group(1))
            self._record("training.checkpoint.resume", fingerprint, epoch=epoch)
            return epoch, data
        return None

    def clear(self, fingerprint: str) -> None:
        shutil.rmtree(self._dir(fingerprint), ignore_errors=True)


# -- running a training ------------------------------------------------------------------------------
@dataclass
class FitResult:
    weights: bytes
    losses: list[float]
    device: str
    resumed_from_epoch: int | None
    isolation: dict[str, Any]
    seconds: float
    checkpoints_written: int = 0

    @property
    def weights_sha256(self) -> str:
        return sha256_bytes(self.weights)


def code_digest() -> str:
    """SHA-256 over the training code itself (part of what a checkpoint is bound to)."""
    h = hashlib.sha256()
    for name in ("trainer.py", "sandbox.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def fingerprint_of(X: np.ndarray, y: np.ndarray, config: TrainingConfig, device: str) -> str:
    """What a checkpoint is bound to: data, labels, hyper-parameters, device and training code."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": config.hyperparameters(), "device": device, "shape": list(X.shape),
                         "code": code_digest()}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.float32).tobytes())
    return h.hexdigest()


def fit(X: np.ndarray, y: np.ndarray, config: TrainingConfig, *, device: str = "cpu",
        isolation: IsolationPolicy | None = None, checkpoints: CheckpointStore | None = None,
        on_progress: Progress | None = None, on_start: Callable[[int], None] | None = None) -> FitResult:
    """Train on encoded arrays: isolated when ``isolation`` is given (the pipeline always gives
    one), in this process otherwise (the benchmark's baseline)."""
    fingerprint = fingerprint_of(X, y, config, device)
    resume = checkpoints.latest(fingerprint) if checkpoints is not None else None
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
            checkpoints.save(fingerprint, int(_checkpoint_meta(payload)["epoch"]), payload)
            got["checkpoints"] += 1
        elif kind == "W":
            got["weights"] = payload
        elif kind == "R":
            got["result"] = json.loads(payload)

    X32 = np.ascontiguousarray(X, dtype=np.float32)
    y32 = np.ascontiguousarray(y, dtype=np.float32)
    facts: dict[str, Any] = {"isolated": False}
    if isolation is None:
        fit_arrays(X32, y32, config, device=device, fingerprint=fingerprint,
                   resume=resume[1] if resume else None, emit=handle)
    else:
        header = {"config": config.hyperparameters(), "rows": int(X32.shape[0]), "width": int(X32.shape[1]),
                  "device": device, "fingerprint": fingerprint}
        blobs: list[bytes | memoryview] = [memoryview(X32).cast("B"), memoryview(y32).cast("B")]
        if resume is not None:
            blobs.append(resume[1])
        facts = {"isolated": True, **run_isolated(header, blobs, policy=isolation, on_frame=handle,
                                                   threads=config.threads, on_start=on_start)}
        child = got.get("facts") or {}
        facts.update({"uid": child.get("uid"), "interfaces": child.get("interfaces"),
                      "environment": child.get("env")})
    if "weights" not in got or "result" not in got:
        raise IntegrityError("the training process ended without returning weights")
    if checkpoints is not None:
        checkpoints.clear(fingerprint)
    result = got["result"]
    return FitResult(got["weights"], list(result["losses"]), str(result["device"]), result.get("resumed_from_epoch"),
                     facts, time.perf_counter() - started, got["checkpoints"])


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
                on_start: Callable[[int], None] | None = None, cuda_available: bool | None = None) -> TrainingResult:
    """Fit preprocessing on ``frame`` (the training split), train, and write the model directory."""
    out_dir = Path(out_dir)
    provenance = dict(provenance or {})
    device, device_note = resolve_device(config, cuda_available=cuda_available)
    started_at = datetime.now(UTC)
    prep = Preprocessing.fit(frame, spec)
    X, _ = prep.transform(frame, where="training split")
    y = prep.labels(frame, where="training split")
    result = fit(X, y, config, device=device, isolation=isolation, checkpoints=checkpoints,
                 on_progress=on_progress, on_start=on_start)
    finished_at = datetime.now(UTC)
    weights_sha = result.weights_sha256
    record = {
        "format": RECORD_FORMAT,
        "seeds": {"seed": config.seed, "torch_manual_seed": config.seed,
                  "epoch_dropout_seed": "seed + 1 + epoch", "epoch_shuffle_seed": "seed * 1009 + epoch"},
        "hyperparameters": {**config.hyperparameters(), "optimizer": "Adam", "loss": "binary cross-entropy",
                            "architecture": "MLP (Linear-ReLU-Dropout)*, single logit"},
        "determinism": {"torch.use_deterministic_algorithms": True, "threads": config.threads,
                        "CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
        "data": {"label": spec.label, "numeric": list(spec.numeric), "categorical": list(spec.categorical),
                 "train_rows": len(frame), "inputs": prep.width,
                 "train_sha256": provenance.get("train_sha256"), "test_sha256": provenance.get("test_sha256"),
                 "dataset_sha256": provenance.get("dataset_sha256"),
                 "dvc_version": provenance.get("dvc_version"), "source": provenance.get("source"),
                 "encoded_sha256": fingerprint_of(X, y, config, device)},
        "code": code_version(),
        "environment": environment(),
        "hardware": hardware(device),
        "device": device,
        "device_note": device_note,
        "isolation": result.isolation,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "duration_s": round((finished_at - started_at).total_seconds(), 3),
        "actor": provenance.get("actor") or "unknown",
        "result": {"weights_sha256": weights_sha, "epochs": config.epochs, "final_loss": result.losses[-1],
                   "losses": result.losses, "resumed_from_epoch": result.resumed_from_epoch,
                   "checkpoints_written": result.checkpoints_written},
    }
    write_model_dir(out_dir, result.weights, prep, config, record)
    return TrainingResult(out_dir, weights_sha, device, config.epochs, result.losses[-1], len(frame), record)


def write_model_dir(out_dir: Path, weights: bytes, prep: Preprocessing, config: TrainingConfig,
                    record: Mapping[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = {
        "format": MODEL_FORMAT,
        "architecture": "tabular-mlp",
        "inputs": prep.width,
        "hidden": list(config.hidden),
        "dropout": config.dropout,
        "outputs": 1,
        "output": "logit of P(label = 1)",
        "threshold": config.threshold,
        "weights_sha256": sha256_bytes(weights),
    }
    atomic_write_bytes(out_dir / "model.safetensors", weights, mode=0o644)
    atomic_write_bytes(out_dir / "config.json", _json(model_config), mode=0o644)
    atomic_write_bytes(out_dir / "preprocessing.json", _json(prep.to_json()), mode=0o644)
    atomic_write_bytes(out_dir / "training_record.json", _json(record), mode=0o644)
    atomic_write_bytes(out_dir / "MODEL_CARD.md", model_card(record, prep, config).encode(), mode=0o644)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1, allow_nan=False).encode()


def record_problems(record: Mapping[str, Any], weights_sha256: str) -> list[str]:
    """What a training record lacks or gets wrong (empty when it is complete and matches the weights)."""
    problems = [f"missing {key}" for key in RECORD_REQUIRED if record.get(key) in (None, "", {}, [])]
    if record.get("format") not in (None, RECORD_FORMAT):
        problems.append(f"unknown format {record.get('format')!r}")
    result = record.get("result") or {}
    if result and result.get("weights_sha256") != weights_sha256:
        problems.append("result.weights_sha256 does not match model.safetensors")
    for key in ("train_sha256", "dataset_sha256"):
        if not (record.get("data") or {}).get(key):
            problems.append(f"missing data.{key}")
    code = record.get("code") or {}
    if not code.get("commit") or code.get("dirty") is None:
        problems.append("missing code.commit or code.dirty")
    environment_ = record.get("environment") or {}
    for key in ("python", "torch", "lock_sha256"):
        if not environment_.get(key):
            problems.append(f"missing environment.{key}")
    if not (record.get("isolation") or {}).get("isolated"):
        problems.append("the model was not trained in the isolated process")
    return problems


# -- the record's facts -------------------------------------------------------------------------------
def code_version(repo: Path = REPO) -> dict[str, Any]:
    """Git commit, dirty flag and author of the checked-out code; 'unknown' outside a checkout."""
    return {**code_identity.current(repo).as_record(), "training_code_sha256": code_digest()}


def lock_versions(lock: Path = REPO / "requirements.lock") -> tuple[str, dict[str, str]]:
    """(sha256 of requirements.lock, {package: version}) as pinned there."""
    try:
        text = lock.read_text()
    except OSError:
        return "", {}
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s\\;]+)", text, re.MULTILINE))
    return sha256_bytes(text.encode()), {k.lower(): v for k, v in sorted(pins.items())}


def environment() -> dict[str, Any]:
    import importlib.metadata as metadata

    import torch

    lock_sha, pins = lock_versions()
    key = ("torch", "numpy", "safetensors", "pandas", "pyarrow", "scikit-learn", "dagster", "cryptography")
    installed: dict[str, str | None] = {}
    for name in key:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = None
    mismatched = sorted(n for n in key if pins.get(n) and installed.get(n) and
                        installed[n].split("+")[0] != pins[n].split("+")[0])  # type: ignore[union-attr]
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "platform": platform.platform(),
        "lock_file": "requirements.lock",
        "lock_sha256": lock_sha,
        "packages": {n: pins.get(n) for n in key},
        "installed": installed,
        "matches_lock": not mismatched,
        "mismatched": mismatched,
        "lock_pins": pins,
    }


def hardware(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count()}
    with contextlib.suppress(ImportError):
        import psutil

        info["memory_bytes"] = int(psutil.virtual_memory().total)
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_card(record: Mapping[str, Any], prep: Preprocessing, config: TrainingConfig) -> str:
    data = record.get("data") or {}
    code = record.get("code") or {}
    result = record.get("result") or {}
    return "\n".join([
        "# Model card: secure-ml tabular credit-risk classifier",
        "",
        "## What it is",
        f"A multilayer perceptron (hidden layers {list(config.hidden)}, dropout {config.dropout}) that predicts "
        f"P({prep.label} = 1) from {len(prep.numeric)} standardised numeric and {len(prep.categorical)} one-hot "
        f"categorical features. Decision threshold {config.threshold}.",
        "",
        "## Intended use",
        "Decision support for credit-risk review, with a person accountable for each decision. Not for fully "
        "automated decisions about people. Sensitive attributes in the data are protected attributes: see the "
        "bias section of the `model_evaluation` asset before any use.",
        "",
        "## Training data",
        f"- training split: sha256 `{data.get('train_sha256')}`, {data.get('train_rows')} rows",
        f"- dataset: sha256 `{data.get('dataset_sha256')}`, source `{data.get('source')}`, "
        f"DVC version `{data.get('dvc_version')}`",
        f"- features: numeric {list(prep.numeric)}; categorical {list(prep.categorical)}",
        "- preprocessing fitted on the training split only; categories unseen in training get the all-zero code",
        "",
        "## Training",
        f"- {config.epochs} epochs, batch {config.batch_size}, Adam lr {config.learning_rate}, weight decay "
        f"{config.weight_decay}, seed {config.seed}, deterministic algorithms, {config.threads} thread(s)",
        f"- device: {record.get('device')}; trained in an isolated process (no network, scrubbed environment, "
        "no keys)",
        f"- final training loss {result.get('final_loss')}; weights sha256 `{result.get('weights_sha256')}`",
        f"- code: commit `{code.get('commit')}`{' (dirty working tree)' if code.get('dirty') else ''}",
        f"- trained by {record.get('actor')} from {record.get('started_at')} to {record.get('finished_at')}",
        "",
        "## Evaluation, bias and robustness",
        "Measured on the held-out split by the `model_evaluation` asset (accuracy, ROC AUC, F1, calibration, "
        "per-group selection rate/TPR/FPR on the protected attributes, accuracy under FGSM/PGD and noise), "
        "with blocking checks on the thresholds in training.yaml.",
        "",
        "## Limitations",
        "Small tabular sample; group metrics on small groups are noisy. The model has not been assessed for "
        "any population other than the training data's.",
        "",
    ])


# -- loading a trained model ----------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: Any
    preprocessing: Preprocessing
    config: dict[str, Any]

    @property
    def threshold(self) -> float:
        return float(self.config.get("threshold", 0.5))

    def logits(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(X).astype(np.float64)))


def load_model(model_dir: Path | str) -> LoadedModel:
    """Model, preprocessing and config from a model directory (safetensors + JSON only)."""
    import torch
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
        prep = Preprocessing.from_json(json.loads((model_dir / "preprocessing.json").read_text()))
    except FileNotFoundError as exc:
        raise IntegrityError(f"model directory lacks {Path(str(exc.filename)).name}") from None
    except ValueError:
        raise IntegrityError("the model's config.json or preprocessing.json is not JSON") from None
    if config.get("format") != MODEL_FORMAT or int(config.get("inputs", -1)) != prep.width:
        raise IntegrityError("config.json does not describe this model's inputs")
    model = build_model(prep.width, [int(h) for h in config["hidden"]], float(config.get("dropout", 0.0)))
    try:
        state = load_file(str(model_dir / "model.safetensors"))
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as exc:
        raise IntegrityError(f"model.safetensors does not fit config.json ({str(exc).splitlines()[0][:120]})") from None
    model.eval()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return LoadedModel(model, prep, config)


def load_predictor(model_dir: Path | str) -> Callable[[list[dict[str, Any]]], list[float]]:
    """rows (dicts of feature values) -> P(label = 1); what the model server calls."""
    import pandas as pd

    loaded = load_model(model_dir)

    def predict(rows: list[dict[str, Any]]) -> list[float]:
        X, _ = loaded.preprocessing.transform(pd.DataFrame(rows), where="request")
        return [float(p) for p in loaded.probabilities(X)]

    return predict


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use secure_ml.sandbox or the trained_model asset")
