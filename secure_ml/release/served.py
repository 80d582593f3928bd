"""Which models the server serves: every deployed model, by name, version, directory and pinned digest.

    deployed = deployed_models(settings)                 # [DeployedModel(name, version, directory, digest)]
    models = load_deployed(deployed, trust=release.trust)   # each through the one verification chain

``deployed_models`` is the one place that says what is deployed for serving: ``secure-ml serve`` and
the Kubernetes rendering both take their list from it: one live deployment per model
(``Registry.live``), the default model served under the configured name (release.yaml
``serving.model_name``, default ``german_credit``), every other model under its own. ``load_deployed``
loads each one only through
:func:`secure_ml.release.serving.load_deployment` (signature, files pinned to the registry's digest,
attestation), and refuses the whole list if any model fails: a server never starts half-verified.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from secure_ml.custody.integrity import SHA256_HEX
from secure_ml.errors import BadInput
from secure_ml.release.deployed import DEFAULT_MODEL_NAME, DeployedModel, live_models
from secure_ml.release.serving.model import LoadedModel, load_deployment
from secure_ml.security.verification import TrustPolicy

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
__all__ = ["DEFAULT_MODEL_NAME", "MODEL_NAME", "DeployedModel", "check_names", "deployed_models", "load_deployed"]


def deployed_models(settings: Any, *, target: str = "local") -> list[DeployedModel]:
    """Every model deployed to ``target``, each pinned to the digest the registry recorded for it."""
    from secure_ml.release.deploy import Release

    release = Release.from_settings(settings)
    # Per model (registry.live): the default model under serving.model_name, every other under its own name.
    name = str((settings.load_config("release").get("serving") or {}).get("model_name") or DEFAULT_MODEL_NAME)
    default = getattr(getattr(settings, "config", None), "default_model", DEFAULT_MODEL_NAME)
    return live_models(release.registry, target=target, served=name, default_model=default)


def check_names(models: Sequence[DeployedModel]) -> None:
    """BadInput for a name that is not a URL-safe model name, or one name given twice."""
    seen: set[str] = set()
    for model in models:
        if not MODEL_NAME.match(model.name):
            raise BadInput(f"model name {model.name[:70]!r} must be 1-63 lowercase letters, digits or _.-")
        if model.name in seen:
            raise BadInput(f"model {model.name!r} is named twice")
        if not SHA256_HEX.match(model.digest):
            raise BadInput(f"model {model.name!r}: digest must be 64 lowercase hex digits")
        seen.add(model.name)


def load_deployed(models: Sequence[DeployedModel], *, trust: TrustPolicy) -> list[LoadedModel]:
    """Each deployed model through the verification chain, pinned to its digest, named; all or nothing."""
    check_names(models)
    loaded = []
    for model in models:
        served = load_deployment(model.directory, trust=trust, expected_digest=model.digest)
        served.name = model.name
        loaded.append(served)
    return loaded
