"""The container image `make image` built: `make test-image` (not part of `make test`).

Touches: build/secure-ml-image.tar (the OCI archive), build/image.digest, the SBOM and the DSSE
provenance; the image's config and its layer; the image's root filesystem run with chroot as
UID 10001 (no container runtime can run on this machine). Skips when no image was built.
Does not touch: a registry or a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess  # nosec B404 - fixed argument lists, no shell
import tarfile
from pathlib import Path
from typing import Any

import pytest

BUILD = Path(__file__).resolve().parents[1] / "build"
ARCHIVE = BUILD / "secure-ml-image.tar"

pytestmark = pytest.mark.skipif(not ARCHIVE.is_file(), reason="no image built: run `make image` first")


def blob(archive: tarfile.TarFile, digest: str) -> bytes:
    member = archive.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
    assert member is not None
    return member.read()


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    with tarfile.open(ARCHIVE) as archive:
        index = json.loads(archive.extractfile("index.json").read())  # type: ignore[union-attr]
        digest = index["manifests"][0]["digest"]
        manifest_bytes = blob(archive, digest)
        manifest = json.loads(manifest_bytes)
        config = json.loads(blob(archive, manifest["config"]["digest"]))
    return {"digest": digest, "manifest_bytes": manifest_bytes, "manifest": manifest, "config": config}


def test_the_digest_file_is_the_archive_manifest_digest(image: dict[str, Any]) -> None:
    recorded = (BUILD / "image.digest").read_text().strip()
    assert recorded == image["digest"] == "sha256:" + hashlib.sha256(image["manifest_bytes"]).hexdigest()


def test_runs_as_non_root_with_no_compiler(image: dict[str, Any]) -> None:
    assert image["config"]["config"]["User"] == "10001:10001"
    names: set[str] = set()
    with tarfile.open(ARCHIVE) as archive:
        for layer in image["manifest"]["layers"]:
            with tarfile.open(fileobj=archive.extractfile(f"blobs/sha256/{layer['digest'][7:]}")) as tar:
                names |= {n.removeprefix("./") for n in tar.getnames()}
    assert "opt/venv/bin/python" in names and "opt/secure-ml/requirements.lock" in names
    assert not {"usr/bin/gcc", "usr/bin/cc", "usr/bin/g++", "usr/bin/clang", "usr/bin/make"} & names


def test_provenance_is_signed_over_the_digest_and_the_sbom_is_valid(image: dict[str, Any]) -> None:
    from secure_ml.security import attestation, sbom

    statement = attestation.verify_envelope((BUILD / "image.attestation.dsse.json").read_bytes(),
                                            [BUILD / "image-signing.pub"])
    assert statement["subject"][0]["digest"]["sha256"] == image["digest"].removeprefix("sha256:")
    document = sbom.validate((BUILD / "image.sbom.cdx.json").read_text())
    names = {c["name"] for c in document["components"]}
    assert {"torch", "dagster", "python3"} <= names
    assert (BUILD / "image-base.digest").read_text().startswith("sha256:")
    assert statement["predicate"]["buildDefinition"]["externalParameters"]["base_image_digest"] \
        == (BUILD / "image-base.digest").read_text().strip()


def test_built_from_the_containerfile_over_the_pinned_base_and_nothing_of_the_build_kept(image: dict[str, Any]) -> None:
    """buildah's manifest names the base the Containerfile's FROM resolved: the one `make image` made."""
    base = (BUILD / "image-base.digest").read_text().strip()
    assert image["manifest"]["annotations"]["org.opencontainers.image.base.digest"] == base
    assert image["config"]["config"]["Labels"]["org.opencontainers.image.base.digest"] == base
    assert len(image["manifest"]["layers"]) == 2  # the base, then what the Containerfile added
    with tarfile.open(ARCHIVE) as archive:
        top = image["manifest"]["layers"][-1]["digest"][7:]
        with tarfile.open(fileobj=archive.extractfile(f"blobs/sha256/{top}")) as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
    assert not [n for n in members if n.startswith(("mnt/", "tmp/", "root/")) or n.endswith("pip.conf")]
    assert (members["home/secure-ml"].uid, members["var/lib/secure-ml"].uid) == (10001, 10001)
    assert members["opt/venv/bin/python"].uid == 0  # the code is not the user's to change


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("umoci"), reason="chroot needs root and umoci")
def test_the_cli_runs_in_the_image_as_uid_10001(tmp_path: Path, image: dict[str, Any]) -> None:
    layout = tmp_path / "oci"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{ARCHIVE}", f"oci:{layout}:secure-ml"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:secure-ml", str(tmp_path / "bundle")], check=True,
                   capture_output=True)
    rootfs = tmp_path / "bundle" / "rootfs"
    (rootfs / "tmp").chmod(0o1777)
    env = {"PATH": "/opt/venv/bin:/usr/bin:/bin", "HOME": "/tmp", "SECURE_ML_HOME": "/tmp/home",
           "DAGSTER_DISABLE_TELEMETRY": "1"}
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"  # looked up here: `env` below is the image's PATH
    # What a container runtime gives every container: /dev (torch opens /dev/urandom) and /proc.
    subprocess.run(["mount", "--bind", "/dev", str(rootfs / "dev")], check=True)
    try:
        subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
        try:
            run = subprocess.run([chroot, "--userspec=10001:10001", str(rootfs), "secure-ml", "k8s", "render",
                                  "/tmp/out", "--image-digest", image["digest"]],
                                 env=env, capture_output=True, text=True, timeout=600)
        finally:
            subprocess.run(["umount", str(rootfs / "proc")], check=True)
    finally:
        subprocess.run(["umount", str(rootfs / "dev")], check=True)
    assert run.returncode == 0, run.stderr
    assert "every object checked" in run.stdout
