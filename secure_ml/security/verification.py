"""The one check that decides whether a model is trusted; every caller runs this chain.

    trust = TrustPolicy.from_config(settings.load_config("security"), settings.home)
    verified = verify_model(model_dir, bundle, envelope, trust=trust, expected_digest="ab12…")
    verified.model_digest, verified.signer, verified.attestation["builder"]

``bundle`` and ``envelope`` are bytes or paths; ``envelope=None`` checks the signature alone (the
security stage's signature check, before any attestation exists). Callers: ``secure-ml model
export`` / ``verify-model`` / ``verify-attestation``, the deploy gate (``Release.verify``), the
security asset checks, and the model server's ``load_verified``. A fault gives the same one-line
reason whichever of them finds it.

The chain, in order:

1. the trust policy names at least one key or identity (fail closed);
2. the OpenSSF model-signing bundle verifies over ``model_dir`` against the trusted signers, and
   every file in the directory is covered (:func:`secure_ml.security.signing.verify_model`);
3. the directory's tree digest (:func:`secure_ml.custody.integrity.tree_digest` of every file's
   SHA-256) equals ``expected_digest`` when one is pinned;
4. the DSSE envelope is signed by a trusted key and carries SLSA provenance, and its subjects are
   exactly the model files (``model/<name>``) and the bundle (``model.sig``).

The signature comes before the pin so that a file changed after signing is named the same way
whether or not the caller pins a digest; the pin then catches a different, validly signed model.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from secure_ml.custody.integrity import SHA256_HEX, sha256_tree, tree_digest
from secure_ml.errors import BadInput, ConfigurationError, VerificationError
from secure_ml.security import attestation as provenance
from secure_ml.security import signing
from secure_ml.security.signing import TrustPolicy

__all__ = ["AttestationError", "TrustPolicy", "VerifiedModel", "verify_model"]


class AttestationError(VerificationError):
    """The model and its signature verified, but the attestation did not (step 4)."""


@dataclass(frozen=True)
class VerifiedModel:
    """What the chain established about a model directory, from its bytes."""

    directory: Path
    model_digest: str                       # tree digest over every file's SHA-256 and path
    files: dict[str, str]                   # relative path -> SHA-256, as hashed now
    signer: str                             # the trusted key or identity that signed it
    method: str                             # key | sigstore
    bundle_sha256: str
    attestation: dict[str, str] = field(default_factory=dict)   # empty when no envelope was given
    seconds: float = 0.0


def _read(value: bytes | Path | str, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{what} not found: {value}") from None
    except IsADirectoryError:
        raise BadInput(f"{what} is a directory: {value}") from None


def verify_model(model_dir: Path | str, bundle: bytes | Path | str, envelope: bytes | Path | str | None, *,
                 trust: TrustPolicy, expected_digest: str | None = None) -> VerifiedModel:
    """Run the chain over ``model_dir``; raise VerificationError (AttestationError for step 4) or BadInput."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    if expected_digest is not None and not SHA256_HEX.match(expected_digest):
        raise BadInput(f"a pinned model digest must be 64 lowercase hex digits, not {expected_digest[:80]!r}")
    if not trust.public_keys and not trust.identities:
        # Fail closed: with nobody trusted, nothing can be verified.
        raise ConfigurationError("no trusted signing keys or identities (config/security.yaml signing)")
    bundle_bytes = _read(bundle, "signature")
    envelope_bytes = None if envelope is None else _read(envelope, "attestation")
    if not model_dir.is_dir():
        raise VerificationError(f"model directory not found: {model_dir}")

    # model-signing reads the bundle from a path: a private copy, so what is verified is what was read.
    with tempfile.TemporaryDirectory(prefix="secure-ml-verify-") as scratch:
        bundle_path = Path(scratch) / "model.sig"
        bundle_path.write_bytes(bundle_bytes)
        signature = signing.verify_model(model_dir, bundle_path, trust)

    files = sha256_tree(model_dir)
    digest = tree_digest(files)
    if expected_digest is not None and digest != expected_digest:
        # A validly signed model, but not the one pinned: a swapped directory never passes.
        raise VerificationError(f"model directory hashes to sha256:{digest[:16]}…, "
                                f"not the pinned sha256:{expected_digest[:16]}…")

    bundle_sha256 = hashlib.sha256(bundle_bytes).hexdigest()
    facts: dict[str, str] = {}
    if envelope_bytes is not None:
        try:
            statement = provenance.verify_envelope(envelope_bytes, trust.public_keys)
            # Subjects against the bytes in hand, not the signature's claims: the files being trusted.
            provenance.check_subjects(statement, files, bundle_sha256)
        except VerificationError as exc:
            raise AttestationError(str(exc)) from None
        run = statement.get("predicate", {}).get("runDetails", {})
        facts = {"verified_by": str(statement.get("_verified_by", "")),
                 "builder": str(run.get("builder", {}).get("id", "")),
                 "invocation": str(run.get("metadata", {}).get("invocationId", "")),
                 "subjects": str(len(statement.get("subject", [])))}
    return VerifiedModel(directory=model_dir, model_digest=digest, files=files, signer=signature.signer,
                         method=signature.method, bundle_sha256=bundle_sha256, attestation=facts,
                         seconds=time.perf_counter() - started)
