"""The signed trust policy: who is who, who may do what, and what the gates require (TUF root style).

    store = TrustStore.from_home(settings.home)                      # $SECURE_ML_HOME/trust
    store.init([owner_signer], base=TrustPolicy.defaults(settings))   # version 1, signed by the owner
    store.update(lambda doc: add_identity(doc, "carol", key, ["approver"]), [owner_signer])
    policy = store.load()            # verified, never older than the newest seen; raises otherwise
    policy.name_of_key(keyid), policy.roles_of("carol"), policy.same_person("bob", "bob@example.com")

One JSON document in a DSSE envelope (payload type :data:`PAYLOAD_TYPE`) holds the identities
(public keys, OIDC issuer and subject, aliases such as a git email or CI login), the roles, the
promotion and admission data the gates evaluate, the roles an unauthenticated local run gets, and
the trusted model signers. It is signed by ``threshold`` of its owner keys.

Rollback and swaps: ``root.json`` pins the owners, threshold, version and payload digest of the
newest policy seen. A policy must be signed by the pinned owners (a new owner set is accepted only
when the old one signs it, as TUF root rotation is); an older version, or the same version with
other content, is refused. ``SECURE_ML_TRUST_ROOT=FILE`` keeps the pin outside the home (a read-only
mount, a ConfigMap): then whoever can write the home cannot re-initialise trust either.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secure_ml.custody.dsse import Key, Signer, SSlibKey, canonical_json, sign_envelope, verify_envelope
from secure_ml.custody.integrity import atomic_write_bytes
from secure_ml.errors import BadInput, ConfigurationError, VerificationError

PAYLOAD_TYPE = "application/vnd.secure-ml.trust-policy+json"
POLICY_TYPE = "https://secure-ml.dev/TrustPolicy/v1"
ROOT_ENV = "SECURE_ML_TRUST_ROOT"
PIPELINE_ROLE = "pipeline"
UNAUTHENTICATED = "unauthenticated"

__all__ = ["TrustPolicy", "TrustStore", "PAYLOAD_TYPE", "add_identity", "PIPELINE_ROLE", "UNAUTHENTICATED"]


def _key_from_dict(keyid: str, data: Mapping[str, Any]) -> Key:
    try:
        return SSlibKey.from_dict(keyid, dict(copy.deepcopy(data)))
    except (KeyError, TypeError, ValueError) as exc:
        raise VerificationError(f"the trust policy's key {keyid[:16]}… is malformed ({exc})") from None


@dataclass(frozen=True)
class TrustPolicy:
    """A verified trust policy document (read-only views over it)."""

    doc: Mapping[str, Any]
    digest: str = ""

    @property
    def version(self) -> int:
        return int(self.doc["version"])

    @property
    def identities(self) -> Mapping[str, Mapping[str, Any]]:
        return self.doc.get("identities") or {}

    @property
    def promotion(self) -> dict[str, Any]:
        return dict(self.doc.get("promotion") or {})

    def promotion_for(self, model: str) -> dict[str, Any]:
        """The promotion data for ``model``: the shared parameters with that model's signed overrides
        (``model_promotion``, from its spec; e.g. no bias metrics for a model without protected attributes)."""
        overrides = dict((self.doc.get("model_promotion") or {}).get(model) or {})
        return {**self.promotion, **overrides}

    @property
    def admission(self) -> dict[str, Any]:
        return dict(self.doc.get("admission") or {})

    def key(self, keyid: str) -> Key:
        return _key_from_dict(keyid, self.doc["keys"][keyid])

    def owner_keys(self) -> list[Key]:
        return [self.key(k) for k in self.doc["owners"]["keyids"]]

    @property
    def owner_threshold(self) -> int:
        return int(self.doc["owners"]["threshold"])

    def keys_of(self, name: str) -> list[Key]:
        return [self.key(k) for k in (self.identities.get(name) or {}).get("keys", [])]

    def keys_with_role(self, role: str) -> list[Key]:
        return [key for name in self.identities if role in self.roles_of(name) for key in self.keys_of(name)]

    def model_signer_keys(self) -> list[Key]:
        return [self.key(k) for k in self.doc.get("model_signers", [])]

    def name_of_key(self, keyid: str) -> str | None:
        for name, spec in self.identities.items():
            if keyid in spec.get("keys", []):
                return name
        return None

    def name_of_oidc(self, issuer: str, subject: str) -> str | None:
        for name, spec in self.identities.items():
            if any(o.get("issuer") == issuer and o.get("subject") == subject for o in spec.get("oidc", [])):
                return name
        return None

    def resolve(self, claimed: str) -> str | None:
        """The identity a name, git email or CI login belongs to (None: nobody the policy knows)."""
        if not claimed:
            return None
        lowered = claimed.lower()
        for name, spec in self.identities.items():
            if lowered == name.lower() or lowered in (a.lower() for a in spec.get("aliases", [])):
                return name
        return None

    def same_person(self, a: str, b: str) -> bool:
        """Whether two names (or aliases) are one person: `github:carol` and `carol` are, if listed."""
        ra, rb = self.resolve(a) or a.lower(), self.resolve(b) or b.lower()
        return bool(a and b) and ra == rb

    def roles_of(self, name: str) -> tuple[str, ...]:
        if name == UNAUTHENTICATED:
            return tuple((self.doc.get("unauthenticated") or {}).get("roles", []))
        return tuple((self.identities.get(name) or {}).get("roles", []))

    def access_config(self) -> dict[str, Any]:
        """What secure_ml.governance.access.AccessPolicy reads: identities by name, no default roles."""
        identities: dict[str, list[str]] = {n: list(self.roles_of(n)) for n in self.identities}
        identities[UNAUTHENTICATED] = list(self.roles_of(UNAUTHENTICATED))
        return {"classifications": self.doc.get("classifications"), "roles": self.doc.get("roles") or {},
                "identities": identities, "default_roles": []}

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest, "issued": self.doc.get("issued"),
                "owners": {"keyids": list(self.doc["owners"]["keyids"]), "threshold": self.owner_threshold},
                "identities": {n: {"roles": list(s.get("roles", [])), "keys": list(s.get("keys", [])),
                                   "aliases": list(s.get("aliases", [])), "oidc": list(s.get("oidc", []))}
                               for n, s in self.identities.items()},
                "unauthenticated_roles": list(self.roles_of(UNAUTHENTICATED)),
                "model_signers": list(self.doc.get("model_signers", [])),
                "promotion": self.promotion, "model_promotion": dict(self.doc.get("model_promotion") or {})}

    # -- building --------------------------------------------------------------------------
    @staticmethod
    def new_document(owners: Sequence[Key], *, threshold: int, roles_config: Mapping[str, Any],
                     release_config: Mapping[str, Any], unauthenticated_roles: Iterable[str] = (),
                     model_promotion: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Version 1 from the shipped roles and release configuration; no identities yet.
        ``model_promotion``: each model's promotion overrides (ModelSpec.promotion_overrides)."""
        if not owners:
            raise BadInput("a trust policy needs at least one owner key")
        if not 1 <= threshold <= len(owners):
            raise BadInput(f"the owner threshold must be between 1 and {len(owners)}, not {threshold}")
        roles = {str(k): dict(v) for k, v in (roles_config.get("roles") or {}).items()}
        roles.setdefault(PIPELINE_ROLE, {"may": ["pipeline.attest"], "clearance": "restricted"})
        unauth = list(unauthenticated_roles)
        unknown = [r for r in unauth if r not in roles]
        if unknown:
            raise BadInput(f"unknown roles for unauthenticated runs: {', '.join(unknown)}")
        return {
            "_type": POLICY_TYPE, "version": 1, "issued": _now(),
            "owners": {"keyids": [k.keyid for k in owners], "threshold": threshold},
            "keys": {k.keyid: k.to_dict() for k in owners},
            "identities": {}, "roles": roles,
            "classifications": list(roles_config.get("classifications") or []),
            "unauthenticated": {"roles": unauth},
            "promotion": dict(release_config.get("promotion") or {}),
            "model_promotion": {str(k): dict(v) for k, v in (model_promotion or {}).items() if v},
            "admission": {k: v for k, v in dict(release_config.get("admission") or {}).items()
                          if k != "signed_model_digests"},
            "model_signers": [],
        }


def add_identity(doc: dict[str, Any], name: str, *, roles: Sequence[str] = (), key: Key | None = None,
                 aliases: Sequence[str] = (), oidc: tuple[str, str] | None = None, model_signer: bool = False) -> None:
    """Add or extend ``name`` in a policy document (the caller re-signs it)."""
    unknown = [r for r in roles if r not in doc["roles"]]
    if unknown:
        raise BadInput(f"unknown role {', '.join(unknown)} (known: {', '.join(sorted(doc['roles']))})")
    spec = doc["identities"].setdefault(name, {"keys": [], "oidc": [], "aliases": [], "roles": []})
    if key is not None:
        holder = next((n for n, s in doc["identities"].items() if key.keyid in s["keys"] and n != name), None)
        if holder:
            raise BadInput(f"that key already belongs to {holder}: one key is one person")
        doc["keys"][key.keyid] = key.to_dict()
        if key.keyid not in spec["keys"]:
            spec["keys"].append(key.keyid)
        if model_signer and key.keyid not in doc["model_signers"]:
            doc["model_signers"].append(key.keyid)
    for alias in aliases:
        taken = next((n for n, s in doc["identities"].items()
                      if n != name and (alias.lower() == n.lower() or alias.lower() in map(str.lower, s["aliases"]))),
                     None)
        if taken:
            raise BadInput(f"alias {alias!r} already belongs to {taken}")
        if alias not in spec["aliases"]:
            spec["aliases"].append(alias)
    if oidc is not None and {"issuer": oidc[0], "subject": oidc[1]} not in spec["oidc"]:
        spec["oidc"].append({"issuer": oidc[0], "subject": oidc[1]})
    for role in roles:
        if role not in spec["roles"]:
            spec["roles"].append(role)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class TrustStore:
    """``policy.json`` (the signed envelope), ``root.json`` (the pin) and ``history/`` in one folder."""

    def __init__(self, directory: Path, *, root_path: Path | None = None) -> None:
        self.directory = Path(directory)
        self.policy_path = self.directory / "policy.json"
        self.root_path = root_path or self.directory / "root.json"

    @classmethod
    def from_home(cls, home: Path, environ: Mapping[str, str] | None = None) -> TrustStore:
        pinned = (environ or {}).get(ROOT_ENV)
        return cls(Path(home) / "trust", root_path=Path(pinned) if pinned else None)

    def exists(self) -> bool:
        return self.policy_path.exists()

    # -- the pin ---------------------------------------------------------------------------
    def _pin(self) -> dict[str, Any] | None:
        try:
            pin = json.loads(self.root_path.read_bytes())
            if not isinstance(pin, dict) or not isinstance(pin.get("version"), int) or not pin.get("owners"):
                raise ValueError
            return pin
        except FileNotFoundError:
            return None
        except ValueError:
            raise VerificationError(f"the trust pin {self.root_path} is garbled") from None

    def _write_pin(self, policy: TrustPolicy) -> None:
        pin = {"version": policy.version, "digest": policy.digest,
               "owners": {"keys": {k.keyid: k.to_dict() for k in policy.owner_keys()},
                          "threshold": policy.owner_threshold}}
        atomic_write_bytes(self.root_path, json.dumps(pin, indent=1, sort_keys=True).encode() + b"\n", mode=0o644)

    # -- reading ---------------------------------------------------------------------------
    def load(self, data: bytes | None = None, *, advance: bool = True) -> TrustPolicy:
        """The verified policy (``data``: a candidate envelope instead of ``policy.json``).

        A newer version than the pin advances the pin (``advance=False``: verify only)."""
        if data is None:
            try:
                data = self.policy_path.read_bytes()
            except FileNotFoundError:
                raise ConfigurationError(f"no trust policy at {self.policy_path}: run `secure-ml trust init "
                                         "--owner-key FILE`") from None
        pin = self._pin()
        if pin is None:
            raise VerificationError(f"the trust policy has no pin ({self.root_path} is missing): "
                                    "it cannot be told from a swapped one")
        pinned_keys = [_key_from_dict(k, v) for k, v in pin["owners"]["keys"].items()]
        # The pinned owners must sign any policy we accept: a self-signed replacement is a swap.
        verified = verify_envelope(data, pinned_keys, threshold=int(pin["owners"]["threshold"]),
                                   payload_type=PAYLOAD_TYPE, what="trust policy")
        doc = verified.json()
        if not isinstance(doc, dict) or doc.get("_type") != POLICY_TYPE or not isinstance(doc.get("version"), int):
            raise VerificationError("the trust policy payload is not a secure-ml trust policy v1")
        policy = TrustPolicy(doc, digest=hashlib.sha256(verified.payload).hexdigest())
        try:
            # A rotated owner set must also meet its own threshold (TUF: old and new roots both sign).
            verify_envelope(data, policy.owner_keys(), threshold=policy.owner_threshold,
                            payload_type=PAYLOAD_TYPE, what="trust policy")
        except (KeyError, TypeError, ValueError):
            raise VerificationError("the trust policy's owners section is malformed") from None
        if policy.version < pin["version"]:
            raise VerificationError(f"trust policy version {policy.version} is older than version {pin['version']} "
                                    "already seen: a rollback is refused")
        if policy.version == pin["version"] and policy.digest != pin.get("digest"):
            raise VerificationError(f"trust policy version {policy.version} differs from the one already seen "
                                    "with that version: it was swapped")
        if advance and policy.version > pin["version"]:
            self._write_pin(policy)
        return policy

    # -- writing ---------------------------------------------------------------------------
    def init(self, doc: dict[str, Any], signers: Sequence[Signer]) -> TrustPolicy:
        if self.policy_path.exists() or self.root_path.exists():
            raise BadInput(f"a trust policy already exists in {self.directory}: change it with `secure-ml trust add`")
        payload = canonical_json(doc)
        envelope = sign_envelope(payload, PAYLOAD_TYPE, signers)
        policy = TrustPolicy(doc, digest=hashlib.sha256(payload).hexdigest())
        verify_envelope(envelope, policy.owner_keys(), threshold=policy.owner_threshold, payload_type=PAYLOAD_TYPE,
                        what="trust policy")
        self.directory.mkdir(parents=True, exist_ok=True)
        # The first owners are trusted on first use, once; from then on the pin decides.
        self._write_pin(policy)
        self._publish(envelope, policy.version)
        return policy

    def update(self, change: Callable[[dict[str, Any]], None], signers: Sequence[Signer]) -> TrustPolicy:
        """Apply ``change`` to a copy of the current policy, bump the version, sign, verify, publish."""
        current = self.load()
        doc = copy.deepcopy(dict(current.doc))
        change(doc)
        doc["version"] = current.version + 1
        doc["issued"] = _now()
        envelope = sign_envelope(canonical_json(doc), PAYLOAD_TYPE, signers)
        # Refuses signers that are not the owners, before anything is written.
        policy = self.load(envelope, advance=False)
        self._publish(envelope, policy.version)
        self._write_pin(policy)
        return policy

    def _publish(self, envelope: bytes, version: int) -> None:
        history = self.directory / "history"
        history.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(history / f"{version}.policy.json", envelope, mode=0o644)
        atomic_write_bytes(self.policy_path, envelope, mode=0o644)
