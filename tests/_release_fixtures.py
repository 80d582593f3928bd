"""Builders for the release tests: a small real model, real signatures and attestations, real store.

Nothing here is mocked: the model is a torch MLP saved as safetensors, the signature is an
OpenSSF model-signing bundle made with a fresh P-256 key, the attestation an in-toto Statement
in a DSSE envelope signed with the same key, and everything is sealed into the encrypted store.
Where the security stage's own verifiers exist (secure_ml.signing / secure_ml.attestation) the
tests still use these key-based ones so they do not depend on its trust configuration.
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

from secure_ml.deploy import Release, Verifiers, key_signature_verifier, model_digest
from secure_ml.errors import VerificationError
from secure_ml.integrity import sha256_tree
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
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    inputs = len(NUMERIC) + sum(len(c) for c in CATEGORICAL.values())
    net = torch.nn.Sequential(torch.nn.Linear(inputs, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    tensors = {f"net.{k}": v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    if poison_nan:
        tensors["net.2.bias"] = torch.tensor([float("nan")])
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": "mlp", "hidden": [8], "threshold": 0.5}))
    (path / "preprocessing.json").write_text(json.dumps({
        "features": [*NUMERIC, *CATEGORICAL],
        "numeric": {n: {"mean": m, "std": s} for n, (m, s) in NUMERIC.items()},
        "categorical": CATEGORICAL,
    }))
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
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return Keys(private, public, key)


def sign(model_dir: Path, keys: Keys, scratch: Path) -> bytes:
    import model_signing

    sig = scratch / f"sig-{model_dir.name}.json"
    model_signing.signing.Config().use_elliptic_key_signer(private_key=keys.private).sign(model_dir, sig)
    return sig.read_bytes()


def attest(model_dir: Path, bundle: bytes, keys: Keys, *, subjects: Mapping[str, str] | None = None) -> bytes:
    from sigstore import dsse

    files = dict(subjects) if subjects is not None else {
        **sha256_tree(model_dir), "model.sig": hashlib.sha256(bundle).hexdigest()}
    statement = dsse.StatementBuilder(
        subjects=[dsse.Subject(name=name, digest={"sha256": digest}) for name, digest in sorted(files.items())],
        predicate_type="https://slsa.dev/provenance/v1",
        predicate={"buildDefinition": {"buildType": "https://secure-ml.dev/dagster/v1"}},
    ).build()
    return dsse._sign(keys.key, statement).to_json().encode()


def attestation_verifier(public: Path) -> Any:
    """Verifies the DSSE signature and that the subjects are exactly the model files plus bundle."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from sigstore import dsse

    key = load_pem_public_key(public.read_bytes())

    def verify(envelope: bytes, model_dir: Path, bundle: bytes) -> Mapping[str, Any]:
        try:
            payload = dsse._verify(key, dsse.Envelope._from_json(envelope))  # type: ignore[arg-type]
            statement = json.loads(payload)
        except Exception as exc:
            raise VerificationError(f"attestation does not verify: {exc}") from None
        subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
        expected = {**sha256_tree(model_dir), "model.sig": hashlib.sha256(bundle).hexdigest()}
        if subjects != expected:
            raise VerificationError("attestation subjects do not match the model files and signature")
        return {"predicate_type": statement["predicateType"]}

    return verify


def verifiers(keys: Keys) -> Verifiers:
    return Verifiers(signature=key_signature_verifier(keys.public), attestation=attestation_verifier(keys.public))


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
    from secure_ml.deploy import evaluation_evidence, scan_evidence

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
    return Release.from_settings(settings, verifiers=verifiers(keys), **kwargs)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
