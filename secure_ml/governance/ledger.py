"""Where signed decisions live: content-addressed envelopes per model, and the one way to make one.

    ledger = Ledger.from_settings(settings)                                  # $SECURE_ML_HOME/statements
    fact = ledger.decide(settings, policy, actor, "approval", digest, {"version": "v3"},
                         permission="model.approve")                         # role check, sign, store, audit
    evidence = ledger.evidence(digest, policy)                               # every statement verified, or raise
    ledger = Ledger.from_settings(settings, index=registry)                  # also: indexed, and none gone

Each envelope is stored once under ``statements/<model digest>/<sha256 of the envelope>.json``.
The registry may index them, but the gates read them from here and believe only what verifies
against the trust policy: an edited registry row changes nothing, an envelope copied under another
model's folder is refused (its subject is still the model it was signed for), a garbled or
untrusted one stops the gate with one line and an audit entry (``decision.verify`` deny). With an
index (the registry), every statement stored is listed there too, and a listed statement whose file
is gone (a deleted revocation or approval) stops the gate the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from secure_ml.custody.audit import AuditLog
from secure_ml.custody.integrity import SHA256_HEX, atomic_write_bytes
from secure_ml.errors import BadInput, VerificationError
from secure_ml.governance.authn import Actor, require
from secure_ml.governance.decisions import Evidence, Fact, sign_decision, verify_decision
from secure_ml.governance.trust import TrustPolicy
from secure_ml.settings import Settings

__all__ = ["Ledger", "StatementIndex"]


class StatementIndex(Protocol):
    """Where the ledger lists what it stored (the registry), so a deleted file is noticed."""

    def index_statement(self, model_digest: str, sha256: str, kind: str) -> None: ...
    def indexed_statements(self, model_digest: str) -> list[tuple[str, str]]: ...


class Ledger:
    """Signed statements about models, on disk, verified on every read."""

    def __init__(self, directory: Path, audit: AuditLog | None = None, *, index: StatementIndex | None = None) -> None:
        self.directory = Path(directory)
        self.audit = audit
        self.index = index

    @classmethod
    def from_settings(cls, settings: Settings, *, index: StatementIndex | None = None) -> Ledger:
        return cls(settings.home / "statements", settings.audit_log(), index=index)

    def _folder(self, model_digest: str) -> Path:
        if not SHA256_HEX.match(model_digest or ""):
            raise BadInput(f"not a SHA-256 model digest: {model_digest!r}")
        return self.directory / model_digest

    def models(self) -> list[str]:
        """Every model digest with a statement folder (unverified: read each with :meth:`evidence`)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and SHA256_HEX.match(p.name))

    def envelopes(self, model_digest: str) -> list[bytes]:
        """Every stored envelope about the model, oldest first (unverified)."""
        folder = self._folder(model_digest)
        if not folder.is_dir():
            return []
        paths = sorted(folder.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in paths]

    def record(self, envelope: bytes, policy: TrustPolicy, *, model_digest: str) -> Fact:
        """Verify ``envelope`` about ``model_digest`` and store it; nothing is written if it fails."""
        fact = self._verified(envelope, policy, model_digest, actor="")
        name = hashlib.sha256(envelope).hexdigest()
        atomic_write_bytes(self._folder(model_digest) / f"{name}.json", envelope, mode=0o644)
        if self.index is not None:
            self.index.index_statement(model_digest, name, fact.kind)
        return fact

    def sign_and_record(self, kind: str, model_digest: str, predicate: Mapping[str, Any], signer: Any,
                        policy: TrustPolicy) -> Fact:
        """A pipeline step's product (or any decision already authorised) signed and stored."""
        return self.record(sign_decision(kind, model_digest, predicate, signer), policy, model_digest=model_digest)

    def decide(self, settings: Settings, policy: TrustPolicy, actor: Actor, kind: str, model_digest: str,
               predicate: Mapping[str, Any], *, permission: str) -> Fact:
        """A person's decision: their role checked (audited), signed with their key, stored, audited."""
        require(settings, policy, actor, permission, subject=f"sha256:{model_digest}")
        fact = self.sign_and_record(kind, model_digest, predicate, actor.signer, policy)
        if self.audit is not None:
            self.audit.record(actor.name, f"decision.{kind}", subject=f"sha256:{model_digest}",
                              details={"keyid": fact.keyid, "trust_version": policy.version, **dict(predicate)})
        return fact

    def evidence(self, model_digest: str, policy: TrustPolicy, *, actor: str = "gate") -> Evidence:
        """Every statement about the model verified against the policy; the first bad one raises (audited)."""
        self._check_none_gone(model_digest, actor=actor)
        evidence = Evidence(model_digest)
        for envelope in self.envelopes(model_digest):
            evidence.add(self._verified(envelope, policy, model_digest, actor=actor))
        return evidence

    def _check_none_gone(self, model_digest: str, *, actor: str) -> None:
        """A statement the index lists must still be on disk: deleting a revocation must not un-revoke."""
        if self.index is None:
            return
        folder = self._folder(model_digest)
        gone = [(sha, kind) for sha, kind in self.index.indexed_statements(model_digest)
                if not (folder / f"{sha}.json").is_file()]
        if gone:
            sha, kind = gone[0]
            reason = (f"the registry lists a signed {kind} statement about sha256:{model_digest[:16]}… "
                      f"({sha[:16]}…) but its file is gone from {folder}: a deleted decision is refused")
            if self.audit is not None:
                self.audit.record(actor or "ledger", "decision.verify", subject=f"sha256:{model_digest}",
                                  outcome="deny", details={"reason": reason, "missing": [s for s, _ in gone]})
            raise VerificationError(reason + (f" ({len(gone) - 1} more)" if len(gone) > 1 else ""))

    def _verified(self, envelope: bytes, policy: TrustPolicy, model_digest: str, *, actor: str) -> Fact:
        try:
            return verify_decision(envelope, policy, model_digest=model_digest)
        except VerificationError as exc:
            if self.audit is not None:
                self.audit.record(actor or "ledger", "decision.verify", subject=f"sha256:{model_digest}",
                                  outcome="deny", details={"reason": exc.explain()})
            raise

