"""Checkpoints: what a run is bound to (its versioned fingerprint), their bytes, and their encrypted store.

    fp = run_fingerprint(X, y, config, device)         # .digest binds data, config, device, code, version
    store = CheckpointStore(home / "checkpoints", keys, audit)
    store.superseded(fp)      # checkpoints of this data and config from other code or another
                              # fingerprint version: reported (audit + record), never resumed from
    store.latest(fp.digest)   # (epoch, plaintext) of the newest checkpoint that verifies, else None
    store.save(fp, epoch, data)

A fingerprint is SHA-256 over its format version (:data:`FINGERPRINT_VERSION`), the training
code's digest (every module of this package, sorted by name), the hyper-parameters, the device
and the encoded data. Moving or changing training code, or changing how fingerprints are made
(bump the version), therefore never lets an old checkpoint be resumed from; :meth:`superseded`
finds such checkpoints of the same data and configuration so that the run reports them and
starts fresh. Each run's directory holds ``fingerprint.json`` (version, code digest, inputs
digest: digests only) and files named by epoch and plaintext SHA-256, encrypted with
secure_ml.custody.crypto; one that fails its tag or digest is renamed ``*.rejected`` (kept as
evidence, audited).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secure_ml.custody import crypto
from secure_ml.custody.audit import AuditLog
from secure_ml.custody.integrity import SHA256_HEX, atomic_write, atomic_write_bytes, sha256_bytes
from secure_ml.custody.keys import KeyProvider
from secure_ml.errors import BadInput, Error, IntegrityError
from secure_ml.training.config import TrainingConfig

CHECKPOINT_FORMAT = "secure-ml-checkpoint/2"  # /2: every chain state so far
# Bump whenever what goes into a fingerprint, or how, changes: old checkpoints are then reported, not resumed.
FINGERPRINT_VERSION = 3
SIDECAR = "fingerprint.json"
PACKAGE = Path(__file__).resolve().parent


def code_digest(package: Path = PACKAGE) -> str:
    """SHA-256 over every module of the training package, sorted by name (name and bytes of each)."""
    h = hashlib.sha256()
    for path in sorted(package.glob("*.py"), key=lambda p: p.name):
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What a run's checkpoints are bound to. ``inputs`` (data, config, device) names the run
    whatever the code; ``digest`` adds the code digest and the fingerprint version."""

    digest: str
    inputs: str
    code: str
    version: int = FINGERPRINT_VERSION

    def facts(self) -> dict[str, Any]:
        return {"fingerprint_version": self.version, "code_sha256": self.code, "inputs_sha256": self.inputs}


def run_fingerprint(X: np.ndarray, y: np.ndarray, config: TrainingConfig, device: str) -> Fingerprint:
    h = hashlib.sha256()
    h.update(json.dumps({"config": config.hyperparameters(), "device": device, "shape": list(X.shape)},
                        sort_keys=True).encode())
    h.update(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.float32).tobytes())
    inputs, code = h.hexdigest(), code_digest()
    bound = json.dumps({"fingerprint_version": FINGERPRINT_VERSION, "code_sha256": code, "inputs_sha256": inputs},
                       sort_keys=True).encode()
    return Fingerprint(hashlib.sha256(bound).hexdigest(), inputs, code, FINGERPRINT_VERSION)


def fingerprint_of(X: np.ndarray, y: np.ndarray, config: TrainingConfig, device: str) -> str:
    """The digest a checkpoint is bound to: data, labels, hyper-parameters, device, code, version."""
    return run_fingerprint(X, y, config, device).digest


# -- checkpoint bytes (made and restored inside the training process) ------------------------------
def make_checkpoint(states: Mapping[int, Mapping[str, Any]], epoch: int, losses: list[float],
                    fingerprint: str) -> bytes:
    """Every chain state so far and this epoch's (secure_ml.training.chain; where training resumes), with
    the run's fingerprint and losses: a resumed run still records the whole chain."""
    from secure_ml.training.chain import pack

    meta = {"format": CHECKPOINT_FORMAT, "epoch": str(epoch), "losses": json.dumps(losses),
            "fingerprint": fingerprint, "fingerprint_version": str(FINGERPRINT_VERSION)}
    return pack(states, meta)


def checkpoint_meta(data: bytes) -> dict[str, str]:
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


def restore(data: bytes, model: Any, optimiser: Any, fingerprint: str, config: TrainingConfig,
            device: str) -> tuple[int, list[float], dict[int, dict[str, Any]]]:
    """Load a checkpoint's newest state into ``model`` and ``optimiser``; (epoch to start from, losses so
    far, the chain's states so far as CPU tensors)."""
    from safetensors.torch import load as load_tensors

    from secure_ml.training.chain import boundaries, load_state

    meta = checkpoint_meta(data)
    # A checkpoint from other data, code, hyper-parameters or fingerprint rules would silently change the model.
    if meta.get("fingerprint") != fingerprint or meta.get("fingerprint_version") != str(FINGERPRINT_VERSION):
        raise IntegrityError("checkpoint belongs to another training run (data, code, configuration or "
                             "fingerprint version differ)")
    epoch = int(meta["epoch"])
    if not 0 < epoch < config.epochs:
        raise IntegrityError(f"checkpoint epoch {epoch} is outside this run's 1..{config.epochs - 1}")
    states: dict[int, dict[str, Any]] = {}
    for key, value in load_tensors(data).items():
        mark, _, name = key.partition(".")
        states.setdefault(int(mark), {})[name] = value
    if epoch not in states or 0 not in states:
        raise IntegrityError(f"checkpoint of epoch {epoch} lacks its own state or the chain's start")
    load_state(model, optimiser, states[epoch], device)
    marks = set(boundaries(config.epochs, config.segment_epochs))
    return epoch, list(json.loads(meta["losses"])), {e: s for e, s in states.items() if e in marks}


# -- the encrypted store -----------------------------------------------------------------------------
class CheckpointStore:
    """Checkpoints encrypted at rest (secure_ml.crypto), one directory per training fingerprint."""

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

    def save(self, fingerprint: str | Fingerprint, epoch: int, data: bytes) -> Path:
        digest = fingerprint.digest if isinstance(fingerprint, Fingerprint) else fingerprint
        directory = self._dir(digest)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if isinstance(fingerprint, Fingerprint) and not (directory / SIDECAR).exists():
            atomic_write_bytes(directory / SIDECAR, json.dumps(fingerprint.facts(), sort_keys=True).encode(),
                               mode=0o600)
        path = directory / f"epoch-{epoch:06d}-{sha256_bytes(data)}.ckpt.smle"
        with atomic_write(path, mode=0o600) as out:
            crypto.encrypt_stream(io.BytesIO(data), out, self.keys)
        for old in self.files(digest)[self.keep:]:
            old.unlink(missing_ok=True)
        self._record("training.checkpoint.write", digest, epoch=epoch, size=len(data))
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
                meta = checkpoint_meta(data)
                if meta.get("fingerprint") != fingerprint or int(meta.get("epoch", -1)) != int(match.group(1)):
                    raise IntegrityError("checkpoint belongs to another run or epoch")
                if meta.get("fingerprint_version") != str(FINGERPRINT_VERSION):
                    raise IntegrityError(f"checkpoint has fingerprint version {meta.get('fingerprint_version')!r}, "
                                         f"this code makes version {FINGERPRINT_VERSION}")
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

    def superseded(self, fingerprint: Fingerprint) -> list[dict[str, Any]]:
        """Checkpoints this run will not resume from although they may be of its data: those of the
        same data and configuration made by other code or another fingerprint version, and those
        written before fingerprints were versioned. Each is audited; the caller records them."""
        found: list[dict[str, Any]] = []
        for directory in sorted(self._candidates()):
            if directory.name == fingerprint.digest:
                continue
            try:
                facts = json.loads((directory / SIDECAR).read_text())
            except FileNotFoundError:
                facts = {}
            except (OSError, ValueError):
                facts = {"fingerprint_version": "unreadable"}
            if facts and facts.get("inputs_sha256") != fingerprint.inputs:
                continue  # another run altogether (other data or configuration)
            if not facts:
                reason = "written before checkpoint fingerprints were versioned"
            elif facts.get("fingerprint_version") != fingerprint.version:
                reason = (f"fingerprint version {facts.get('fingerprint_version')!r}, this code makes "
                          f"version {fingerprint.version}")
            else:
                reason = "written by other training code (code digest differs)"
            entry = {"checkpoints": directory.name, "files": len(list(directory.glob("epoch-*.ckpt.smle"))),
                     "fingerprint_version": facts.get("fingerprint_version"), "code_sha256": facts.get("code_sha256"),
                     "reason": f"not resumed: {reason}; training starts fresh"}
            self._record("training.checkpoint.superseded", fingerprint.digest, outcome="warn", **entry)
            found.append(entry)
        return found

    def _candidates(self) -> Iterable[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir()
                if p.is_dir() and SHA256_HEX.match(p.name) and any(p.glob("epoch-*.ckpt.smle"))]

    def clear(self, fingerprint: str) -> None:
        shutil.rmtree(self._dir(fingerprint), ignore_errors=True)
