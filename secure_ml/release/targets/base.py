"""What a deploy target is: the hooks the release workflow calls, in this order.

    staging = <private dir holding model/, model.sig, attestation.dsse.json>   # verified by the gate
    extra = target.write(staging, version="v3", model_digest="ab12…", config=release_config)
    <receipt written, staging renamed to deployments/<target>/<version>-<digest12>>
    target.activate(root, location, version="v3", model_digest="ab12…")
    result = target.health(location, trust=trust)      # None: not checkable from here
    target.clear(root)                                 # after a failed first deploy: nothing is live

A target only ever sees bytes the deploy gate has verified; it adds what its platform needs
(a pointer file, rendered manifests) and says how to check and retire a deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from secure_ml.release.deployed import HealthResult
from secure_ml.security.verification import TrustPolicy


class DeployTarget(Protocol):
    """One place a verified model can be deployed to (``secure_ml.release.targets.TARGETS``)."""

    name: str

    def write(self, staging: Path, *, version: str, model_digest: str, config: Mapping[str, Any]) -> dict[str, str]:
        """Add this target's files to the staged deployment; return extra receipt fields. Raise to abort."""
        ...

    def activate(self, root: Path, location: Path, *, version: str, model_digest: str) -> None:
        """Make ``location`` (under ``root``, already in place) the live deployment."""
        ...

    def health(self, location: Path, *, trust: TrustPolicy) -> HealthResult | None:
        """Check the deployment the way it will be served; None where that cannot be done from here."""
        ...

    def clear(self, root: Path) -> None:
        """Make nothing live (a failed first deploy with no earlier version to restore)."""
        ...
