"""DVC versions of dataset ciphertexts (secure_ml/data/versioning.py), checked with the real dvc CLI.

Touches: a real DVC repository and local remote under a fresh SECURE_ML_HOME (DVC's Python API
in-process, and the `dvc` command line in a subprocess for `status`, `status --cloud` and
`pull`), the real encrypted artifact store and keyring. Does not touch Dagster (the asset's use of
this module is in test_data_stage.py) or a cloud remote (no network here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from secure_ml.custody.store import ArtifactStore
from secure_ml.data.versioning import DatasetVersions
from secure_ml.errors import ConfigurationError, IntegrityError
from secure_ml.settings import Settings
from tests.conftest import SAMPLE_CSV

pytestmark = pytest.mark.slow  # runs the DVC CLI

DVC = str(Path(sys.executable).with_name("dvc"))
KEY = "ab" * 32


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([DVC, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture
def stored(settings: Settings) -> tuple[ArtifactStore, str]:
    store = settings.artifact_store()
    return store, store.put_bytes(SAMPLE_CSV.read_bytes()).sha256


def test_track_versions_the_ciphertext_and_the_cli_agrees(settings: Settings, stored: tuple[ArtifactStore, str]) -> None:
    store, digest = stored
    versions = DatasetVersions.from_settings(settings)
    version = versions.track(KEY, store.path_for(digest))
    assert version.version.startswith("md5:") and version.path == f"drops/{KEY}.smle"
    workspace = versions.root / version.path
    assert workspace.read_bytes() == store.path_for(digest).read_bytes()
    # Only ciphertext: no plaintext anywhere in the repository, its cache or the remote.
    for root in (versions.root, settings.home / "dvc-remote"):
        for path in (p for p in root.rglob("*") if p.is_file()):
            assert b"radio/TV" not in path.read_bytes(), path
    config = (versions.root / ".dvc" / "config").read_text()
    assert "analytics = False" in config and "check_update = False" in config and "url = ../../dvc-remote" in config
    assert (versions.root / ".dvc" / "tmp" / "site-cache").is_dir()  # DVC's state stays inside the home

    status = dvc(versions.root, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    cloud = dvc(versions.root, "status", "--cloud")
    assert cloud.returncode == 0 and "in sync" in cloud.stdout, cloud.stdout + cloud.stderr


def test_dvc_pull_restores_a_deleted_copy_that_the_store_verifies(settings: Settings,
                                                                   stored: tuple[ArtifactStore, str]) -> None:
    store, digest = stored
    versions = DatasetVersions.from_settings(settings)
    version = versions.track(KEY, store.path_for(digest))
    workspace = versions.root / version.path
    workspace.unlink()
    shutil.rmtree(versions.root / ".dvc" / "cache")  # so the bytes must come from the remote
    assert "not in cache" in dvc(versions.root, "status").stdout  # DVC sees the loss

    pulled = dvc(versions.root, "pull")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert dvc(versions.root, "status").stdout.strip().endswith("up to date.")

    store.path_for(digest).unlink()  # the store lost its object too: DVC's copy brings it back
    shutil.copyfile(workspace, store.path_for(digest))
    assert store.verify(digest) == SAMPLE_CSV.stat().st_size
    assert store.get_bytes(digest) == SAMPLE_CSV.read_bytes()


def test_restore_into_store_replaces_a_tampered_object(settings: Settings, stored: tuple[ArtifactStore, str]) -> None:
    store, digest = stored
    versions = DatasetVersions.from_settings(settings)
    versions.track(KEY, store.path_for(digest))
    path = store.path_for(digest)
    data = bytearray(path.read_bytes())
    data[-40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.verify(digest)
    assert versions.restore_into_store(KEY, store, digest) == SAMPLE_CSV.stat().st_size
    assert store.get_bytes(digest) == SAMPLE_CSV.read_bytes()


def test_a_tampered_dvc_copy_is_refused_on_restore(settings: Settings, stored: tuple[ArtifactStore, str]) -> None:
    store, digest = stored
    versions = DatasetVersions.from_settings(settings)
    version = versions.track(KEY, store.path_for(digest))
    # Tamper with the one copy DVC would restore from: cache gone, remote object flipped.
    shutil.rmtree(versions.root / ".dvc" / "cache")
    (versions.root / version.path).unlink()
    [remote_object] = [p for p in (settings.home / "dvc-remote").rglob("*") if p.is_file()]
    remote_object.chmod(0o600)
    remote_object.write_bytes(remote_object.read_bytes()[:-1] + b"\0")
    store.path_for(digest).unlink()
    with pytest.raises(IntegrityError):
        versions.restore_into_store(KEY, store, digest)


def test_annotate_find_and_forget(settings: Settings, stored: tuple[ArtifactStore, str]) -> None:
    store, digest = stored
    versions = DatasetVersions.from_settings(settings)
    assert versions.find(KEY) is None
    versions.track(KEY, store.path_for(digest))
    versions.annotate(KEY, {"dataset_sha256": digest, "rows": 1000})
    found = versions.find(KEY)
    assert found is not None and found.meta == {"dataset_sha256": digest, "rows": 1000}
    assert dvc(versions.root, "status").returncode == 0  # DVC accepts the meta it did not write
    versions.forget(KEY)
    assert versions.find(KEY) is None and not (versions.root / "drops" / f"{KEY}.smle").exists()


def test_a_failed_push_leaves_no_version(settings: Settings, stored: tuple[ArtifactStore, str]) -> None:
    store, digest = stored
    # An S3 remote without DVC's S3 plugin installed: add succeeds, push fails (no network is tried).
    versions = DatasetVersions(settings.home / "dvc", "s3://secure-ml-nowhere/datasets")
    with pytest.raises(ConfigurationError, match="DVC could not version the drop"):
        versions.track(KEY, store.path_for(digest))
    assert versions.find(KEY) is None and not (versions.root / "drops" / f"{KEY}.smle").exists()


def test_an_unusable_remote_path_is_a_configuration_error(settings: Settings, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the remote should be")
    versions = DatasetVersions(settings.home / "dvc", blocker / "remote")
    with pytest.raises(ConfigurationError, match="cannot be created"):
        versions.track(KEY, SAMPLE_CSV)


def test_malformed_dvc_file_and_bad_keys_are_refused(settings: Settings) -> None:
    versions = DatasetVersions.from_settings(settings)
    versions.dvcfile(KEY).parent.mkdir(parents=True)
    versions.dvcfile(KEY).write_text("outs: [")
    with pytest.raises(IntegrityError, match="is malformed"):
        versions.find(KEY)
    with pytest.raises(Exception, match="not a SHA-256 digest"):
        versions.workspace_path("../../etc/passwd")
