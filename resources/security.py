"""The signing resource: the one holder of the model-signing key.

Assets ask it to sign a stored model (its custody digests) or an attestation and get bundle bytes back; the private
key's path stays inside (it is never returned, logged or put in metadata), and the key itself is
created lazily (ECDSA P-256, 0600, under ``$SECURE_ML_HOME/keys``) the first time it is needed.
Verification needs no secret: it uses the trust policy from ``security.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pydantic

from secure_ml.errors import ConfigurationError
from secure_ml.security import attestation, signing
from secure_ml.settings import Settings


class SigningResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Signs model directories and provenance with the configured method (local key or Sigstore)."""

    home: str
    config_dir: str = ""
    _key_path: Path | None = pydantic.PrivateAttr(default=None)

    def __repr__(self) -> str:
        return "SigningResource(<key held>)"

    def _settings(self) -> Settings:
        from secure_ml.custody.keys import process_environment

        environ = process_environment()  # with SECURE_ML_KEK, which no longer is in os.environ
        environ["SECURE_ML_HOME"] = self.home
        if self.config_dir:
            environ["SECURE_ML_CONFIG"] = self.config_dir
        return Settings.from_env(environ)

    def config(self) -> dict[str, Any]:
        return self._settings().load_config("security")

    def method(self) -> str:
        """``key`` or ``sigstore``; ``auto`` picks Sigstore when an OIDC identity is available."""
        method = str(self.config().get("signing", {}).get("method", "key"))
        if method not in ("key", "sigstore", "auto"):
            raise ConfigurationError(f"signing.method must be 'key', 'sigstore' or 'auto', not {method!r}")
        if method == "auto":
            return "sigstore" if signing.oidc_token() else "key"
        return method

    def _private_key(self) -> Path:
        if self._key_path is None:
            configured = self.config().get("signing", {}).get("private_key", "keys/model-signing.pem")
            path = Path(configured)
            path = path if path.is_absolute() else Path(self.home) / path
            signing.ensure_signing_key(path)
            self._key_path = path
        return self._key_path

    def public_key_pem(self) -> bytes:
        """The local signing key's public half (safe to publish)."""
        return signing.public_key_path(self._private_key()).read_bytes()

    def trust(self) -> signing.TrustPolicy:
        if self.method() == "key" or not self.config().get("signing", {}).get("trusted_identities"):
            self._private_key()  # the trusted local public key exists before anyone verifies with it
        return signing.TrustPolicy.from_config(self.config(), Path(self.home))

    def sign_files(self, files: dict[str, str], signature_path: Path) -> bytes:
        """Sign a stored model from its custody digests (``{relative path: sha256}``)."""
        if self.method() == "sigstore":
            return signing.sign_files_keyless(files, signature_path)
        return signing.sign_files(files, signature_path, private_key=self._private_key())

    def sign_statement(self, statement: dict[str, Any]) -> bytes:
        return attestation.sign_envelope(statement, private_key=self._private_key())


def resources_for(settings: Settings, built: dict[str, Any]) -> dict[str, Any]:
    config_dir = settings.environ.get("SECURE_ML_CONFIG", "")
    return {"signing": SigningResource(home=str(settings.home), config_dir=config_dir)}
