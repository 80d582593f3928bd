"""The ``local`` deploy target: a verified model directory the local server reads.

    deployments/local/<version>-<digest12>/{model/, model.sig, attestation.dsse.json, DEPLOYMENT.json}
    deployments/local/current.json      {"version", "model_digest", "directory"}: what `secure-ml serve` loads

After a deploy the health check loads the model the way the server does (the verification chain,
then the training stage's loader) and predicts one representative row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import atomic_write
from secure_ml.release.deployed import HealthResult
from secure_ml.security.verification import TrustPolicy

POINTER = "current.json"


class LocalTarget:
    name = "local"

    def write(self, staging: Path, *, version: str, model_digest: str, config: Mapping[str, Any]) -> dict[str, str]:
        return {}

    def activate(self, root: Path, location: Path, *, version: str, model_digest: str) -> None:
        with atomic_write(root / POINTER) as out:
            out.write(json.dumps({"version": version, "model_digest": model_digest, "directory": location.name},
                                 sort_keys=True).encode())

    def health(self, location: Path, *, trust: TrustPolicy) -> HealthResult | None:
        from secure_ml.release import serving

        return serving.health_probe(location, trust=trust)

    def clear(self, root: Path) -> None:
        (root / POINTER).unlink(missing_ok=True)
