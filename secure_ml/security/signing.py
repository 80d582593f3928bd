"""Model signatures with OpenSSF model-signing: sign a model directory, verify it against trust.

    key = ensure_signing_key(home / "keys" / "model-signing.pem")     # P-256, 0600, created once
    sign_model(model_dir, sig_path, private_key=key)                  # offline, elliptic-key bundle
    sign_files(store.tree_files(tree), sig_path, private_key=key)     # a stored model: no re-hashing
    trust = TrustPolicy.from_config(load_config("security"), home)    # trusted keys and identities
    verified = verify_model(model_dir, sig_path, trust)               # raises VerificationError

The manifest is model-signing's per-file SHA-256 one, whichever way it was made, so our bundles
verify with the upstream ``model_signing verify`` command and we verify what it signs.

Keyless signing (``sign_model_keyless``, ``sign_files_keyless``) uses Sigstore with an OIDC identity: an explicit token,
``SIGSTORE_ID_TOKEN``, or ambient CI credentials. It needs the network; without an identity it
refuses with one clear line. Sigstore bundles verify offline, against the trusted root that ships
inside sigstore-python (no TUF refresh).

A signature verifies only against what the trust policy names (public keys, or identity plus
issuer), never merely against the key embedded in or hinted by the bundle. After the signature
and the file digests check out, every file in the directory must be covered by the signed
manifest: nothing may ride along unsigned (model-signing itself skips ``.git*`` paths).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from secure_ml.custody.integrity import (
    SHA256_HEX,
    atomic_write,
    atomic_write_bytes,
    is_plain_relative_path,
    list_tree,
    sha256_tree,
)
from secure_ml.errors import BadInput, ConfigurationError, Error, VerificationError

KEY_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
MODEL_SIGNING_PREDICATE = "https://model_signing/signature/v1.0"


# -- keys ---------------------------------------------------------------------------------------
def ensure_signing_key(private_key: Path | str) -> Path:
    """Create the local ECDSA P-256 signing key (PEM, 0600) and its public key beside it, once.

    Returns the public key path. An existing key is kept; one readable by others is refused.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_key = Path(private_key)
    public = public_key_path(private_key)
    if private_key.exists():
        mode = private_key.stat().st_mode & 0o077
        if mode:
            raise ConfigurationError(f"signing key {private_key} is readable by others: chmod 600 it")
        if not public.exists():
            atomic_write_bytes(public, public_pem(_load_private(private_key)), mode=0o644)
        return public
    private_key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with contextlib.suppress(BadInput), atomic_write(private_key, mode=0o600, overwrite=False) as handle:
        handle.write(pem)  # overwrite=False: a concurrent creator wins and we keep theirs
    atomic_write_bytes(public, public_pem(_load_private(private_key)), mode=0o644)
    return public


def mounted_signing_key(private_key: Path | str, public_key: Path | str) -> Path:
    """A signing key handed to this process as a mounted file (the signing step's Kubernetes Secret):
    never created here; the file may be group-readable (the pod's fsGroup reads a root-owned Secret
    file) but nothing for others. Writes the public half to ``public_key`` (the configured trust anchor)
    when it is missing. Returns ``private_key``."""
    private_key = Path(private_key)
    try:
        mode = private_key.stat().st_mode & 0o777
    except OSError as exc:
        raise ConfigurationError(f"the mounted signing key {private_key} cannot be read ({exc.strerror})") from None
    if mode & 0o027:  # world access or group write: not the Secret mount we asked for
        raise ConfigurationError(f"the mounted signing key {private_key} has mode {mode:04o}: mount it with "
                                 "defaultMode 0440 or stricter")
    key = _load_private(private_key)
    if not Path(public_key).exists():
        atomic_write_bytes(public_key, public_pem(key), mode=0o644)
    return private_key


def public_key_path(private_key: Path) -> Path:
    return private_key.with_suffix(".pub")


def _load_private(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigurationError(f"signing key not found: {path}") from None
    except (ValueError, TypeError):
        raise ConfigurationError(f"signing key {path} is not an unencrypted PEM private key") from None


def public_pem(private_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))


def key_hint(public_key_pem: bytes) -> str:
    """model-signing's key identifier: SHA-256 of the public key's canonical PEM."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError:
        raise ConfigurationError("not a PEM public key") from None
    canonical = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(canonical).hexdigest()


# -- manifests ----------------------------------------------------------------------------------
def _manifest(files: Mapping[str, str], model_name: str) -> Any:
    """model-signing's per-file SHA-256 manifest for ``{relative path: sha256 hex}``.

    The same manifest model-signing builds when it hashes the directory itself (every path, git
    paths included, no symlinks), so the upstream ``model_signing verify`` command recomputes and
    accepts it. The names and digests are checked: plain relative POSIX paths, 64 hex digits.
    """
    from model_signing import manifest
    from model_signing._hashing import hashing

    if not files:
        raise BadInput("nothing to sign: the model has no files")
    items = []
    for name, digest in sorted(files.items()):
        if not is_plain_relative_path(name):
            raise BadInput(f"cannot sign {str(name)[:80]!r}: not a plain relative path")
        if not isinstance(digest, str) or not SHA256_HEX.match(digest):
            raise BadInput(f"cannot sign {name!r}: its digest is not a SHA-256 hex string")
        items.append(manifest.FileManifestItem(path=PurePosixPath(name),
                                               digest=hashing.Digest("sha256", bytes.fromhex(digest))))
    return manifest.Manifest(model_name, items, manifest._FileSerialization("sha256", False, []))


def _verifying_hashing_config(bundle: dict[str, Any]) -> Any:
    """For a sharded bundle (e.g. signed by the upstream CLI), the hashing config it names with an
    integer shard size: model-signing 1.1.1 reads a signed ``shard_size`` back as a float and its
    own verifier then fails."""
    from model_signing import hashing

    try:
        serialization = signed_payload(bundle).get("predicate", {}).get("serialization", {})
    except VerificationError:
        return None
    if serialization.get("method") != "shards":
        return None
    return hashing.Config().use_shard_serialization(
        hashing_algorithm=serialization.get("hash_type", "sha256"), shard_size=int(serialization["shard_size"]),
        ignore_paths=serialization.get("ignore_paths", [])).set_ignored_paths(paths=[], ignore_git_paths=False)


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise BadInput(f"model directory not found: {model_dir}")
    list_tree(model_dir)  # refuses symlinks with a clear message


def _sign(signer: Any, files: Mapping[str, str], signature_path: Path, model_name: str) -> bytes:
    from model_signing._signing import signing

    payload = signing.Payload(_manifest(files, model_name))
    with _staging(signature_path) as staging:
        signer.sign(payload).write(staging)
        data = staging.read_bytes()
    atomic_write_bytes(signature_path, data, mode=0o644)
    return data


# -- signing ------------------------------------------------------------------------------------
def sign_model(model_dir: Path | str, signature_path: Path | str, *, private_key: Path | str) -> bytes:
    """Sign ``model_dir`` with the elliptic key (offline); writes and returns the bundle bytes.

    Hashes every file (SHA-256, in parallel). A model already in custody is signed from the
    digests the store recorded instead: :func:`sign_files`.
    """
    model_dir, signature_path = Path(model_dir), Path(signature_path)
    _check_model_dir(model_dir)
    if signature_path.absolute().is_relative_to(model_dir.absolute()):
        raise BadInput("the signature must be written outside the model directory it signs")
    _load_private(Path(private_key))  # a clear error for a missing or unusable key
    return sign_files(sha256_tree(model_dir), signature_path, private_key=private_key, model_name=model_dir.name)


def sign_files(files: Mapping[str, str], signature_path: Path | str, *, private_key: Path | str,
               model_name: str = "model") -> bytes:
    """Sign a model given as ``{relative path: sha256}`` (offline, elliptic key), without reading it.

    For a model in the artifact store: the digests are the ones the store computed as it encrypted
    each file and checks again on every read, so the signature covers exactly what is in custody
    and no byte is hashed twice. Verification still hashes every file it is given.
    """
    from model_signing._signing import sign_ec_key

    _load_private(Path(private_key))
    return _sign(sign_ec_key.Signer(Path(private_key)), files, Path(signature_path), model_name)


def oidc_token(environ: dict[str, str] | None = None) -> str | None:
    """An OIDC identity for keyless signing: SIGSTORE_ID_TOKEN, else ambient CI credentials."""
    env = os.environ if environ is None else environ
    if env.get("SIGSTORE_ID_TOKEN"):
        return env["SIGSTORE_ID_TOKEN"]
    try:
        from sigstore.oidc import detect_credential

        return detect_credential()  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - no ambient identity here, whatever the detector's complaint
        return None


def sign_model_keyless(model_dir: Path | str, signature_path: Path | str, *, identity_token: str | None = None,
                       environ: dict[str, str] | None = None) -> bytes:
    """Sign with Sigstore keyless (Fulcio certificate + Rekor entry); needs an OIDC identity and the network."""
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    return sign_files_keyless(sha256_tree(model_dir), signature_path, identity_token=identity_token,
                              environ=environ, model_name=model_dir.name)


def sign_files_keyless(files: Mapping[str, str], signature_path: Path | str, *, identity_token: str | None = None,
                       environ: dict[str, str] | None = None, model_name: str = "model") -> bytes:
    """:func:`sign_files` with Sigstore keyless instead of the local key."""
    from model_signing._signing import sign_sigstore

    token = identity_token or oidc_token(environ)
    if not token:
        raise ConfigurationError("Sigstore keyless signing needs an OIDC identity: set SIGSTORE_ID_TOKEN or run "
                                 "where ambient credentials exist (e.g. GitHub Actions with id-token: write), "
                                 "or use signing.method: key")
    _manifest(files, model_name)  # bad names or digests fail before any network call
    try:
        return _sign(sign_sigstore.Signer(identity_token=token), files, Path(signature_path), model_name)
    except Error:
        raise
    except Exception as exc:  # noqa: BLE001 - network, token and service errors all mean "not signed"
        raise ConfigurationError(f"Sigstore keyless signing failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sign-", dir=target.parent) as tmp:
        yield Path(tmp) / "bundle.sig"


# -- trust --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrustPolicy:
    """Whom we believe: public key files and (identity, OIDC issuer) pairs for keyless bundles."""

    public_keys: tuple[Path, ...] = ()
    identities: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, config: dict[str, Any], home: Path) -> TrustPolicy:
        signing = config.get("signing", {})
        keys = tuple(_resolve(home, p) for p in signing.get("trusted_public_keys", []) or [])
        identities = []
        for entry in signing.get("trusted_identities", []) or []:
            if not isinstance(entry, dict) or not entry.get("identity") or not entry.get("issuer"):
                raise ConfigurationError("each signing.trusted_identities entry needs identity and issuer")
            identities.append((str(entry["identity"]), str(entry["issuer"])))
        return cls(keys, tuple(identities))

    @classmethod
    def of(cls, *, public_keys: Sequence[Path | str] = (), identities: Sequence[tuple[str, str]] = ()) -> TrustPolicy:
        return cls(tuple(Path(p) for p in public_keys), tuple(identities))

    def describe(self) -> str:
        keys = [f"key {p.name}" for p in self.public_keys]
        ids = [f"{i} (issuer {s})" for i, s in self.identities]
        return ", ".join(keys + ids) or "nothing"


def _resolve(home: Path, value: str | Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else home / path


@dataclass(frozen=True)
class VerifiedSignature:
    """What a verified bundle says: who signed, and the signed file digests."""

    signer: str
    method: str                      # key | sigstore
    files: dict[str, str] = field(default_factory=dict)   # path -> digest as signed (see hash_type)
    resources: int = 0
    bundle_sha256: str = ""
    hash_type: str = ""


def read_bundle(signature_path: Path | str) -> dict[str, Any]:
    """The bundle as JSON, with a clear error for anything truncated or malformed."""
    signature_path = Path(signature_path)
    try:
        raw = signature_path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"signature not found: {signature_path}") from None
    try:
        bundle = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise VerificationError(f"signature {signature_path.name} is not valid JSON: truncated or corrupted") from None
    if (not isinstance(bundle, dict) or not isinstance(bundle.get("verificationMaterial"), dict)
            or not isinstance(bundle.get("dsseEnvelope"), dict)):
        raise VerificationError(f"signature {signature_path.name} is not a model-signing (Sigstore DSSE) bundle")
    return bundle


def signed_payload(bundle: dict[str, Any]) -> dict[str, Any]:
    """The in-toto statement inside the bundle (call only after the signature verified)."""
    try:
        return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))  # type: ignore[no-any-return]
    except (KeyError, ValueError, TypeError):
        raise VerificationError("signature bundle payload is not base64 JSON") from None


def verify_model(model_dir: Path | str, signature_path: Path | str, trust: TrustPolicy) -> VerifiedSignature:
    """Verify ``model_dir`` against the bundle and the trust policy; raise VerificationError."""
    from model_signing import verifying

    model_dir, signature_path = Path(model_dir), Path(signature_path)
    _check_model_dir(model_dir)
    bundle = read_bundle(signature_path)
    material = bundle["verificationMaterial"]
    if "publicKey" in material:
        method, candidates = "key", _trusted_keys_for(material, trust)
        configs = [(f"key {p.name} (sha256:{key_hint(p.read_bytes())[:16]}…)",
                    verifying.Config().use_elliptic_key_verifier(public_key=p)) for p in candidates]
    elif "certificate" in material or "x509CertificateChain" in material:
        method = "sigstore"
        if not trust.identities:
            raise VerificationError("the model is signed with Sigstore but no identity is trusted "
                                    "(signing.trusted_identities is empty)")
        trust_config = offline_trust_config()
        configs = [(f"{identity} (issuer {issuer})",
                    verifying.Config().use_sigstore_verifier(identity=identity, oidc_issuer=issuer,
                                                             trust_config=trust_config))
                   for identity, issuer in trust.identities]
    else:
        raise VerificationError(f"signature {signature_path.name} names neither a public key nor a certificate")
    failures: list[str] = []
    sharded = _verifying_hashing_config(bundle)
    for signer, config in configs:
        if sharded is not None:
            config.set_hashing_config(sharded)
        try:
            config.verify(model_dir, signature_path)
        except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError, sigstore its own errors
            failures.append(_explain(exc))
            continue
        payload = signed_payload(bundle)
        files = _signed_files(payload)
        unsigned = sorted(set(list_tree(model_dir)) - set(files))
        if unsigned:
            # model-signing skips .git* paths even when asked not to, on verify: nothing rides along.
            raise VerificationError(f"{', '.join(unsigned[:5])} in {model_dir.name} is not covered by the signature")
        return VerifiedSignature(signer=signer, method=method, files=files,
                                 resources=len(payload.get("predicate", {}).get("resources", [])),
                                 hash_type=str(payload.get("predicate", {}).get("serialization", {}).get("hash_type", "")),
                                 bundle_sha256=hashlib.sha256(signature_path.read_bytes()).hexdigest())
    if not configs:
        raise VerificationError(f"the signing key is not trusted: trusted are {trust.describe()}")
    # Content mismatches are the interesting failure; a mismatching identity is expected noise.
    raise VerificationError(_best_failure(failures))


def _trusted_keys_for(material: dict[str, Any], trust: TrustPolicy) -> list[Path]:
    hint = (material.get("publicKey") or {}).get("hint")
    keys = []
    for path in trust.public_keys:
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            continue  # a configured key that is not here cannot vouch for anything
        if not hint or key_hint(pem) == hint:
            keys.append(path)
    return keys


def _signed_files(payload: dict[str, Any]) -> dict[str, str]:
    """{file: digest} from the signed predicate; shards (``name:start:end``) fold into their file."""
    if payload.get("predicateType") != MODEL_SIGNING_PREDICATE:
        raise VerificationError(f"signed statement has predicate {payload.get('predicateType')!r}, "
                                f"not {MODEL_SIGNING_PREDICATE}")
    files: dict[str, list[tuple[int, str]]] = {}
    method = payload.get("predicate", {}).get("serialization", {}).get("method")
    for resource in payload.get("predicate", {}).get("resources", []):
        name = str(resource.get("name", ""))
        start = 0
        if method == "shards":
            name, _, span = name.rpartition(":")
            name, _, first = name.rpartition(":")
            start = int(first) if first.isdigit() else 0
            del span
        files.setdefault(name, []).append((start, str(resource.get("digest", ""))))
    return {name: parts[0][1] if len(parts) == 1 else hashlib.sha256(
        "".join(d for _, d in sorted(parts)).encode()).hexdigest() for name, parts in files.items()}


def signed_model_files(signature_path: Path | str) -> dict[str, str]:
    """The files a (verified) bundle covers, with the digests it signed; for attestation subjects."""
    return _signed_files(signed_payload(read_bundle(signature_path)))


def _explain(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if text.startswith("Signature mismatch:"):
        parts = []
        # The diff is a list's repr: its quotes may come back backslash-escaped.
        changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", text)
        if changed:
            parts.append(f"{', '.join(changed)} changed after signing")
        extra = re.search(r"Extra files found in model '[^']*': ([^\"\]]+)", text)
        if extra:
            parts.append(f"{extra.group(1).strip()} added after signing")
        missing = re.search(r"Missing files in model '[^']*': ([^\"\]]+)", text)
        if missing:
            parts.append(f"{missing.group(1).strip()} removed after signing")
        return "the model does not match its signature: " + ("; ".join(parts) or "digests differ")
    if "Key mismatch" in text:
        return "the signature was made by a different key"
    if type(exc).__name__ == "InvalidSignature":
        return "the signature does not verify: the signed statement was altered or signed by another key"
    return text[:400]


def _best_failure(failures: list[str]) -> str:
    for failure in failures:
        if failure.startswith("the model does not match"):
            return failure
    return failures[0] if failures else "the signature does not verify"


# -- Sigstore, offline ----------------------------------------------------------------------------
_TRUST_CONFIG_CACHE: dict[str, Path] = {}


def offline_trust_config(instance: str = "https://tuf-repo-cdn.sigstore.dev") -> Path:
    """A ClientTrustConfig built from the trusted root shipped in sigstore-python (no network)."""
    if instance in _TRUST_CONFIG_CACHE and _TRUST_CONFIG_CACHE[instance].exists():
        return _TRUST_CONFIG_CACHE[instance]
    import sigstore

    store = Path(sigstore.__file__).parent / "_store" / instance.replace(":", "%3A").replace("/", "%2F")
    try:
        trusted_root = json.loads((store / "trusted_root.json").read_text())
        signing_config = json.loads((store / "signing_config.v0.2.json").read_text())
    except (OSError, ValueError):
        raise ConfigurationError(f"sigstore-python ships no trusted root for {instance}") from None
    config = {"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
              "trustedRoot": trusted_root, "signingConfig": signing_config}
    fd, name = tempfile.mkstemp(prefix="secure-ml-sigstore-trust-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle)
    _TRUST_CONFIG_CACHE[instance] = Path(name)
    return Path(name)
