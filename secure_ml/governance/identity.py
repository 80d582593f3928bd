"""Identities are keys: a person acts as whoever holds the private key, never as a name they type.

    key, pub = new_identity("carol", Path("~/.secure_ml_identities/carol"), home=settings.home)
    me = acting_identity(settings.environ, home=settings.home)      # SECURE_ML_IDENTITY=FILE, or None
    me.signer, me.key.keyid                                          # sign decisions; look up in the trust policy

``new_identity`` writes ``DIR/NAME.key`` (Ed25519, PKCS#8 PEM, mode 0600) and ``DIR/NAME.pub``.
``load_identity`` refuses a key that others may read, a key stored under ``SECURE_ML_HOME`` (whoever
can write the home must not also hold everyone's keys) and a file that is not a private key.
A name alone (``SECURE_ML_ACTOR``, ``GITHUB_ACTOR``) is a claim and grants nothing privileged:
who a key belongs to is the signed trust policy's answer (secure_ml.governance.trust).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from secure_ml.custody.dsse import SSlibKey, load_signer, public_key
from secure_ml.custody.integrity import atomic_write_bytes
from secure_ml.errors import BadInput, ConfigurationError

IDENTITY_ENV = "SECURE_ML_IDENTITY"
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

__all__ = ["Identity", "new_identity", "load_identity", "acting_identity", "check_name", "IDENTITY_ENV"]


@dataclass(frozen=True)
class Identity:
    """A loaded private key: what signs, and the key the trust policy knows it by."""

    path: Path
    signer: object  # a securesystemslib Signer
    key: SSlibKey

    @property
    def keyid(self) -> str:
        return str(self.key.keyid)


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise BadInput(f"identity name {name!r} must be 1-64 of a-z 0-9 . _ - (starting with a letter or digit)")
    return name


def _under(path: Path, home: Path | None) -> bool:
    if home is None:
        return False
    try:
        path.resolve().relative_to(home.resolve())
        return True
    except ValueError:
        return False


def new_identity(name: str, out_dir: Path, *, home: Path | None = None) -> tuple[Path, Path]:
    """Create NAME's key pair in ``out_dir`` (0700); refuse to overwrite or to write under ``home``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    check_name(name)
    if _under(out_dir, home):
        raise BadInput(f"{out_dir} is inside SECURE_ML_HOME ({home}): keep identity keys in their owner's own folder")
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise BadInput(f"{path} already exists: an identity key is never overwritten")
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = ed25519.Ed25519PrivateKey.generate()
    atomic_write_bytes(key_path, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), mode=0o600)
    atomic_write_bytes(pub_path, private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), mode=0o644)
    return key_path, pub_path


def load_identity(path: Path, *, home: Path | None = None) -> Identity:
    """The identity in a private key file, refused if it is readable by others or under ``home``."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigurationError(f"identity key not found: {path}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"identity key {path} is not a regular file")
    # A key others can read is a key others may hold.
    if info.st_mode & 0o077:
        raise ConfigurationError(f"identity key {path} has loose permissions {stat.S_IMODE(info.st_mode):04o}: "
                                 f"run chmod 600 {path}")
    if info.st_uid != os.getuid():
        raise ConfigurationError(f"identity key {path} is owned by another user (uid {info.st_uid})")
    # Whoever can write the home must not also hold the keys that approve what is in it.
    if _under(path, home):
        raise ConfigurationError(f"identity key {path} is inside SECURE_ML_HOME: move it to its owner's own folder")
    signer = load_signer(path)
    return Identity(path=path, signer=signer, key=signer.public_key)


def acting_identity(environ: Mapping[str, str], *, explicit: Path | None = None,
                    home: Path | None = None) -> Identity | None:
    """``--identity FILE`` or ``SECURE_ML_IDENTITY=FILE``; None when neither is given."""
    path = explicit or (Path(environ[IDENTITY_ENV]) if environ.get(IDENTITY_ENV) else None)
    return None if path is None else load_identity(path, home=home)


def public_key_file(path: Path) -> SSlibKey:
    """A ``NAME.pub`` file as a key (a private key file is refused: it must not be shared)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput(f"public key file not found: {path}") from None
    if b"PRIVATE KEY" in data:
        raise BadInput(f"{path} is a private key: give the .pub file")
    return public_key(data)
