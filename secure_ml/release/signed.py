"""Release decisions as signed statements: what the release workflow believes once a trust policy exists.

    signed = SignedDecisions.for_settings(settings)          # None before `secure-ml trust init`
    signed.sign_products(version, evidence, actor="bob")     # the pipeline signs training, evaluation, scan, provenance
    facts = signed.promotion_facts(version)                  # replaces every recorded fact in the policy input
    signed.decide(actor, "approval", version, {...}, permission="model.approve")
    signed.revoked(version)                                  # a verified revocation, or None
    signed.admitted_digests("kubernetes")                    # what admission may run: signed deployments only
    registry = TrustedRegistry(path, signed)                 # get() returns rows with verified facts only

The registry stays the index (versions, stages, history), but the policy input's evidence,
approvals and who trained the model come from :class:`~secure_ml.governance.ledger.Ledger`
statements verified against the signed trust policy: editing ``registry.db`` moves nothing. Names
are the trust policy's, so the separation-of-duties rules see one person under every alias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_ml.errors import ConfigurationError, PolicyDenied, VerificationError
from secure_ml.governance import authn
from secure_ml.governance.decisions import Evidence, Fact
from secure_ml.governance.ledger import Ledger
from secure_ml.governance.trust import TrustPolicy
from secure_ml.release.registry import Deployment, ModelVersion, Registry
from secure_ml.settings import Settings

__all__ = ["SignedDecisions", "TrustedRegistry", "REVOKED"]

REVOKED = "revoked"
_PRODUCTS = ("evaluation", "scan", "provenance")
_ENVELOPE_FIELDS = ("version", "time")


@dataclass
class SignedDecisions:
    settings: Settings
    policy: TrustPolicy
    ledger: Ledger
    _evidence: dict[str, Evidence] = field(default_factory=dict)

    @classmethod
    def for_settings(cls, settings: Settings) -> SignedDecisions | None:
        """The verified trust policy and its ledger; None while no trust policy exists (and none is pinned)."""
        if not authn.trust_store(settings).exists() and not settings.environ.get("SECURE_ML_TRUST_ROOT"):
            return None
        policy = authn.verified_policy(settings)
        authn.check_config(settings, policy)
        # The registry indexes every statement, so a deleted file (a revocation, an approval) is noticed.
        return cls(settings, policy, Ledger.from_settings(settings, index=Registry.from_settings(settings)))

    # -- pipeline products ---------------------------------------------------------------------
    def sign_products(self, version: ModelVersion, evidence: Mapping[str, Any], *, actor: str) -> list[Fact]:
        """The pipeline signs what it produced about this model, as its own identity."""
        signer = authn.pipeline_signer(self.settings)
        if signer is None:
            raise ConfigurationError("the pipeline has no signing key ($SECURE_ML_HOME/keys/model-signing.pem)")
        training = dict(evidence.get("training") or {})
        provenance = dict(evidence.get("provenance") or {})
        contributors = {
            "trainer": str(training.get("actor") or actor),
            "data_adders": [n for n in [provenance.get("data_actor")] if n],
            "code_authors": [n for n in (training.get("code_author"), training.get("code_author_name")) if n],
        }
        products = {"training": {**training, **contributors, "registered_by": actor},
                    "evaluation": dict(evidence.get("evaluation") or {}),
                    "scan": dict(evidence.get("scan") or {}), "provenance": provenance}
        facts = [self.ledger.sign_and_record(kind, version.model_digest, {"version": version.version, **body},
                                             signer, self.policy) for kind, body in products.items()]
        self._evidence.pop(version.model_digest, None)
        return facts

    # -- what the gates read -------------------------------------------------------------------
    def evidence(self, version: ModelVersion) -> Evidence:
        if version.model_digest not in self._evidence:
            self._evidence[version.model_digest] = self.ledger.evidence(version.model_digest, self.policy)
        return self._evidence[version.model_digest]

    def revoked(self, version: ModelVersion) -> Fact | None:
        return self.evidence(version).revoked

    def admitted_digests(self, target: str) -> list[str]:
        """Model digests the ``target``'s admission policy may admit, from verified statements alone.

        A model is admitted when a deployer's signed deployment (or rollback) to ``target`` verifies and
        no revocation does; registry rows play no part. Any forged, moved or deleted statement raises
        (audited) rather than shrinking the list silently.
        """
        admitted = []
        for digest in self.ledger.models():
            evidence = self.ledger.evidence(digest, self.policy, actor="admission")
            if evidence.revoked is None and any(f.predicate.get("target") == target for f in evidence.deployments):
                admitted.append(digest)
        return admitted

    def require_signed_deployment(self, version: ModelVersion, target: str) -> Fact:
        """The verified deployment (or rollback) statement that put ``version`` on ``target``; a deployment
        the registry records without one (an inserted row, a deleted statement) raises VerificationError."""
        evidence = self.evidence(version)
        backing = [f for f in evidence.deployments if f.predicate.get("target") == target]
        if evidence.revoked is not None:
            why = evidence.revoked.predicate.get("reason", "")
            raise VerificationError(f"{version.version} on {target} is revoked: {why}")
        if not backing:
            raise VerificationError(f"the registry says {version.version} is deployed to {target}, but no signed "
                                    "deployment or rollback statement says so")
        return backing[-1]

    def canonical(self, name: str) -> str:
        return self.policy.resolve(name) or name

    def promotion_facts(self, version: ModelVersion) -> dict[str, Any]:
        """The policy input's facts, from verified statements alone (replacing the registry's)."""
        evidence = self.evidence(version)
        training = dict(evidence.products.get("training") or {})
        contributors = evidence.contributors(self.policy)
        training.update({"actor": (contributors["trainer"] or [""])[0],
                         "code_author": (contributors["code_authors"] or [None])[0],
                         "code_author_name": (contributors["code_authors"][1:2] or [None])[0]})
        provenance = dict(evidence.products.get("provenance") or {})
        if contributors["data_adders"]:
            provenance["data_actor"] = contributors["data_adders"][0]
        return {
            "evaluation": dict(evidence.products.get("evaluation") or {}),
            "scan": dict(evidence.products.get("scan") or {}),
            "provenance": provenance,
            "training": training,
            "registered_by": training.get("actor") or "",
            # An approval by the code's author never counts (the Rego rules cover data adder and trainer).
            "approvals": [{"identity": name, "roles": list(self.policy.roles_of(name))} for name in evidence.approvals
                          if not any(self.policy.same_person(name, a) for a in contributors["code_authors"])],
            "revoked": evidence.revoked is not None,
        }

    def code_author_conflicts(self, version: ModelVersion, name: str) -> list[str]:
        """Why ``name`` may not approve: they wrote the code that produced it (under any alias)."""
        authors = self.evidence(version).contributors(self.policy)["code_authors"]
        if any(self.policy.same_person(name, a) for a in authors):
            return [f"self-approval: {name} authored the pipeline code that produced {version.version} "
                    "and may not approve it"]
        return []

    # -- people's decisions --------------------------------------------------------------------
    def decide(self, actor: authn.Actor, kind: str, version: ModelVersion, predicate: Mapping[str, Any], *,
               permission: str) -> Fact:
        fact = self.ledger.decide(self.settings, self.policy, actor, kind, version.model_digest,
                                  {"version": version.version, **dict(predicate)}, permission=permission)
        self._evidence.pop(version.model_digest, None)
        return fact

    # -- the registry row, believed only where statements back it -----------------------------
    def trusted(self, row: ModelVersion, *, strict: bool = True) -> ModelVersion:
        """``row`` with its evidence, approvals, trainer and stage replaced by verified facts.

        ``strict``: a row that claims what no statement backs (an edited or inserted row) is refused.
        """
        evidence = self.evidence(row)
        if strict:
            self._check_row(row, evidence)
        facts = self.promotion_facts(row)
        merged = {**row.evidence, **{k: facts[k] for k in (*_PRODUCTS, "training")}}
        approvals = tuple({"identity": a["identity"], "roles": a["roles"], "signed": True} for a in facts["approvals"])
        stage = REVOKED if evidence.revoked is not None else row.stage
        return dataclasses.replace(row, evidence=merged, approvals=approvals, stage=stage,
                                   registered_by=facts["registered_by"] or row.registered_by)

    def _check_row(self, row: ModelVersion, evidence: Evidence) -> None:
        problems = []
        for kind in _PRODUCTS:
            signed = evidence.products.get(kind)
            if signed is not None and kind in row.evidence:
                body = {k: v for k, v in signed.items() if k not in _ENVELOPE_FIELDS}
                if body != row.evidence[kind]:
                    problems.append(f"its {kind} differs from what the pipeline signed")
        unsigned = [a.get("identity") for a in row.approvals
                    if self.canonical(str(a.get("identity"))) not in evidence.approvals]
        if unsigned:
            problems.append(f"it lists approvals with no signed statement ({', '.join(map(str, unsigned))})")
        if row.stage == "production" and not any(f.kind in ("promotion", "rollback") for f in evidence.facts):
            problems.append("it says production but no signed promotion or rollback put it there")
        if problems:
            message = f"the registry row of {row.version} was edited: {'; '.join(problems)}"
            self.settings.audit_log().record("registry", "registry.verify", subject=f"{row.version} sha256:"
                                             f"{row.model_digest}", outcome="deny", details={"reasons": problems})
            raise VerificationError(message)

    def require_actor(self, by: authn.Actor | None, what: str) -> authn.Actor:
        if by is None or by.identity is None:
            self.settings.audit_log().record(authn.claimed(self.settings), "access.deny", outcome="deny",
                                             details={"reason": f"{what} without an identity key"})
            raise PolicyDenied(f"{what} is a signed decision: set SECURE_ML_IDENTITY to your identity key file")
        return by


class TrustedRegistry(Registry):
    """The registry as an index: every version read back carries verified facts only."""

    def __init__(self, path: Path | str, signed: SignedDecisions, *, model: str | None = None) -> None:
        super().__init__(path, model=model)
        self.signed = signed

    def get(self, ref: str) -> ModelVersion:
        return self.signed.trusted(super().get(ref))

    def versions(self) -> list[ModelVersion]:
        return [self.signed.trusted(v, strict=False) for v in super().versions()]

    def _restorable(self, deployment: Deployment) -> bool:
        """A revoked version is never a rollback target."""
        return self.signed.revoked(Registry.get(self, deployment.version)) is None
