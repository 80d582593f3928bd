"""The signing resource: the one holder of the model-signing key.

Assets ask it to sign a stored model (its custody digests) or an attestation and get bundle bytes back; the private
key's path stays inside (it is never returned, logged or put in metadata), and the key itself is
created lazily (ECDSA P-256, 0600, under ``$SECURE_ML_HOME/keys``) the first time it is needed, except
in production: there it is the ``secure-ml-signing-key`` Secret, mounted as a file only in the pods of
:data:`SIGNING_STEPS` (their ``dagster-k8s/config`` op tag, :func:`signing_op_tags`), and never created.
Verification needs no secret: it uses the trust policy from ``security.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic

from secure_ml.errors import ConfigurationError
from secure_ml.security import attestation, signing
from secure_ml.settings import Settings


SIGNING_KEY_ENV = "SECURE_ML_SIGNING_KEY"           # a mounted key file: only the signing steps' pods have it
SIGNING_KEY_SECRET = "secure-ml-signing-key"        # the Kubernetes Secret holding model-signing.pem
SIGNING_KEY_DIR = "/var/run/secrets/secure-ml-signing"
# The steps that sign with the pipeline key: the model's signature, the run's provenance attestation, and
# registration (the pipeline's signed statements about its products, secure_ml.release.signed.sign_products).
SIGNING_STEPS = ("model_signature", "attestation", "registered_model")


def signing_step_k8s_config() -> dict[str, Any]:
    """The ``dagster-k8s/config`` op tag of a signing step: its pod alone mounts the signing-key Secret
    (as a file, never an environment variable) and is told where it is."""
    return {
        "pod_spec_config": {"volumes": [{"name": "signing-key", "secret": {
            "secretName": SIGNING_KEY_SECRET, "defaultMode": 0o440,
            "items": [{"key": "model-signing.pem", "path": "model-signing.pem"}]}}]},
        "container_config": {
            "volumeMounts": [{"name": "signing-key", "mountPath": SIGNING_KEY_DIR, "readOnly": True}],
            "env": [{"name": SIGNING_KEY_ENV, "value": f"{SIGNING_KEY_DIR}/model-signing.pem"}]},
    }


def signing_op_tags() -> dict[str, str]:
    return {"dagster-k8s/config": json.dumps(signing_step_k8s_config(), sort_keys=True)}


class SigningResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Signs model directories and provenance with the configured method (local key or Sigstore)."""

    home: str
    config_dir: str = ""
    _key_path: Path | None = pydantic.PrivateAttr(default=None)

    def __repr__(self) -> str:
        return "SigningResource(<key held>)"

    def _settings(self) -> Settings:
        return Settings.from_env(home=self.home, config_dir=self.config_dir)

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
            settings = self._settings()
            mounted = settings.environ.get(SIGNING_KEY_ENV)
            if mounted:  # the signing step's pod: the key is the mounted Secret, never one made here
                self._key_path = signing.mounted_signing_key(mounted, signing.public_key_path(path))
                return self._key_path
            if settings.env == "production":
                # A key created here would sit on the shared artifacts volume, in reach of every step.
                raise ConfigurationError(f"production signs only in a signing step's pod ({', '.join(SIGNING_STEPS)}), "
                                         f"with the {SIGNING_KEY_SECRET} Secret mounted ({SIGNING_KEY_ENV})")
            signing.ensure_signing_key(path)
            self._key_path = path
        return self._key_path

    def public_key_pem(self) -> bytes:
        """The local signing key's public half (safe to publish)."""
        return signing.public_key_path(self._private_key()).read_bytes()

    def trust(self) -> signing.TrustPolicy:
        if (self.method() == "key" or not self.config().get("signing", {}).get("trusted_identities")) and \
                self._settings().env != "production":  # production: the public key is a published trust anchor
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
