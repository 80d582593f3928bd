"""Roles and clearances: who may do what, and which data classifications they may read.

    policy = AccessPolicy.from_settings(settings)               # the signed trust policy (or config/roles.yaml)
    policy.require("alice", "data.read", classification="confidential", audit=log, subject="sha256:…")
    decision = policy.decide("bob", "model.approve")            # Decision(allowed=False, reason=...)

Every ``require`` is audited (``access.allow`` / ``access.deny``) when an audit log is given, and a
denial raises :class:`~secure_ml.errors.PolicyDenied` with the reason in one line. Separation of
duties is not a role question: the promotion policy enforces it on top of these roles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from secure_ml.errors import ConfigurationError, PolicyDenied

DEFAULT_CLASSIFICATIONS = ("public", "internal", "confidential", "restricted")


class _Audit(Protocol):
    def record(self, actor: str, action: str, *, subject: str = "", outcome: str = "ok",
               details: dict[str, Any] | None = None) -> dict[str, Any]: ...


class _HasConfig(Protocol):
    def load_config(self, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Decision:
    allowed: bool
    identity: str
    permission: str
    roles: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Role:
    may: frozenset[str]
    clearance: str


def _names(value: Any) -> tuple[str, ...]:
    """Role names from YAML: a list, or one name written without brackets (``alice: data_steward``)."""
    if isinstance(value, str):
        return (value,)
    return tuple(map(str, value or []))


class AccessPolicy:
    """Identities, their roles, and what each role may do and read."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        try:
            self.classifications = tuple(config.get("classifications") or DEFAULT_CLASSIFICATIONS)
            self.roles = {
                str(name): Role(frozenset(map(str, spec.get("may") or [])),
                                str(spec.get("clearance", self.classifications[0])))
                for name, spec in (config.get("roles") or {}).items()
            }
            self.identities = {str(k): _names(v) for k, v in (config.get("identities") or {}).items()}
            self.default_roles = _names(config.get("default_roles"))
        except (AttributeError, TypeError) as exc:
            raise ConfigurationError(f"roles configuration is malformed ({exc})") from None
        for name, role in self.roles.items():
            if role.clearance not in self.classifications:
                raise ConfigurationError(f"role {name!r} has unknown clearance {role.clearance!r}")
        for identity, roles in {**self.identities, "(default)": self.default_roles}.items():
            unknown = [r for r in roles if r not in self.roles]
            if unknown:
                raise ConfigurationError(f"identity {identity!r} names unknown roles: {', '.join(unknown)}")

    @classmethod
    def from_settings(cls, settings: _HasConfig) -> AccessPolicy:
        """The signed trust policy's roles once it exists; before that, the shipped roles.yaml."""
        home, environ = getattr(settings, "home", None), getattr(settings, "environ", {})
        if home is not None:
            from secure_ml.governance.trust import ROOT_ENV, TrustStore

            store = TrustStore.from_home(home, environ)
            if store.exists() or environ.get(ROOT_ENV):
                return cls(store.load().access_config())
        return cls(settings.load_config("roles"))

    def roles_of(self, identity: str) -> tuple[str, ...]:
        return self.identities.get(identity, self.default_roles)

    def is_listed(self, identity: str) -> bool:
        return identity in self.identities

    def rank(self, classification: str) -> int:
        try:
            return self.classifications.index(classification)
        except ValueError:
            raise ConfigurationError(
                f"unknown data classification {classification!r} (known: {', '.join(self.classifications)})"
            ) from None

    def decide(self, identity: str, permission: str, *, classification: str | None = None) -> Decision:
        roles = self.roles_of(identity)
        granting = [r for r in roles if permission in self.roles[r].may]
        if not granting:
            held = ", ".join(roles) or "no roles"
            return Decision(False, identity, permission, roles,
                            f"{identity} ({held}) may not {permission}")
        if classification is not None:
            needed = self.rank(classification)
            cleared = [r for r in granting if self.rank(self.roles[r].clearance) >= needed]
            if not cleared:
                best = max((self.roles[r].clearance for r in granting), key=self.rank)
                return Decision(False, identity, permission, roles,
                                f"{identity} is cleared for {best} data, not {classification}")
        what = f"{permission} ({classification})" if classification else permission
        return Decision(True, identity, permission, roles, f"{identity} may {what} as {granting[0]}")

    def require(self, identity: str, permission: str, *, classification: str | None = None,
                audit: _Audit | None = None, subject: str = "") -> Decision:
        """Decide, audit the decision, and raise PolicyDenied on a denial."""
        decision = self.decide(identity, permission, classification=classification)
        if audit is not None:
            audit.record(identity, "access.allow" if decision.allowed else "access.deny", subject=subject,
                         outcome="allow" if decision.allowed else "deny",
                         details={"permission": permission, "classification": classification,
                                  "roles": list(decision.roles), "reason": decision.reason})
        if not decision.allowed:
            raise PolicyDenied(decision.reason)
        return decision
