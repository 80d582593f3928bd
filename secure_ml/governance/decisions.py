"""Decisions are signed statements: in-toto Statements v1 in DSSE envelopes, subject = the model digest.

    envelope = sign_decision("approval", model_digest, {"version": "v3"}, me.signer)
    fact = verify_decision(envelope, policy, model_digest=digest)       # Fact(kind, signer, predicate)
    evidence = Evidence.build(envelopes, policy, model_digest=digest)    # what the gates may believe

People sign approvals, promotions, deployments, rollbacks and revocations with their identity key
(and data stewards sign a data drop off: ``data_signoff``, subject = the drop's digest);
the pipeline signs what it produces (training record, evaluation, scan report, provenance) with
its own identity. A statement is believed only when its signer's key belongs to an identity in the
verified trust policy that holds the role its kind needs (:data:`SIGNER_ROLE`), and its subject is
the model in question: a signature by an unknown key, a statement moved to another model, a
garbled envelope or an approval signed by a data steward are each one VerificationError line.

The signer's name comes from the trust policy, never from the statement: a predicate's ``actor``
field is not read. Names inside pipeline statements (trainer, data adders, code authors: git emails
or CI logins) are resolved through the policy's aliases, so one person is one name to the gates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from secure_ml.custody.dsse import INTOTO_PAYLOAD_TYPE, STATEMENT_TYPE, Signer, canonical_json, sign_envelope
from secure_ml.custody.dsse import parse_envelope, verify_envelope
from secure_ml.custody.integrity import SHA256_HEX
from secure_ml.errors import BadInput, VerificationError
from secure_ml.governance.trust import PIPELINE_ROLE, TrustPolicy

PREDICATE_PREFIX = "https://secure-ml.dev/decision/"
KINDS = ("approval", "promotion", "deployment", "rollback", "revocation",
         "training", "evaluation", "scan", "provenance", "data_signoff")
PIPELINE_KINDS = frozenset({"training", "evaluation", "scan", "provenance"})
SUBJECT_NAME = "model"
# A data steward's sign-off is about a data drop (its dataset digest), not a model.
SUBJECT_NAMES = {"data_signoff": "drop"}

__all__ = ["KINDS", "Fact", "Evidence", "predicate_type", "sign_decision", "verify_decision", "signer_role"]


def predicate_type(kind: str) -> str:
    if kind not in KINDS:
        raise BadInput(f"unknown decision kind {kind!r} (known: {', '.join(KINDS)})")
    return f"{PREDICATE_PREFIX}{kind}/v1"


def signer_role(kind: str, policy: TrustPolicy) -> str:
    """The role a signer of ``kind`` must hold (approval and revocation: the approver role)."""
    promotion = policy.promotion
    if kind in PIPELINE_KINDS:
        return PIPELINE_ROLE
    if kind in ("approval", "revocation", "promotion"):
        return str(promotion.get("approver_role", "approver"))
    if kind == "data_signoff":
        return str(promotion.get("data_steward_role", "data_steward"))
    return str(promotion.get("deployer_role", "deployer"))


def decision_statement(kind: str, model_digest: str, predicate: Mapping[str, Any]) -> dict[str, Any]:
    if not SHA256_HEX.match(model_digest or ""):
        raise BadInput(f"a decision's subject must be a SHA-256 model digest, not {model_digest!r}")
    body = {"time": datetime.now(UTC).isoformat(timespec="microseconds"), **dict(predicate)}
    name = SUBJECT_NAMES.get(kind, SUBJECT_NAME)
    return {"_type": STATEMENT_TYPE, "subject": [{"name": name, "digest": {"sha256": model_digest}}],
            "predicateType": predicate_type(kind), "predicate": body}


def sign_decision(kind: str, model_digest: str, predicate: Mapping[str, Any], signer: Signer) -> bytes:
    """The signed envelope (JSON bytes) of one decision about one model."""
    return sign_envelope(canonical_json(decision_statement(kind, model_digest, predicate)), INTOTO_PAYLOAD_TYPE,
                         [signer])


@dataclass(frozen=True)
class Fact:
    """A verified decision: what kind, who signed it (a trust-policy name), what it says."""

    kind: str
    signer: str
    keyid: str
    model_digest: str
    predicate: Mapping[str, Any]


def verify_decision(envelope: bytes | str | Mapping[str, Any], policy: TrustPolicy, *,
                    model_digest: str | None = None, kind: str | None = None) -> Fact:
    """Verify one envelope against the trust policy; raise VerificationError with one line."""
    parsed = parse_envelope(envelope, what="signed decision")
    try:
        import json

        statement = json.loads(parsed.payload)
        ptype = str(statement["predicateType"])
        subjects = statement["subject"]
        digest = str(subjects[0]["digest"]["sha256"]) if len(subjects) == 1 else ""
        predicate = dict(statement["predicate"])
    except (ValueError, KeyError, TypeError, IndexError):
        raise VerificationError("the signed decision is not an in-toto Statement about one model") from None
    if statement.get("_type") != STATEMENT_TYPE or not ptype.startswith(PREDICATE_PREFIX):
        raise VerificationError(f"the signed decision has an unknown statement or predicate type ({ptype})")
    found = ptype[len(PREDICATE_PREFIX):].removesuffix("/v1")
    if found not in KINDS or (kind is not None and found != kind):
        raise VerificationError(f"the signed decision is a {found!r}, not a {kind or 'known kind'!r}")
    role = signer_role(found, policy)
    keys = policy.keys_with_role(role)
    try:
        verified = verify_envelope(parsed, keys, threshold=1, payload_type=INTOTO_PAYLOAD_TYPE,
                                   what=f"{found} statement")
    except VerificationError:
        other = [k for k in parsed.signatures if policy.name_of_key(k)]
        if other:
            name = policy.name_of_key(other[0])
            raise VerificationError(f"the {found} statement is signed by {name}, who does not hold the {role} role "
                                    "(or it was altered after signing)") from None
        raise VerificationError(f"the {found} statement is not signed by a key the trust policy gives the {role} "
                                "role (untrusted key, or altered after signing)") from None
    keyid = verified.keyids[0]
    if model_digest is not None and digest != model_digest:
        # An approval copied onto another version: its subject is still the model it was signed for.
        raise VerificationError(f"the {found} statement is about sha256:{digest[:16]}…, not this model "
                                f"sha256:{model_digest[:16]}…: it was moved from another version")
    return Fact(found, str(policy.name_of_key(keyid)), keyid, digest, predicate)


@dataclass
class Evidence:
    """What the gates may believe about one model, built from verified statements alone."""

    model_digest: str
    approvals: list[str] = field(default_factory=list)
    revoked: Fact | None = None
    facts: list[Fact] = field(default_factory=list)
    products: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    deployments: list[Fact] = field(default_factory=list)

    @classmethod
    def build(cls, envelopes: Iterable[bytes | str | Mapping[str, Any]], policy: TrustPolicy, *,
              model_digest: str) -> Evidence:
        evidence = cls(model_digest)
        for envelope in envelopes:
            evidence.add(verify_decision(envelope, policy, model_digest=model_digest))
        return evidence

    def add(self, fact: Fact) -> None:
        """Fold in one verified fact (about this model)."""
        if fact.model_digest != self.model_digest:
            raise VerificationError(f"the {fact.kind} statement is about another model: it was moved")
        self.facts.append(fact)
        if fact.kind == "approval" and fact.signer not in self.approvals:
            self.approvals.append(fact.signer)
        elif fact.kind == "revocation":
            self.revoked = fact
        elif fact.kind in ("deployment", "rollback"):
            self.deployments.append(fact)
        elif fact.kind in PIPELINE_KINDS:
            self.products[fact.kind] = fact.predicate  # the newest of each kind wins

    def contributors(self, policy: TrustPolicy) -> dict[str, list[str]]:
        """Who trained it, added its data and wrote its code, as trust-policy names where known."""
        training = self.products.get("training") or {}
        out: dict[str, list[str]] = {}
        for role, names in (("trainer", [training.get("trainer", "")]),
                            ("data_adders", list(training.get("data_adders") or [])),
                            ("code_authors", list(training.get("code_authors") or []))):
            out[role] = sorted({policy.resolve(str(n)) or str(n).lower() for n in names if n})
        return out

    def separation_violations(self, policy: TrustPolicy) -> list[str]:
        """An approver who also trained the model, added its data or wrote its code, under any alias."""
        problems = []
        for approver in self.approvals:
            for role, names in self.contributors(policy).items():
                if any(policy.same_person(approver, n) for n in names):
                    problems.append(f"{approver} may not approve a model they are among the {role.replace('_', ' ')} of")
        return problems

    def policy_input(self, policy: TrustPolicy, *, version: str) -> dict[str, Any]:
        """The promotion/deploy policy input: verified names and signed products only."""
        contributors = self.contributors(policy)
        return {
            "version": version, "model_digest": self.model_digest,
            "approvals": [{"identity": a} for a in self.approvals
                          if not any(policy.same_person(a, n) for names in contributors.values() for n in names)],
            "approvers_excluded": self.separation_violations(policy),
            "trainer": (contributors["trainer"] or [""])[0], "data_adders": contributors["data_adders"],
            "code_authors": contributors["code_authors"],
            "evaluation": dict(self.products.get("evaluation") or {}),
            "scan": dict(self.products.get("scan") or {}),
            "provenance": dict(self.products.get("provenance") or {}),
            "revoked": self.revoked is not None,
        }
