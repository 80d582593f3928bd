"""What a deployed directory holds and what its health check returns: shared by the deploy workflow,
the deploy targets and the server, so that the server never imports the deploy workflow.

    location / MODEL_DIR, location / SIGNATURE_FILE, location / ATTESTATION_FILE, location / RECEIPT_FILE
    result = serving.health_probe(location, trust=trust)     # HealthResult(healthy, reason, details)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL_DIR = "model"
SIGNATURE_FILE = "model.sig"
ATTESTATION_FILE = "attestation.dsse.json"
RECEIPT_FILE = "DEPLOYMENT.json"
# The name a target's single deployment is served under unless release.yaml serving.model_name says otherwise.
DEFAULT_MODEL_NAME = "german_credit"


@dataclass
class HealthResult:
    healthy: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
