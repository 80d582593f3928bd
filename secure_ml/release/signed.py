"""Release decisions as signed statements: what the release workflow believes once a trust policy exists.

    signed = SignedDecisions.for_settings(settings)          # None before `secure-ml trust init`
    signed.sign_products(version, evidence, actor="bob")     # the pipeline signs training, evaluation, scan, provenance
    facts = signed.promotion_facts(version)                  # replaces every recorded fact in the policy input
    signed.decide(actor, "approval", version, {...}, permission="model.approve")
    signed.revoked(version)                                  # a verified revocation, or None

The registry stays the index (versions, stages, history), but the policy input's evidence,
approvals and who trained the model come from :class:`~secure_ml.governance.ledger.Ledger`
statements verified against the signed trust policy: editing ``registry.db`` moves nothing. Names
are the trust policy's, so the separation-of-duties rules see one person under every alias.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from secure_ml.errors import ConfigurationError
from secure_ml.governance import authn
from secure_ml.governance.decisions import Evidence, Fact
from secure_ml.governance.ledger import Ledger
from secure_ml.governance.trust import TrustPolicy
from secure_ml.release.registry import ModelVersion
from secure_ml.settings import Settings

__all__ = ["SignedDecisions"]


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
        return cls(settings, policy, Ledger.from_settings(settings))

    # -- pipeline products ---------------------------------------------------------------------
    def sign_products(self, version: ModelVersion, evidence: Mapping[str, Any], *, actor: str) -> list[Fact]:
        """The pipeline signs what it produced about this model, as its own identity."""
        signer = authn.pipeline_signer(self.settings)
        if signer is None:
            raise ConfigurationError("the pipeline has no signing key ($SECURE_ML_HOME/keys/model-signing.pem)")
        training = dict(evidence.get("training") or {})
        provenance = dict(evidence.get("provenance") or {})
        contributors = {
            "trainer": actor,
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
            "approvals": [{"identity": name, "roles": list(self.policy.roles_of(name))} for name in evidence.approvals],
            "revoked": evidence.revoked is not None,
        }

    # -- people's decisions --------------------------------------------------------------------
    def decide(self, actor: authn.Actor, kind: str, version: ModelVersion, predicate: Mapping[str, Any], *,
               permission: str) -> Fact:
        fact = self.ledger.decide(self.settings, self.policy, actor, kind, version.model_digest,
                                  {"version": version.version, **dict(predicate)}, permission=permission)
        self._evidence.pop(version.model_digest, None)
        return fact
