"""Who is acting, proven: the verified trust policy and the key (or OIDC token) behind a command.

    policy = verified_policy(settings)                          # refused (and audited) if unsigned, swapped, old
    actor = authenticate(settings, policy, identity_file=None)  # Actor("carol", keyid, identity) or unauthenticated
    require(settings, policy, actor, "model.approve")            # PolicyDenied (audited) unless the role allows it
    check_config(settings, policy)                               # a config dir that changes the gates is refused

``SECURE_ML_IDENTITY=FILE`` (or ``--identity FILE``) names the private key; the trust policy says
whose it is. ``SECURE_ML_OIDC_TOKEN`` (with ``SECURE_ML_OIDC_ISSUER``) is a CI identity: verified
against the issuer's published keys and mapped by issuer and subject; a pipeline run launched so
carries the token's SHA-256 (``RUN_OIDC_TAG``) and its steps act as that identity only while their
process holds the same, verified token. Names typed anywhere else
(``SECURE_ML_ACTOR``, ``GITHUB_ACTOR``, run tags) grant nothing: without a key or token the actor
is ``unauthenticated`` and holds only the roles the trust policy gives unauthenticated runs.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_ml.custody.dsse import Signer, canonical_json, load_signer, sign_envelope, verify_envelope
from secure_ml.errors import ConfigurationError, Error, PolicyDenied, VerificationError
from secure_ml.governance.access import AccessPolicy, Decision
from secure_ml.governance.identity import Identity, acting_identity
from secure_ml.governance.trust import UNAUTHENTICATED, TrustPolicy, TrustStore
from secure_ml.settings import Settings

PIPELINE_KEY = Path("keys") / "model-signing.pem"
RUN_REQUEST_TAG = "secure_ml/run_request"
RUN_OIDC_TAG = "secure_ml/run_oidc"
RUN_REQUEST_TYPE = "application/vnd.secure-ml.run-request+json"
RUN_REQUEST_TTL_S = 3600
OIDC_TOKEN_ENV = "SECURE_ML_OIDC_TOKEN"
OIDC_ISSUER_ENV = "SECURE_ML_OIDC_ISSUER"

__all__ = ["Actor", "has_trust_policy", "verified_policy", "authenticate", "require", "check_config", "pipeline_signer", "trust_store",
           "sign_run_request", "run_actor", "RUN_REQUEST_TAG", "RUN_OIDC_TAG", "oidc_actor", "oidc_run_request"]


@dataclass(frozen=True)
class Actor:
    """An authenticated name (from the trust policy), how it was proven, and its signer if any."""

    name: str
    method: str                     # key | oidc | none
    keyid: str = ""
    identity: Identity | None = None

    @property
    def authenticated(self) -> bool:
        return self.method != "none"

    @property
    def signer(self) -> Signer:
        if self.identity is None:
            raise PolicyDenied(f"{self.name} has no signing key: set SECURE_ML_IDENTITY to your identity key file")
        return self.identity.signer  # type: ignore[return-value]


def trust_store(settings: Settings) -> TrustStore:
    return TrustStore.from_home(settings.home, settings.environ)


def has_trust_policy(settings: Settings) -> bool:
    """Whether decisions are signed here: a trust policy exists, or one is pinned from elsewhere."""
    return trust_store(settings).exists() or bool(settings.environ.get("SECURE_ML_TRUST_ROOT"))


def verified_policy(settings: Settings, *, audit: bool = True) -> TrustPolicy:
    """The trust policy, verified; a refusal is audited (``trust.verify`` deny) and raised."""
    try:
        return trust_store(settings).load()
    except Error as exc:
        if audit and isinstance(exc, VerificationError):
            settings.audit_log().record(claimed(settings), "trust.verify", outcome="deny",
                                        details={"reason": exc.explain()})
        raise


def claimed(settings: Settings) -> str:
    """The name a run claims, for the audit log only (never for a decision)."""
    return f"unauthenticated:{settings.actor()}"


def authenticate(settings: Settings, policy: TrustPolicy, *, identity_file: Path | None = None) -> Actor:
    """The actor proven by a key or OIDC token; ``unauthenticated`` when neither is given."""
    identity = acting_identity(settings.environ, explicit=identity_file, home=settings.home)
    if identity is not None:
        name = policy.name_of_key(identity.keyid)
        if name is None:
            settings.audit_log().record(claimed(settings), "identity.deny", outcome="deny",
                                        details={"keyid": identity.keyid, "reason": "key not in the trust policy"})
            raise PolicyDenied(f"the key {identity.path} ({identity.keyid[:16]}…) belongs to nobody in the trust "
                               f"policy (version {policy.version}): ask its owner to `secure-ml trust add` it")
        return Actor(name, "key", identity.keyid, identity)
    if settings.environ.get(OIDC_TOKEN_ENV):
        return oidc_actor(settings, policy)[0]
    return Actor(UNAUTHENTICATED, "none")


# Tokens verified in this process (sha256 of the token -> issuer, subject): a pipeline run verifies its
# CI token when it starts and its steps may outlive the token's few minutes; a fresh process verifies again.
_VERIFIED_OIDC: dict[str, tuple[str, str]] = {}


def oidc_actor(settings: Settings, policy: TrustPolicy) -> tuple[Actor, str, str]:
    """(actor, issuer, subject) proven by ``SECURE_ML_OIDC_TOKEN``; refused (audited) otherwise."""
    token = settings.environ.get(OIDC_TOKEN_ENV) or ""
    issuer = settings.environ.get(OIDC_ISSUER_ENV) or ""
    if not token:
        raise PolicyDenied(f"no OIDC token ({OIDC_TOKEN_ENV}) in this process")
    if not issuer:
        raise ConfigurationError(f"{OIDC_TOKEN_ENV} needs {OIDC_ISSUER_ENV} (the issuer to verify it against)")
    digest = hashlib.sha256(token.encode()).hexdigest()
    try:
        seen = _VERIFIED_OIDC.get(digest)
        if seen is None or seen[0] != issuer:
            from secure_ml.governance.oidc import verify_token

            seen = (issuer, str(verify_token(token, issuer=issuer)["sub"]))
            _VERIFIED_OIDC[digest] = seen
        name = policy.name_of_oidc(issuer, seen[1])  # mapped by the policy in force now, every time
        if name is None:
            raise PolicyDenied(f"the OIDC subject {seen[1]} of {issuer} is nobody in the trust policy")
    except (VerificationError, PolicyDenied) as exc:
        settings.audit_log().record(claimed(settings), "identity.deny", outcome="deny",
                                    details={"issuer": issuer, "reason": exc.explain()})
        raise
    return Actor(name, "oidc"), issuer, seen[1]


def oidc_run_request(settings: Settings, policy: TrustPolicy) -> str:
    """The run tag of a run launched under an OIDC identity: who, and the SHA-256 of the token (never the token).

    The run's steps believe it only while their own process holds that very token and it verified."""
    actor, issuer, subject = oidc_actor(settings, policy)
    token = settings.environ.get(OIDC_TOKEN_ENV) or ""
    return json.dumps({"actor": actor.name, "issuer": issuer, "subject": subject,
                       "token_sha256": hashlib.sha256(token.encode()).hexdigest()}, sort_keys=True)


def require(settings: Settings, policy: TrustPolicy, actor: Actor, permission: str, *,
            subject: str = "") -> Decision:
    """The role check against the signed policy, audited; PolicyDenied on a denial."""
    access = AccessPolicy(policy.access_config())
    decision = access.decide(actor.name, permission)
    settings.audit_log().record(actor.name if actor.authenticated else claimed(settings),
                                "access.allow" if decision.allowed else "access.deny", subject=subject,
                                outcome="allow" if decision.allowed else "deny",
                                details={"permission": permission, "authenticated": actor.authenticated,
                                         "method": actor.method, "roles": list(decision.roles),
                                         "reason": decision.reason, "trust_version": policy.version})
    if not decision.allowed:
        hint = "" if actor.authenticated else " (no identity key: set SECURE_ML_IDENTITY)"
        raise PolicyDenied(decision.reason + hint)
    return decision


def check_config(settings: Settings, policy: TrustPolicy) -> None:
    """Refuse configuration whose gate data differs from the signed policy's (a swapped config dir)."""
    release = settings.load_config("release")  # the acting model's view (its spec's promotion overrides)
    roles = settings.load_config("roles")
    signed = policy.promotion_for(settings.model_name)
    diffs = [f"promotion.{k}" for k in sorted(set(signed) | set(release.get("promotion") or {}))
             if signed.get(k) != (release.get("promotion") or {}).get(k)]
    signed_roles: Mapping[str, Any] = policy.doc.get("roles") or {}
    diffs += [f"roles.{k}" for k in sorted(roles.get("roles") or {})
              if dict(signed_roles.get(k) or {}) != dict((roles.get("roles") or {})[k] or {})]
    if diffs:
        settings.audit_log().record(claimed(settings), "trust.config", outcome="deny",
                                    details={"config_dir": str(settings.config_dir), "differs": diffs})
        raise PolicyDenied(f"the configuration in {settings.config_dir} changes what the gates decide "
                           f"({', '.join(diffs[:3])}), which only the signed trust policy may: refused")


def pipeline_signer(settings: Settings) -> Signer | None:
    """The pipeline's own signing key (local runs; CI signs keyless), or None if it has none yet. On
    Kubernetes only the signing steps' pods have it, mounted where ``SECURE_ML_SIGNING_KEY`` says."""
    mounted = settings.environ.get("SECURE_ML_SIGNING_KEY")
    path = Path(mounted) if mounted else settings.home / PIPELINE_KEY
    return load_signer(path) if path.exists() else None


def sign_run_request(actor: Actor) -> str:
    """A run tag proving who launched a pipeline run: a DSSE envelope signed by their identity key."""
    body = {"purpose": "pipeline.run", "actor": actor.name, "time": time.time(), "nonce": secrets.token_hex(8)}
    return json.dumps(json.loads(sign_envelope(canonical_json(body), RUN_REQUEST_TYPE, [actor.signer])),
                      separators=(",", ":"), sort_keys=True)


def run_actor(settings: Settings, tags: Mapping[str, str] | None) -> str:
    """Who a pipeline run acts as: the verified signer of its run request, else ``unauthenticated``.

    Before a trust policy exists (local development, ``trust init`` not run), the claimed name is
    used as before; once it exists, a name in a tag or the environment counts for nothing.
    """
    store = trust_store(settings)
    if not store.exists() and not settings.environ.get("SECURE_ML_TRUST_ROOT"):
        return settings.actor(tags)
    policy = verified_policy(settings)
    request = (tags or {}).get(RUN_REQUEST_TAG)
    if not request and (tags or {}).get(RUN_OIDC_TAG):
        return _oidc_run_actor(settings, policy, str((tags or {})[RUN_OIDC_TAG]))
    if not request:
        return UNAUTHENTICATED
    keys = [key for name in policy.identities for key in policy.keys_of(name)]
    verified = verify_envelope(request, keys, threshold=1, payload_type=RUN_REQUEST_TYPE, what="run request")
    body = verified.json()
    age = time.time() - float(body.get("time", 0)) if isinstance(body, dict) else RUN_REQUEST_TTL_S + 1
    if not 0 - 60 <= age <= RUN_REQUEST_TTL_S:
        raise VerificationError("the run request is stale or dated in the future: launch the run again")
    return str(policy.name_of_key(verified.keyids[0]))


def _oidc_run_actor(settings: Settings, policy: TrustPolicy, tag: str) -> str:
    """A run launched under an OIDC identity acts as it only where the token itself is at hand and verifies."""
    try:
        claim = json.loads(tag)
        wanted = str(claim["token_sha256"])
    except (ValueError, KeyError, TypeError):
        raise VerificationError("the run's OIDC tag is garbled: launch the run again") from None
    token = settings.environ.get(OIDC_TOKEN_ENV) or ""
    if not token or hashlib.sha256(token.encode()).hexdigest() != wanted:
        reason = (f"the run claims the OIDC identity {str(claim.get('actor'))[:64]}, but this process "
                  "holds no matching token")
        settings.audit_log().record(claimed(settings), "identity.deny", outcome="deny", details={"reason": reason})
        raise VerificationError(reason)
    return oidc_actor(settings, policy)[0].name
