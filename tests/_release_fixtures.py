"""Builders for the release tests: a small real model, real signatures and attestations, real store.

Nothing here is mocked: the model is a torch MLP saved as safetensors, the signature an OpenSSF
model-signing bundle made by secure_ml.signing with a fresh P-256 key, the attestation an in-toto
Statement (SLSA provenance v1) in a DSSE envelope made by secure_ml.attestation with the same
key, and everything is sealed into the encrypted store. The release is verified by the same
verification chain production uses (secure_ml.security.verification), trusting only the test key.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_ml.custody.integrity import sha256_tree
from secure_ml.release.deploy import Release
from secure_ml.release.evidence import model_digest
from secure_ml.security.verification import TrustPolicy
from secure_ml.settings import Settings

NUMERIC = {"age": (35.5, 11.4), "credit_amount": (3271.0, 2822.0)}
CATEGORICAL = {"sex": ["female", "male"], "purpose": ["car", "education", "other"]}

GOOD_EVALUATION = {
    "passed": True,
    "metrics": {"accuracy": 0.76, "roc_auc": 0.79, "f1": 0.83},
    "fairness": {"sex": {"demographic_parity_difference": 0.08, "equalized_odds_difference": 0.11},
                 "age_band": {"demographic_parity_difference": -0.12, "equalized_odds_difference": 0.15}},
    "robustness": {"fgsm_accuracy": 0.7},
}
CLEAN_SCAN = {"blocking": False, "counts": {"high": 0, "medium": 0, "low": 1},
              "findings": [{"id": "B101", "severity": "low", "blocking": False, "where": "secure_ml/x.py"}]}


def make_model_dir(path: Path, *, seed: int = 0, poison_nan: bool = False) -> Path:
    """A model directory in the training stage's own format (secure_ml.training), small and seeded."""
    import torch
    from safetensors.torch import save_file

    from secure_ml.training import features, model

    torch.manual_seed(seed)
    prep = features.Preprocessing("credit_risk", dict(NUMERIC), {k: tuple(v) for k, v in CATEGORICAL.items()})
    net = model.build_model(prep.width, [8], 0.0)
    tensors = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    if poison_nan:
        last = sorted(k for k in tensors if k.endswith(".bias"))[-1]
        tensors[last] = torch.full_like(tensors[last], float("nan"))
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": model.MODEL_FORMAT})
    (path / "config.json").write_text(json.dumps({
        "format": model.MODEL_FORMAT, "architecture": "tabular-mlp", "inputs": prep.width, "hidden": [8],
        "dropout": 0.0, "outputs": 1, "threshold": 0.5}))
    (path / "preprocessing.json").write_text(json.dumps(prep.to_json()))
    (path / "training_record.json").write_text(json.dumps({"seed": seed, "actor": "bob"}))
    (path / "MODEL_CARD.md").write_text("# test model\n")
    return path


@dataclass
class Keys:
    private: Path
    public: Path
    key: ec.EllipticCurvePrivateKey


def make_keys(directory: Path, name: str = "signer") -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub"
    private.touch(mode=0o600)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return Keys(private, public, key)


def sign(model_dir: Path, keys: Keys, scratch: Path) -> bytes:
    from secure_ml.security import signing

    return signing.sign_model(model_dir, scratch / f"sig-{model_dir.name}-{keys.public.stem}.json",
                              private_key=keys.private)


def attest(model_dir: Path, bundle: bytes, keys: Keys, *, files: Mapping[str, str] | None = None) -> bytes:
    from secure_ml.security import attestation

    build = attestation.BuildInfo(builder_id="https://secure-ml.local/dagster/test", invocation_id="run-1",
                                  started_on="2026-11-23T00:00:00Z", finished_on="2026-11-23T00:01:00Z",
                                  code_commit="abc123")
    statement = attestation.provenance_statement(dict(files) if files is not None else sha256_tree(model_dir),
                                                 hashlib.sha256(bundle).hexdigest(), build=build)
    return attestation.sign_envelope(statement, private_key=keys.private)


def trust(keys: Keys) -> TrustPolicy:
    return TrustPolicy.of(public_keys=[keys.public])


@dataclass
class Published:
    digest: str
    evidence: dict[str, Any]
    model_dir: Path
    bundle: bytes
    envelope: bytes


def publish(settings: Settings, model_dir: Path, keys: Keys, scratch: Path, *,
            data_actor: str = "alice", trainer: str = "bob", code_author: str | None = None,
            evaluation: Mapping[str, Any] = GOOD_EVALUATION, scan: Mapping[str, Any] = CLEAN_SCAN,
            approved: bool = True, bundle: bytes | None = None, envelope: bytes | None = None) -> Published:
    """Seal model, bundle and attestation into the store; the evidence registered_model would build."""
    from secure_ml.release.evidence import evaluation_evidence, scan_evidence

    bundle = bundle if bundle is not None else sign(model_dir, keys, scratch)
    envelope = envelope if envelope is not None else attest(model_dir, bundle, keys)
    store = settings.artifact_store(actor=trainer)
    evidence = {
        "store": {"model_tree": store.put_tree(model_dir).sha256, "signature": store.put_bytes(bundle).sha256,
                  "attestation": store.put_bytes(envelope).sha256},
        "evaluation": evaluation_evidence(evaluation),
        "scan": scan_evidence(scan),
        "provenance": {"source": "german_credit.csv", "source_sha256": "0" * 64, "approved": approved,
                       "data_actor": data_actor},
        "training": {"actor": trainer, "code_commit": "abc123", "code_author": code_author},
    }
    return Published(model_digest(model_dir), evidence, model_dir, bundle, envelope)


def release_for(settings: Settings, keys: Keys, **kwargs: Any) -> Release:
    return Release.from_settings(settings, trust=trust(keys), **kwargs)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
