"""The model directory and its training record: what was trained, on what, by what, how.

    write_model_dir(out_dir, weights, prep, config, record, chain=states)   # the six files, each atomically
    record_problems(record, weights_sha256)                    # [] when complete and matching the weights
    code_version(), environment(), hardware("cpu")             # the record's facts

``out_dir`` receives ``model.safetensors`` (weights; never a pickle), ``config.json``
(architecture, decision threshold), ``preprocessing.json``, ``training_record.json`` (seeds,
hyper-parameters, data digests, code commit and dirty flag, Python/torch/package versions from
requirements.lock, hardware, device, isolation facts, start/end, actor, and ``result.chain``: the
digest of each segment boundary's state), ``MODEL_CARD.md`` and ``training_chain.safetensors``
(those states, secure_ml.training.chain).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import atomic_write_bytes, sha256_bytes
from secure_ml.governance import code_identity
from secure_ml.training.chain import CHAIN_FILE
from secure_ml.training.checkpoints import code_digest
from secure_ml.training.config import TrainingConfig
from secure_ml.training.features import Preprocessing
from secure_ml.training.model import MODEL_FORMAT

REPO = Path(__file__).resolve().parents[2]
RECORD_FORMAT = "secure-ml-training-record/1"
MODEL_FILES = ("model.safetensors", "config.json", "preprocessing.json", "training_record.json", "MODEL_CARD.md",
               CHAIN_FILE)
RECORD_REQUIRED = ("format", "seeds", "hyperparameters", "data", "code", "environment", "hardware", "device",
                   "isolation", "started_at", "finished_at", "actor", "result")


def write_model_dir(out_dir: Path, weights: bytes, prep: Preprocessing, config: TrainingConfig,
                    record: Mapping[str, Any], *, chain: bytes) -> None:
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
    atomic_write_bytes(out_dir / CHAIN_FILE, chain, mode=0o644)


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
    if result and len(result.get("chain") or []) < 2:
        problems.append("missing result.chain (the digests of the training states, at least start and end)")
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
    isolation = record.get("isolation") or {}
    if not isolation.get("isolated"):
        problems.append("the model was not trained in the isolated process")
    elif isolation.get("level_met") is False:
        problems.append(f"the training sandbox did not reach its configured level ({isolation.get('configured')})")
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


def environment(runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Python, platform, the lock file's pins against what is installed, and the torch build: from
    ``runtime`` (secure_ml.training.loop.runtime, reported by the process that trained, so the caller
    never imports torch for it), else from torch itself."""
    import importlib.metadata as metadata

    if runtime is None:
        import torch

        runtime = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
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
        "torch": runtime.get("torch"),
        "torch_cuda": runtime.get("torch_cuda"),
        "platform": platform.platform(),
        "lock_file": "requirements.lock",
        "lock_sha256": lock_sha,
        "packages": {n: pins.get(n) for n in key},
        "installed": installed,
        "matches_lock": not mismatched,
        "mismatched": mismatched,
        "lock_pins": pins,
    }


def hardware(device: str, runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
    if device == "cuda" and (runtime or {}).get("gpu"):
        info["gpu"] = str((runtime or {})["gpu"])
    elif device == "cuda":
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

