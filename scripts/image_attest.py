"""The image's SBOM and signed provenance (the last stage of `make image`, scripts/build-image.sh).

    python scripts/image_attest.py build build/image-work/bundle/rootfs SECONDS

Writes build/image.sbom.cdx.json (CycloneDX 1.6: every Debian package of the image, every package
of requirements.lock, validated against the CycloneDX schema) and build/image.attestation.dsse.json
(an in-toto Statement, SLSA provenance v1, subject the image's manifest digest, inputs the lock,
the base's package set and image digest; DSSE-signed with the local signing key,
$SECURE_ML_HOME/keys/model-signing.pem, and verified against its public key, copied to
build/image-signing.pub).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def main(out: Path, rootfs: Path, seconds: int) -> None:
    from cyclonedx.model import HashAlgorithm, HashType
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    from secure_ml.custody.integrity import SHA256_HEX, atomic_write_bytes
    from secure_ml.security import attestation, sbom
    from secure_ml.security.signing import ensure_signing_key

    digest = (out / "image.digest").read_text().strip()
    if not digest.startswith("sha256:") or not SHA256_HEX.match(digest.removeprefix("sha256:")):
        raise SystemExit(f"image_attest: {out / 'image.digest'} holds no sha256 digest")
    repo = Path(__file__).resolve().parents[1]
    lock = repo / "requirements.lock"

    bom = Bom()
    image = Component(name="secure-ml-image", version=digest, type=ComponentType.CONTAINER, bom_ref="image")
    bom.metadata.component = image
    for line in (out / "image-base.packages").read_text().split():
        name, version = line.split("=", 1)
        component = Component(name=name, version=version, type=ComponentType.LIBRARY, bom_ref=f"deb:{name}@{version}",
                              purl=PackageURL(type="deb", namespace="debian", name=name, version=version))
        bom.components.add(component)
        bom.register_dependency(image, [component])
    for name, version, hashes in sbom.lock_packages(lock):
        component = Component(name=name, version=version, type=ComponentType.LIBRARY,
                              bom_ref=f"pkg:{name.lower()}@{version}",
                              purl=PackageURL(type="pypi", name=name.lower(), version=version),
                              hashes=[HashType(alg=HashAlgorithm.SHA_256, content=h) for h in hashes[:4]])
        bom.components.add(component)
        bom.register_dependency(image, [component])
    document = str(JsonV1Dot6(bom).output_as_string(indent=1))
    sbom.validate(document)
    atomic_write_bytes(out / "image.sbom.cdx.json", document.encode(), mode=0o644)

    def file_digest(path: Path) -> dict[str, str]:
        return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "secure-ml-image", "digest": {"sha256": digest.removeprefix("sha256:")}}],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": "https://secure-ml.dev/make-image/v1",
                "externalParameters": {"suite": os.environ.get("SUITE", "bookworm"),
                                       "base_image_digest": (out / "image-base.digest").read_text().strip()},
                "resolvedDependencies": [
                    {"uri": "requirements.lock", "digest": file_digest(lock)},
                    {"uri": "image-base.packages", "digest": file_digest(out / "image-base.packages")},
                    {"uri": "image.sbom.cdx.json", "digest": file_digest(out / "image.sbom.cdx.json")},
                ],
            },
            "runDetails": {"builder": {"id": "https://secure-ml.dev/make-image"},
                           "metadata": {"buildDurationSeconds": seconds}},
        },
    }
    home = Path(os.environ.get("SECURE_ML_HOME", repo / ".secure_ml"))
    key = home / "keys" / "model-signing.pem"
    public = ensure_signing_key(key)
    envelope = attestation.sign_envelope(statement, private_key=key)
    attestation.verify_envelope(envelope, [public])
    atomic_write_bytes(out / "image.attestation.dsse.json", envelope, mode=0o644)
    atomic_write_bytes(out / "image-signing.pub", public.read_bytes(), mode=0o644)
    print(f"image: SBOM ({len(bom.components)} components) and signed provenance over {digest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
