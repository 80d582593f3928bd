"""The deploy gate: a registered version verified from its stored bytes, then judged again by policy.

    gate = DeployGate(home=home, registry=registry, engine=engine, access=access, store=store,
                      audit=audit, trust=trust)
    checked = gate.verify(version, actor="dave")       # VerifiedVersion; the caller removes checked.directory.parent
    signature, attestation = gate.verification_facts(version, actor="bob")   # for the promotion policy
    checked = gate.check("production", actor="dave", target="local")         # all that holds before a write

:meth:`DeployGate.check` runs before anything is written to a target: the deployer's role and the
deployment policy (separation of duties), then :meth:`DeployGate.verify`: the model tree, the
signature bundle and the attestation are decrypted from the encrypted store (which checks every
tag and digest) and the one verification chain (secure_ml.security.verification) runs over those
bytes, pinned to the registry's digest; then the promotion policy is evaluated again. Any failure is
audited and raises; the private staging directory is removed. Metadata is never trusted for any of it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_ml.custody.audit import AuditLog
from secure_ml.custody.store import ArtifactStore
from secure_ml.errors import Error, PolicyDenied, VerificationError
from secure_ml.governance.access import AccessPolicy
from secure_ml.governance.policy import PolicyEngine
from secure_ml.release import targets
from secure_ml.release.evidence import pipeline_changers, promotion_input
from secure_ml.release.registry import ModelVersion, Registry
from secure_ml.security import verification
from secure_ml.security.verification import TrustPolicy


@dataclass(frozen=True)
class VerifiedVersion:
    """A registered version decrypted into a private directory and verified from its bytes by the chain."""

    version: str
    directory: Path
    bundle: bytes
    envelope: bytes
    verified: verification.VerifiedModel

    @property
    def model_digest(self) -> str:
        return self.verified.model_digest


class DeployGate:
    """Verification from the stored bytes and the last policy word before a deployment."""

    def __init__(self, *, home: Path, registry: Registry, engine: PolicyEngine, access: AccessPolicy,
                 store: ArtifactStore, audit: AuditLog, trust: TrustPolicy | Callable[[], TrustPolicy]) -> None:
        self.staging_dir = Path(home) / "deployments" / ".staging"
        self.registry = registry
        self.engine = engine
        self.access = access
        self.store = store
        self.audit = audit
        self._trust = trust

    @property
    def trust(self) -> TrustPolicy:
        """Whom the verification chain believes (resolved lazily: status and approve need no signer config)."""
        if not isinstance(self._trust, TrustPolicy):
            self._trust = self._trust()
        return self._trust

    def verify(self, version: ModelVersion, *, actor: str) -> VerifiedVersion:
        """Decrypt the model, bundle and attestation from the store and run the verification chain; audited.

        The model lands in a private directory under ``deployments/.staging``; the caller owns its
        parent and removes it. On failure it is removed and VerificationError/IntegrityError raised.
        """
        stored = version.evidence.get("store") or {}
        self.staging_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        scratch = Path(tempfile.mkdtemp(prefix=f"{version.version}-", dir=self.staging_dir))
        model_dir = scratch / "model"
        subject = f"{version.version} sha256:{version.model_digest}"
        try:
            for key in ("model_tree", "signature", "attestation"):
                if not stored.get(key):
                    raise VerificationError(f"{version.version} has no stored {key.replace('_', ' ')}")
            self.store.get_tree(stored["model_tree"], model_dir)
            bundle = self.store.get_bytes(stored["signature"])
            envelope = self.store.get_bytes(stored["attestation"])
            # The one chain (security.verification), pinned to the digest the registry holds.
            verified = verification.verify_model(model_dir, bundle, envelope, trust=self.trust,
                                                 expected_digest=version.model_digest)
        except Error as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            self.audit.record(actor, "model.verify", subject=subject, outcome="fail", details={"reason": exc.explain()})
            raise
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        self.audit.record(actor, "model.verify", subject=subject,
                          details={"seconds": round(verified.seconds, 4), "signer": verified.signer})
        return VerifiedVersion(version.version, model_dir, bundle, envelope, verified)

    def verification_facts(self, version: ModelVersion, *, actor: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Signature/attestation facts for the policy, verified now (a failure becomes a deny reason)."""
        try:
            checked = self.verify(version, actor=actor)
        except Error as exc:
            reason = " ".join(str(exc).split())
            if isinstance(exc, verification.AttestationError):
                return ({"verified": True, "digest": version.model_digest, "reason": ""},
                        {"verified": False, "subject_matches": False, "reason": reason})
            return ({"verified": False, "reason": reason, "digest": ""},
                    {"verified": False, "subject_matches": False,
                     "reason": "not checked, because the model or its signature did not verify"})
        shutil.rmtree(checked.directory.parent, ignore_errors=True)
        return ({"verified": True, "digest": checked.model_digest, "reason": "", "signer": checked.verified.signer},
                {"verified": True, "subject_matches": True, "reason": "", **checked.verified.attestation})

    def check(self, ref: str, *, actor: str, target: str, permission: str = "model.deploy") -> VerifiedVersion:
        """Everything that must hold before a byte is written to ``target``; raises otherwise."""
        targets.get(target)  # an unknown target is bad input before anything else is looked at
        version = self.registry.get(ref)
        subject = f"{version.version} sha256:{version.model_digest} -> {target}"
        self.access.require(actor, permission, audit=self.audit, subject=subject)
        deployment = self.engine.decide("deployment", {
            "version": version.version, "stage": version.stage, "target": target,
            "deployer": {"identity": actor, "roles": list(self.access.roles_of(actor))},
            "pipeline_changers": pipeline_changers(version),
        })
        if not deployment.allowed:
            self._deny(actor, subject, deployment.reasons)
        verified = self.verify(version, actor=actor)
        try:
            promotion = self.engine.decide("promotion", promotion_input(
                version, target_stage="production", access=self.access,
                signature={"verified": True, "digest": verified.model_digest, "reason": ""},
                attestation={"verified": True, "subject_matches": True, "reason": ""}))
            if not promotion.allowed:
                self._deny(actor, subject, promotion.reasons)
        except BaseException:
            shutil.rmtree(verified.directory.parent, ignore_errors=True)
            raise
        self.audit.record(actor, "deploy.gate", subject=subject, outcome="allow",
                          details={"verify_seconds": round(verified.verified.seconds, 4)})
        return verified

    def _deny(self, actor: str, subject: str, reasons: tuple[str, ...]) -> None:
        self.audit.record(actor, "deploy", subject=subject, outcome="deny", details={"reasons": list(reasons)})
        raise PolicyDenied(f"deploy of {subject.split(' ')[0]} denied: " + "; ".join(reasons))
