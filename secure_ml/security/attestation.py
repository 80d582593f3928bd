"""SLSA provenance for a model build: an in-toto Statement v1 in a signed DSSE envelope.

    statement = provenance_statement(model_files, bundle_sha256, build=BuildInfo(...))
    envelope = sign_envelope(statement, private_key=home / "keys" / "model-signing.pem")
    statement = verify_envelope(envelope, trusted_public_keys)       # raises VerificationError
    check_subjects(statement, model_files, bundle_sha256)              # subjects = the signed model

The statement's subjects are the model files (``model/<name>``) and the signature bundle
(``model.sig``); the predicate (``https://slsa.dev/provenance/v1``) records the build: the code
commit, the lock file digest, configuration and hyper-parameters (``buildDefinition``), the
dataset and validated dataset digests with their DVC versions (``resolvedDependencies``), and
the builder (the Dagster deployment), the run id and start and finish times (``runDetails``).

The envelope follows the DSSE spec: the signature is ECDSA P-256/SHA-256 over
``PAE(payloadType, payload)``, and ``keyid`` is the SHA-256 of the signer's public key PEM (the
same identifier model-signing uses), so one trusted key file verifies both.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_ml.custody.dsse import INTOTO_PAYLOAD_TYPE, STATEMENT_TYPE, pae
from secure_ml.errors import ConfigurationError, VerificationError

# One DSSE encoding for every envelope we sign (secure_ml.custody.dsse): attestations and decisions.
PAYLOAD_TYPE = INTOTO_PAYLOAD_TYPE
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://secure-ml.local/buildtypes/dagster-pipeline/v1"
MODEL_PREFIX = "model/"
BUNDLE_SUBJECT = "model.sig"


@dataclass(frozen=True)
class BuildInfo:
    """What the provenance says about the run that built the model."""

    builder_id: str
    invocation_id: str
    started_on: str
    finished_on: str
    code_commit: str = ""
    code_repository: str = ""
    lock_sha256: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    dependencies: Sequence[Mapping[str, Any]] = ()   # ResourceDescriptors (datasets)
    byproducts: Sequence[Mapping[str, Any]] = ()


def provenance_statement(model_files: Mapping[str, str], bundle_sha256: str, *, build: BuildInfo) -> dict[str, Any]:
    """The in-toto Statement v1 with an SLSA provenance v1 predicate."""
    subjects = [{"name": MODEL_PREFIX + name, "digest": {"sha256": digest}} for name, digest in sorted(model_files.items())]
    subjects.append({"name": BUNDLE_SUBJECT, "digest": {"sha256": bundle_sha256}})
    resolved: list[dict[str, Any]] = []
    if build.code_commit:
        resolved.append({"name": "pipeline-code",
                         "uri": f"git+{build.code_repository or 'local'}@{build.code_commit}",
                         "digest": {"gitCommit": build.code_commit}})
    if build.lock_sha256:
        resolved.append({"name": "requirements.lock", "digest": {"sha256": build.lock_sha256}})
    resolved.extend(dict(dep) for dep in build.dependencies)
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "source": {"commit": build.code_commit, "repository": build.code_repository},
                    "lockFile": {"name": "requirements.lock", "sha256": build.lock_sha256},
                    "config": dict(build.config),
                    "hyperparameters": dict(build.hyperparameters),
                },
                "resolvedDependencies": resolved,
            },
            "runDetails": {
                "builder": {"id": build.builder_id},
                "metadata": {"invocationId": build.invocation_id, "startedOn": build.started_on,
                             "finishedOn": build.finished_on},
                "byproducts": [dict(b) for b in build.byproducts],
            },
        },
    }


def sign_envelope(statement: Mapping[str, Any], *, private_key: Path | str) -> bytes:
    """The DSSE envelope (JSON bytes) over the statement, signed with the ECDSA key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from secure_ml.security.signing import _load_private, key_hint, public_pem

    key = _load_private(Path(private_key))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError("the attestation key must be an elliptic-curve key")
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    signature = key.sign(pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_hint(public_pem(key)), "sig": base64.b64encode(signature).decode()}],
    }
    return json.dumps(envelope, indent=1).encode() + b"\n"


def verify_envelope(envelope: bytes, trusted_public_keys: Sequence[Path]) -> dict[str, Any]:
    """Verify the envelope against the trusted keys; return the statement it carries."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from secure_ml.security.signing import key_hint

    try:
        parsed = json.loads(envelope)
        payload_type = parsed["payloadType"]
        payload = base64.b64decode(parsed["payload"], validate=True)
        signatures = [(s.get("keyid", ""), base64.b64decode(s["sig"], validate=True)) for s in parsed["signatures"]]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise VerificationError("the attestation is not a DSSE envelope: truncated or malformed") from None
    if payload_type != PAYLOAD_TYPE:
        raise VerificationError(f"the attestation payload type is {payload_type!r}, not {PAYLOAD_TYPE}")
    if not signatures:
        raise VerificationError("the attestation carries no signature")
    keys = []
    for path in trusted_public_keys:
        try:
            pem = Path(path).read_bytes()
        except FileNotFoundError:
            continue
        keys.append((key_hint(pem), serialization.load_pem_public_key(pem), Path(path).name))
    signed_by = None
    for keyid, signature in signatures:
        for hint, public_key, name in keys:
            if keyid and keyid != hint:
                continue
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                continue
            try:
                public_key.verify(signature, pae(payload_type, payload), ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            signed_by = name
            break
        if signed_by:
            break
    if not signed_by:
        raise VerificationError("the attestation is not signed by a trusted key (or it was altered after signing)")
    try:
        statement = json.loads(payload)
    except ValueError:
        raise VerificationError("the attestation payload is not JSON") from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise VerificationError("the attestation payload is not an in-toto Statement v1")
    if statement.get("predicateType") != SLSA_PROVENANCE:
        raise VerificationError(f"the attestation predicate is {statement.get('predicateType')!r}, not SLSA provenance v1")
    statement["_verified_by"] = signed_by
    return statement  # type: ignore[no-any-return]


def subjects(statement: Mapping[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for subject in statement.get("subject", []):
        if isinstance(subject, dict) and isinstance(subject.get("digest"), dict):
            found[str(subject.get("name"))] = str(subject["digest"].get("sha256", ""))
    return found


def check_subjects(statement: Mapping[str, Any], model_files: Mapping[str, str], bundle_sha256: str) -> None:
    """The subjects must be exactly the signed model's files and its bundle; raise otherwise."""
    expected = {MODEL_PREFIX + name: digest for name, digest in model_files.items()}
    expected[BUNDLE_SUBJECT] = bundle_sha256
    actual = subjects(statement)
    problems = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problems.append(f"{name} is not a subject")
        elif name not in expected:
            problems.append(f"{name} is a subject but not part of the signed model")
        elif actual[name] != expected[name]:
            problems.append(f"{name}: attested sha256:{actual[name][:16]}… but the signed model has "
                            f"sha256:{expected[name][:16]}…")
    if problems:
        raise VerificationError("attestation subjects do not match the signed model: " + "; ".join(problems[:4]))
