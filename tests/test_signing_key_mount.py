"""The signing key as the signing steps' pods get it: a mounted Secret file, never created in production.

Touches: the real SigningResource and secure_ml.security.signing with real ECDSA keys on disk, a file
mode as Kubernetes gives a Secret volume (0440 for the pod's fsGroup), and a real signature made with
the mounted key. Does not touch: a cluster (tests/test_k8s_secrets_per_step.py renders the mounts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from resources.security import SIGNING_KEY_ENV, SigningResource
from secure_ml.errors import ConfigurationError
from secure_ml.security import signing
from secure_ml.settings import Settings


def _mounted(tmp_path: Path, mode: int) -> Path:
    made = tmp_path / "made" / "model-signing.pem"
    signing.ensure_signing_key(made)
    mounted = tmp_path / "secret" / "model-signing.pem"
    mounted.parent.mkdir()
    mounted.write_bytes(made.read_bytes())
    mounted.chmod(mode)
    return mounted


def test_a_signing_step_signs_with_the_mounted_key(settings: Settings, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    mounted = _mounted(tmp_path, 0o440)
    monkeypatch.setenv(SIGNING_KEY_ENV, str(mounted))
    monkeypatch.setenv("SECURE_ML_ENV", "production")
    resource = SigningResource(home=str(settings.home))
    envelope = resource.sign_statement({"_type": "https://in-toto.io/Statement/v1", "subject": [], "predicateType": "x",
                                        "predicate": {}})
    assert envelope and not (settings.keys_dir / "model-signing.pem").exists()  # nothing created on the volume
    assert (settings.keys_dir / "model-signing.pub").read_bytes() == signing.public_key_path(
        tmp_path / "made" / "model-signing.pem").read_bytes()  # the trust anchor, public, written once


def test_a_loose_mount_or_production_without_one_is_refused(settings: Settings, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIGNING_KEY_ENV, str(_mounted(tmp_path, 0o444)))
    with pytest.raises(ConfigurationError, match="mode 0444"):
        SigningResource(home=str(settings.home)).public_key_pem()
    monkeypatch.delenv(SIGNING_KEY_ENV)
    monkeypatch.setenv("SECURE_ML_ENV", "production")
    with pytest.raises(ConfigurationError, match="production signs only in a signing step's pod"):
        SigningResource(home=str(settings.home)).public_key_pem()
    assert not (settings.keys_dir / "model-signing.pem").exists()
    monkeypatch.delenv("SECURE_ML_ENV")
    SigningResource(home=str(settings.home)).public_key_pem()  # locally the key is made once, as before
    assert (settings.keys_dir / "model-signing.pem").exists()
