"""A CycloneDX SBOM for a model release, validated against the CycloneDX schema.

    document = model_sbom(model_dir, lock_file, datasets=[DatasetRef("dataset", sha256, dvc_version)])
    validate(document)                       # raises VerificationError naming the first schema error

The BOM's subject is the model (``machine-learning-model``); its components are the model files
(type ``file``, with SHA-256 hashes), the datasets it was trained on (type ``data``, with their
digests and DVC versions) and every package pinned in the lock file (type ``library``, with its
purl and the hashes the lock pins). Built with cyclonedx-python-lib, serialised as CycloneDX 1.6 JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import sha256_tree
from secure_ml.errors import BadInput, VerificationError

_LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class DatasetRef:
    name: str
    sha256: str
    dvc_version: str = ""


def lock_packages(lock_file: Path | str) -> list[tuple[str, str, list[str]]]:
    """(name, version, sha256 hashes) for each pin in a hashed requirements lock."""
    lock_file = Path(lock_file)
    try:
        text = lock_file.read_text()
    except FileNotFoundError:
        raise BadInput(f"lock file not found: {lock_file}") from None
    packages: list[tuple[str, str, list[str]]] = []
    for logical in text.replace("\\\n", " ").splitlines():
        line = logical.strip()
        match = _LOCK_LINE.match(line)
        if match:
            packages.append((match.group(1), match.group(2), _HASH.findall(line)))
    return packages


def model_sbom(model_dir: Path | str, lock_file: Path | str, *, model_name: str = "secure-ml-model",
               model_version: str = "", datasets: Sequence[DatasetRef] = ()) -> str:
    """The CycloneDX 1.6 JSON document for the model directory."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    files = sha256_tree(model_dir)
    bom = Bom()
    bom.metadata.timestamp = datetime.now(UTC)
    subject = Component(name=model_name, version=model_version or None, type=ComponentType.MACHINE_LEARNING_MODEL,
                        bom_ref=f"model:{model_name}")
    bom.metadata.component = subject
    for name, digest in sorted(files.items()):
        component = Component(name=name, type=ComponentType.FILE, bom_ref=f"file:{name}",
                              hashes=[HashType(alg=HashAlgorithm.SHA_256, content=digest)])
        bom.components.add(component)
        bom.register_dependency(subject, [component])
    for dataset in datasets:
        component = Component(name=dataset.name, type=ComponentType.DATA, bom_ref=f"data:{dataset.name}",
                              version=dataset.dvc_version or None,
                              hashes=[HashType(alg=HashAlgorithm.SHA_256, content=dataset.sha256)],
                              properties=[Property(name="secure-ml:dvc_version", value=dataset.dvc_version)]
                              if dataset.dvc_version else [])
        bom.components.add(component)
        bom.register_dependency(subject, [component])
    for name, version, hashes in lock_packages(lock_file):
        purl = PackageURL(type="pypi", name=name.lower(), version=version)
        bom.components.add(Component(
            name=name, version=version, type=ComponentType.LIBRARY, purl=purl, bom_ref=f"pkg:{name.lower()}@{version}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=h) for h in hashes[:4]],
        ))
    return str(JsonV1Dot6(bom).output_as_string(indent=1))


def validate(document: str) -> dict[str, Any]:
    """Validate against the CycloneDX 1.6 JSON schema (strict); return the parsed document."""
    from cyclonedx.schema import SchemaVersion

    from secure_ml.data.deferred_imports import defer_iri_grammar

    defer_iri_grammar()  # the IRI grammar is compiled only if the document has an IRI to check
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(document)
    if error is not None:
        raise VerificationError(f"SBOM does not validate against CycloneDX 1.6: {str(error)[:300]}")
    return json.loads(document)  # type: ignore[no-any-return]
