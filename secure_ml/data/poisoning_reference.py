"""The trusted yardstick for poisoning screening: a data steward's sign-off, and the drift bound.

    sign_off(home, dataset="loans", drop_sha256=digest, actor="alice", policy=policy, audit=log,
             reason="first export from the loans system, checked against the source")
    found = find_sign_off(home, dataset="loans", drop_sha256=digest, policy=policy, audit=log)
    found.record if found.valid else found.why                # the record, or why it does not count

    # Once a trust policy exists the sign-off is a signed decision, and only that counts:
    record = signed_sign_off(settings, actor, dataset="loans", drop_sha256=digest, reason="...")
    found = find_signed_sign_off(settings, dataset="loans", drop_sha256=digest)

    drift = reference_drift(pinned, last_accepted, label="risk", numeric=[...], categorical=[...],
                            max_psi=0.25, max_label_shift=0.10)
    drift.within, drift.worst, drift.describe()

A data set whose schema pins no reference sample has nothing to judge its first version against;
screening a drop only against itself is no evidence, and the accepted drop becomes every later
drop's reference. So the first version of such a data set is accepted only with a sign-off: a data
steward (``data.sign_off`` in roles.yaml) names the drop by its digest, the decision is appended to
the audit log, and a record of it (carrying that audit entry's sequence number and hash) is written
under ``$SECURE_ML_HOME/signoffs/DATASET/DIGEST.json``. ``validated_dataset`` accepts the record only
while the audit chain verifies, the entry it names is there unaltered, and its actor still holds
the permission. Once a trust policy exists (``secure-ml trust init``) the sign-off is a signed
decision instead: an in-toto Statement (``data_signoff``) in a DSSE envelope whose subject is the
drop's digest, signed by the steward's identity key and stored in the ledger of signed statements
(``$SECURE_ML_HOME/statements/DIGEST/``). ``validated_dataset`` then believes only a statement that
verifies against the trust policy, by a key holding the data steward role, about this very drop and
dataset; a forged, moved or garbled one is named, audited, and the drop stays blocked.

The drift bound keeps the yardstick from walking: each accepted version becomes the next drop's
reference, so small accepted poisonings could compound. The last accepted version is used only
while its features (PSI) and label balance stay within the configured bounds of the pinned sample;
otherwise screening falls back to the pinned sample and says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from secure_ml.errors import BadInput
from secure_ml.custody.integrity import atomic_write

FORMAT = "secure-ml-signoff/1"
SIGNED_FORMAT = "secure-ml-signoff/2"  # a view of a verified data_signoff statement
PERMISSION = "data.sign_off"
ACTION = "data.sign_off"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _Policy(Protocol):
    def require(self, identity: str, permission: str, *, classification: str | None = None,
                audit: Any = None, subject: str = "") -> Any: ...

    def decide(self, identity: str, permission: str, *, classification: str | None = None) -> Any: ...


class _Audit(Protocol):
    def record(self, actor: str, action: str, *, subject: str = "", outcome: str = "ok",
               details: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def entries(self) -> Any: ...

    def verify(self) -> Any: ...


def sign_off_path(home: Path, dataset: str, drop_sha256: str) -> Path:
    return Path(home) / "signoffs" / dataset / f"{drop_sha256}.json"


def _check(dataset: str, drop_sha256: str) -> str:
    digest = drop_sha256.removeprefix("sha256:").lower()
    if not _DIGEST.match(digest):
        raise BadInput(f"drop digest must be 64 hex digits (sha256), not {drop_sha256!r}")
    if not _NAME.match(dataset):
        raise BadInput(f"dataset name {dataset!r} must be letters, digits, '.', '_' or '-'")
    return digest


def sign_off(home: Path, *, dataset: str, drop_sha256: str, actor: str, policy: _Policy, audit: _Audit,
             reason: str) -> dict[str, Any]:
    """Record a data steward's acceptance of an unguarded first version; raises PolicyDenied if not allowed."""
    digest = _check(dataset, drop_sha256)
    if not reason.strip():
        raise BadInput("a sign-off needs a reason (what was checked, against what)")
    subject = f"sha256:{digest}"
    decision = policy.require(actor, PERMISSION, audit=audit, subject=subject)
    entry = audit.record(actor, ACTION, subject=subject, outcome="ok",
                         details={"dataset": dataset, "reason": reason, "roles": list(decision.roles)})
    record = {
        "format": FORMAT,
        "dataset": dataset,
        "drop_sha256": digest,
        "actor": actor,
        "roles": list(decision.roles),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "reason": reason,
        "audit_seq": entry["seq"],
        "audit_hash": entry["hash"],
    }
    path = sign_off_path(home, dataset, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, mode=0o644) as out:
        out.write(json.dumps(record, indent=2, sort_keys=True).encode("utf-8"))
    return record


def signed_sign_off(settings: Any, actor: Any, *, dataset: str, drop_sha256: str, reason: str) -> dict[str, Any]:
    """The steward ``actor`` (secure_ml.governance.authn.Actor) signs the drop off: a signed, stored, audited
    ``data_signoff`` statement about the drop's digest. PolicyDenied (audited) without a key or the role."""
    from secure_ml.errors import PolicyDenied
    from secure_ml.governance import authn
    from secure_ml.governance.ledger import Ledger

    digest = _check(dataset, drop_sha256)
    if not reason.strip():
        raise BadInput("a sign-off needs a reason (what was checked, against what)")
    policy = authn.verified_policy(settings)
    if actor.identity is None:  # a name (SECURE_ML_ACTOR) proves nothing: the sign-off is signed
        settings.audit_log().record(authn.claimed(settings), "access.deny", subject=f"sha256:{digest}",
                                    outcome="deny", details={"permission": PERMISSION,
                                                             "reason": "a data sign-off without an identity key"})
        raise PolicyDenied("a data sign-off is a signed decision: set SECURE_ML_IDENTITY to your identity key file")
    fact = Ledger.from_settings(settings).decide(settings, policy, actor, "data_signoff", digest,
                                                 {"dataset": dataset, "reason": reason}, permission=PERMISSION)
    return _signed_record(fact, dataset, digest)


def _signed_record(fact: Any, dataset: str, digest: str) -> dict[str, Any]:
    return {"format": SIGNED_FORMAT, "dataset": dataset, "drop_sha256": digest, "actor": fact.signer,
            "keyid": fact.keyid, "time": str(fact.predicate.get("time", "")),
            "reason": str(fact.predicate.get("reason", "")), "signed": True}


def find_signed_sign_off(settings: Any, *, dataset: str, drop_sha256: str) -> FoundSignOff:
    """The newest verified ``data_signoff`` statement about this drop and dataset (never raises on a bad one:
    the ledger audits it and ``why`` names it)."""
    from secure_ml.errors import Error
    from secure_ml.governance import authn
    from secure_ml.governance.access import AccessPolicy
    from secure_ml.governance.ledger import Ledger

    try:
        digest = _check(dataset, drop_sha256)
        policy = authn.verified_policy(settings)
        evidence = Ledger.from_settings(settings).evidence(digest, policy, actor="validation")
    except Error as exc:
        return FoundSignOff(None, exc.explain())
    facts = [f for f in evidence.facts if f.kind == "data_signoff" and f.predicate.get("dataset") == dataset]
    if not facts:
        return FoundSignOff(None, "no data steward has signed this drop off (a signed data_signoff statement)")
    decision = AccessPolicy(policy.access_config()).decide(facts[-1].signer, PERMISSION)
    if not decision.allowed:
        return FoundSignOff(None, f"{facts[-1].signer} no longer holds {PERMISSION}: {decision.reason}")
    return FoundSignOff(_signed_record(facts[-1], dataset, digest))


@dataclass(frozen=True)
class FoundSignOff:
    record: dict[str, Any] | None
    why: str = ""

    @property
    def valid(self) -> bool:
        return self.record is not None


def find_sign_off(home: Path, *, dataset: str, drop_sha256: str, policy: _Policy, audit: _Audit) -> FoundSignOff:
    """The sign-off for this drop, if one exists and still holds (never raises on a bad record)."""
    from secure_ml.custody.audit import entry_hash
    from secure_ml.errors import Error

    try:
        digest = _check(dataset, drop_sha256)
    except BadInput as exc:
        return FoundSignOff(None, str(exc))
    path = sign_off_path(home, dataset, digest)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return FoundSignOff(None, "no data steward has signed this drop off")
    except (OSError, ValueError):
        return FoundSignOff(None, f"sign-off record {path.name} is unreadable")
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("dataset") != dataset \
            or record.get("drop_sha256") != digest:
        return FoundSignOff(None, f"sign-off record {path.name} does not name this dataset and drop")
    # The record is only a pointer; the audit entry is the decision (a hand-written file proves nothing).
    try:
        audit.verify()
    except Error as exc:
        return FoundSignOff(None, f"the audit log does not verify, so no sign-off in it counts ({exc})")
    entry = next((e for e in audit.entries() if e.get("seq") == record.get("audit_seq")), None)
    if entry is None or entry.get("hash") != record.get("audit_hash") or entry_hash(entry) != entry.get("hash") \
            or entry.get("action") != ACTION or entry.get("subject") != f"sha256:{digest}" \
            or entry.get("actor") != record.get("actor") \
            or (entry.get("details") or {}).get("dataset") != dataset:
        return FoundSignOff(None, f"sign-off record {path.name} has no matching data.sign_off entry in the audit log")
    decision = policy.decide(str(record["actor"]), PERMISSION)
    if not decision.allowed:
        return FoundSignOff(None, f"{record['actor']} no longer holds {PERMISSION}: {decision.reason}")
    return FoundSignOff(record)


# -- the drift bound ----------------------------------------------------------------------------------
@dataclass
class Drift:
    psi: dict[str, float]
    label_shift: float
    max_psi: float
    max_label_shift: float
    over: list[str] = field(default_factory=list)

    @property
    def within(self) -> bool:
        return not self.over

    @property
    def worst(self) -> str:
        return max(self.psi, key=lambda c: self.psi[c]) if self.psi else ""

    def describe(self) -> str:
        if self.within:
            return (f"within bounds of the pinned sample (largest PSI {self.psi.get(self.worst, 0.0):.3f} "
                    f"on {self.worst}, label share moved {self.label_shift:.3f})")
        return "drifted from the pinned sample: " + "; ".join(self.over)


def reference_drift(pinned: pd.DataFrame, candidate: pd.DataFrame, *, label: str, numeric: Sequence[str],
                    categorical: Sequence[str], max_psi: float, max_label_shift: float) -> Drift:
    """How far ``candidate`` (the last accepted version) has moved from the ``pinned`` sample."""
    from secure_ml.data.poisoning_features import _label_text, psi

    values: dict[str, float] = {}
    for column in numeric:
        ref = pinned[column].to_numpy(dtype=np.float64, na_value=np.nan)
        ref = ref[np.isfinite(ref)]
        edges = np.unique(np.quantile(ref, np.linspace(0, 1, 11)[1:-1])) if len(ref) else np.array([])
        now = candidate[column].to_numpy(dtype=np.float64, na_value=np.nan)
        now = now[np.isfinite(now)]
        bins = len(edges) + 1
        values[column] = psi(np.bincount(np.searchsorted(edges, ref, side="right"), minlength=bins),
                             np.bincount(np.searchsorted(edges, now, side="right"), minlength=bins))
    for column in categorical:
        a, b = _label_text(pinned[column]).value_counts(), _label_text(candidate[column]).value_counts()
        cats = sorted(set(a.index) | set(b.index))
        values[column] = psi(a.reindex(cats, fill_value=0).to_numpy(), b.reindex(cats, fill_value=0).to_numpy())
    a = _label_text(pinned[label]).value_counts(normalize=True)
    b = _label_text(candidate[label]).value_counts(normalize=True)
    cats = sorted(set(a.index) | set(b.index))
    label_shift = float(np.abs(a.reindex(cats, fill_value=0) - b.reindex(cats, fill_value=0)).max())
    over = [f"PSI of {c} {v:.3f} > {max_psi:g}" for c, v in sorted(values.items(), key=lambda kv: -kv[1])
            if v > max_psi]
    if label_shift > max_label_shift:
        over.append(f"label share of {label} moved {label_shift:.3f} > {max_label_shift:g}")
    return Drift({c: round(v, 4) for c, v in values.items()}, round(label_shift, 4), max_psi, max_label_shift, over)
