"""OIDC identities: a token is believed only after its issuer's published keys verify it.

    claims = verify_token(token, issuer="https://token.actions.githubusercontent.com", audience="secure-ml")
    claims["sub"]   # e.g. "repo:org/secure-ml:ref:refs/heads/main"; the trust policy maps issuer+subject to a name

The issuer's ``/.well-known/openid-configuration`` names its JWKS; the token's ``kid`` picks the key
(PyJWT's ``PyJWKClient``). Signature, issuer, audience, expiry, not-before and issued-at are all
checked; a token issued in the future (beyond ``leeway`` seconds) is refused. Every refusal is one
:class:`~secure_ml.errors.VerificationError` line that never contains the token.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from secure_ml.errors import BadInput, VerificationError

ALGORITHMS = ("RS256", "ES256", "EdDSA")
DEFAULT_AUDIENCE = "secure-ml"

__all__ = ["verify_token", "discover_jwks_uri", "DEFAULT_AUDIENCE"]


def _get_json(url: str, *, timeout: float) -> Any:
    if not url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
        raise BadInput(f"OIDC endpoints must be https (or a local test issuer): {url}")
    try:
        # The scheme is checked above: https, or a loopback test issuer.
        with urllib.request.urlopen(url, timeout=timeout) as response:  # nosec B310
            return json.loads(response.read(1 << 20))
    except (OSError, ValueError) as exc:
        raise VerificationError(f"cannot read the OIDC issuer's metadata at {url} ({type(exc).__name__})") from None


def discover_jwks_uri(issuer: str, *, timeout: float = 10.0) -> str:
    config = _get_json(issuer.rstrip("/") + "/.well-known/openid-configuration", timeout=timeout)
    if not isinstance(config, dict) or config.get("issuer") != issuer or not config.get("jwks_uri"):
        raise VerificationError(f"the OIDC configuration of {issuer} does not name this issuer and a jwks_uri")
    return str(config["jwks_uri"])


def verify_token(token: str, *, issuer: str, audience: str = DEFAULT_AUDIENCE, leeway: int = 30,
                 timeout: float = 10.0) -> dict[str, Any]:
    """The verified claims of ``token``; VerificationError for a forged, expired or misdirected one."""
    import jwt

    if not token or token.count(".") != 2:
        raise VerificationError("the OIDC token is not a JWT (truncated or garbled)")
    try:
        jwks = jwt.PyJWKClient(discover_jwks_uri(issuer, timeout=timeout), timeout=int(timeout), cache_keys=True)
        signing_key = jwks.get_signing_key_from_jwt(token)
        claims: dict[str, Any] = jwt.decode(
            token, signing_key.key, algorithms=list(ALGORITHMS), audience=audience, issuer=issuer, leeway=leeway,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]})
    except jwt.ExpiredSignatureError:
        raise VerificationError("the OIDC token has expired") from None
    except jwt.ImmatureSignatureError:
        raise VerificationError("the OIDC token is dated in the future (not yet valid)") from None
    except jwt.InvalidAudienceError:
        raise VerificationError(f"the OIDC token is not meant for this audience ({audience})") from None
    except jwt.InvalidIssuerError:
        raise VerificationError(f"the OIDC token was not issued by {issuer}") from None
    except jwt.MissingRequiredClaimError as exc:
        raise VerificationError(f"the OIDC token lacks the {exc.claim!r} claim") from None
    except jwt.PyJWKClientError as exc:
        raise VerificationError(f"the OIDC token's key is not among {issuer}'s published keys ({exc})") from None
    except jwt.InvalidSignatureError:
        raise VerificationError("the OIDC token's signature does not verify: it was forged or altered") from None
    except jwt.InvalidTokenError as exc:
        raise VerificationError(f"the OIDC token is invalid ({type(exc).__name__})") from None
    # PyJWT checks iat only for type; a token minted in the future is a clock attack or a forgery.
    if float(claims["iat"]) > time.time() + leeway:
        raise VerificationError("the OIDC token is dated in the future (issued-at after now)")
    return claims
