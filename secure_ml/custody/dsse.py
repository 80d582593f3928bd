"""DSSE envelopes: one encoding, one signer interface, k-of-n verification (securesystemslib).

    signer = load_signer(Path("~/.secure_ml_identities/carol/carol.key"))   # any securesystemslib Signer
    data = sign_envelope(payload_bytes, PAYLOAD_TYPE, [signer])            # JSON bytes
    verified = verify_envelope(data, keys, threshold=1, payload_type=PAYLOAD_TYPE)
    verified.payload, verified.keyids                                       # what was signed, by whom

Keys are securesystemslib ``SSlibKey`` objects and their ``keyid`` is TUF's (SHA-256 of the key's
canonical JSON), so a key id means the same here, in the trust policy and in TUF/in-toto tools.
Ed25519 and ECDSA P-256 keys both work; a Sigstore, HSM or cloud-KMS ``Signer`` slots in unchanged.

Every failure raises :class:`~secure_ml.errors.VerificationError` with one line: a truncated or
garbled envelope, the wrong payload type, too few signatures by the given keys.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib import exceptions as sslib_exceptions
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, Key, Signature, Signer, SSlibKey

from secure_ml.errors import ConfigurationError, VerificationError

INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"

__all__ = ["INTOTO_PAYLOAD_TYPE", "STATEMENT_TYPE", "Verified", "load_signer", "public_key", "pae",
           "sign_envelope", "verify_envelope", "canonical_json", "Key", "Signer", "SSlibKey"]


def canonical_json(value: Any) -> bytes:
    """The bytes we sign: sorted keys, no whitespace, so a re-serialised document signs the same."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed (binds the type to the bytes)."""
    return Envelope(payload, payload_type, {}).pae()


def public_key(pem: bytes | Path) -> SSlibKey:
    """A PEM public key (bytes or a file) as a securesystemslib key."""
    from cryptography.hazmat.primitives import serialization

    data = pem.read_bytes() if isinstance(pem, Path) else pem
    try:
        key = serialization.load_pem_public_key(data)
        return SSlibKey.from_crypto(key)
    except (ValueError, TypeError, sslib_exceptions.UnsupportedLibraryError) as exc:
        where = f" {pem}" if isinstance(pem, Path) else ""
        raise ConfigurationError(f"public key{where} is not a PEM Ed25519 or ECDSA key ({exc})") from None


def load_signer(path: Path) -> CryptoSigner:
    """A signer over an unencrypted PEM private key file (callers check where it lives first)."""
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        return CryptoSigner(private)
    except FileNotFoundError:
        raise ConfigurationError(f"key file not found: {path}") from None
    except (ValueError, TypeError, sslib_exceptions.UnsupportedLibraryError):
        raise ConfigurationError(f"key file {path} is not an unencrypted PEM Ed25519 or ECDSA private key") from None


def sign_envelope(payload: bytes, payload_type: str, signers: Sequence[Signer]) -> bytes:
    """A DSSE envelope over ``payload`` with one signature per signer, as JSON bytes."""
    envelope = Envelope(payload, payload_type, {})
    for signer in signers:
        envelope.sign(signer)
    return json.dumps(envelope.to_dict(), indent=1, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class Verified:
    payload: bytes
    payload_type: str
    keyids: tuple[str, ...]

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except ValueError:
            raise VerificationError("the signed payload is not JSON") from None


def parse_envelope(data: bytes | str | Mapping[str, Any], *, what: str = "envelope") -> Envelope:
    """Parse without verifying; a truncated or garbled envelope is a VerificationError."""
    try:
        parsed = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        if not isinstance(parsed, dict):
            raise ValueError
        for field in ("payload", "payloadType", "signatures"):
            if field not in parsed:
                raise ValueError
        base64.b64decode(parsed["payload"], validate=True)
        envelope = Envelope.from_dict(parsed)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, base64.binascii.Error):
        raise VerificationError(f"the {what} is not a DSSE envelope: truncated or garbled") from None
    return envelope


def verify_envelope(data: bytes | str | Mapping[str, Any] | Envelope, keys: Sequence[Key], *, threshold: int = 1,
                    payload_type: str = INTOTO_PAYLOAD_TYPE, what: str = "envelope") -> Verified:
    """Verify at least ``threshold`` distinct signatures by ``keys``; return what was signed."""
    envelope = data if isinstance(data, Envelope) else parse_envelope(data, what=what)
    if envelope.payload_type != payload_type:
        raise VerificationError(f"the {what} has payload type {envelope.payload_type!r}, not {payload_type!r}")
    if not envelope.signatures:
        raise VerificationError(f"the {what} carries no signature")
    if threshold < 1:
        raise ConfigurationError("a signature threshold must be at least 1")
    try:
        accepted = envelope.verify(list(keys), threshold)
    except sslib_exceptions.VerificationError:
        got = _count_valid(envelope, keys)
        raise VerificationError(
            f"the {what} is not signed by enough trusted keys ({got} of {threshold} needed), "
            "or it was altered after signing") from None
    return Verified(envelope.payload, envelope.payload_type, tuple(sorted(accepted)))


def _count_valid(envelope: Envelope, keys: Sequence[Key]) -> int:
    valid = 0
    for key in keys:
        signature: Signature | None = envelope.signatures.get(key.keyid)
        if signature is None:
            continue
        try:
            key.verify_signature(signature, envelope.pae())
            valid += 1
        except sslib_exceptions.UnverifiedSignatureError:
            continue
    return valid
