"""What a deployed directory holds and what its health check returns: shared by the deploy workflow,
the deploy targets and the server, so that the server never imports the deploy workflow.

    location / MODEL_DIR, location / SIGNATURE_FILE, location / ATTESTATION_FILE, location / RECEIPT_FILE
    result = serving.health_probe(location, trust=trust)     # HealthResult(healthy, reason, details)
    live = live_models(registry, target="kubernetes", served_name="german_credit", default_model="german_credit")

:func:`live_models` is the one answer to "what is live on a target, under which name": the server
(secure_ml.release.served) and the Kubernetes deploy target (one server with every live model) use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass(frozen=True)
class DeployedModel:
    """One deployed model: the name it is served under, its version, where it is, the digest it must hash to."""

    name: str
    version: str
    directory: Path
    digest: str


def served_name(model: str, *, served: str, default_model: str | None) -> str:
    """The name ``model`` is served under: the configured one (release.yaml ``serving.model_name``) for the
    default model, its own name for every other."""
    return served if default_model is None or model == default_model else model


def live_models(registry: Any, *, target: str, served: str, default_model: str | None) -> list[DeployedModel]:
    """Every model live on ``target`` (one live deployment per model, a revoked version never), by name."""
    every = registry.for_model(None)
    return [DeployedModel(served_name(live.model, served=served, default_model=default_model), live.version,
                          Path(live.location), live.model_digest)
            for live in every.live(target) if every.get(live.version).stage != "revoked"]
