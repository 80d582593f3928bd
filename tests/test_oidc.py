"""OIDC tokens verified against a real local issuer (secure_ml.governance.oidc).

Touches: a real HTTP server on 127.0.0.1 serving /.well-known/openid-configuration and a JWKS,
real RSA keys and real JWTs signed by that issuer (PyJWT), verified through the same discovery and
key fetch a CI token takes. Does not touch: a public issuer or Sigstore's Fulcio (no network).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from secure_ml.errors import VerificationError
from secure_ml.settings import Settings
from secure_ml.governance.oidc import verify_token


class Issuer:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "k1"
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/.well-known/openid-configuration":
                    body: Any = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer.key.public_key()))
                    body = {"keys": [{**jwk, "kid": issuer.kid, "use": "sig", "alg": "RS256"}]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def token(self, key: Any = None, kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": "secure-ml", "sub": "repo:org/secure-ml:ref:refs/heads/main",
                "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, key or self.key, algorithm="RS256", headers={"kid": kid or self.kid})


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    server = Issuer()
    yield server
    server.server.shutdown()


def test_a_token_from_the_issuer_verifies(issuer: Issuer) -> None:
    claims = verify_token(issuer.token(), issuer=issuer.url)
    assert claims["sub"] == "repo:org/secure-ml:ref:refs/heads/main"


@pytest.mark.parametrize(("claims", "message"), [
    ({"exp": int(time.time()) - 3600}, "has expired"),
    ({"iat": int(time.time()) + 3600, "exp": int(time.time()) + 7200}, "dated in the future"),
    ({"nbf": int(time.time()) + 3600}, "dated in the future"),
    ({"aud": "someone-else"}, "not meant for this audience"),
    ({"iss": "https://evil.example"}, "not issued by"),
])
def test_bad_tokens_are_refused(issuer: Issuer, claims: dict[str, Any], message: str) -> None:
    with pytest.raises(VerificationError, match=message):
        verify_token(issuer.token(**claims), issuer=issuer.url)


def test_forged_and_garbled_tokens_are_refused(issuer: Issuer) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(VerificationError, match="forged or altered"):
        verify_token(issuer.token(key=other), issuer=issuer.url)
    with pytest.raises(VerificationError, match="not among"):
        verify_token(issuer.token(kid="unknown"), issuer=issuer.url)
    token = issuer.token()
    with pytest.raises(VerificationError, match="not a JWT"):
        verify_token(token[: token.index(".")], issuer=issuer.url)
    with pytest.raises(VerificationError) as caught:
        verify_token(token[:-8] + "AAAAAAAA", issuer=issuer.url)
    assert token not in str(caught.value)


def test_a_ci_identity_maps_to_a_name_and_a_bad_token_is_audited(issuer: Issuer, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from secure_ml.governance import authn
    from secure_ml.governance.identity import load_identity, new_identity
    from secure_ml.governance.trust import TrustPolicy, add_identity

    owner = load_identity(new_identity("owner", tmp_path / "owner")[0])
    doc = TrustPolicy.new_document([owner.key], threshold=1, roles_config=settings.load_config("roles"),
                                   release_config=settings.load_config("release"))
    add_identity(doc, "ci", roles=["ml_engineer"], oidc=(issuer.url, "repo:org/secure-ml:ref:refs/heads/main"))
    authn.trust_store(settings).init(doc, [owner.signer])
    policy = authn.verified_policy(settings)
    ci = Settings.from_env({**settings.environ, "SECURE_ML_OIDC_TOKEN": issuer.token(),
                            "SECURE_ML_OIDC_ISSUER": issuer.url})
    assert authn.authenticate(ci, policy).name == "ci"
    expired = Settings.from_env({**ci.environ, "SECURE_ML_OIDC_TOKEN": issuer.token(exp=int(time.time()) - 600)})
    with pytest.raises(VerificationError, match="expired"):
        authn.authenticate(expired, policy)
    denied = [e for e in settings.audit_log().entries() if e["action"] == "identity.deny"]
    assert denied and "expired" in denied[-1]["details"]["reason"]
    assert issuer.token() not in settings.audit_path.read_text()
