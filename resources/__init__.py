"""Dagster resources: thin, typed wrappers over the secure_ml core.

``build_resources(settings)`` is the one place resources are chosen per environment. Each module
here defines ``resources_for(settings, built) -> dict[str, resource]``, listed below in the order
they are built (``custody`` first: the others build on it).
"""

from __future__ import annotations

from typing import Any

from resources import release, security
from resources.custody import (
    CustodyResource,
    EncryptedIOManager,
    Sealed,
    current_model,
    model_key,
    sealed_output,
    verdict,
)
from resources.custody import resources_for as custody_resources
from secure_ml.settings import Settings


def build_resources(settings: Settings) -> dict[str, Any]:
    """Every resource for ``settings.env``; the one place they are chosen."""
    built: dict[str, Any] = {}
    for provide in (custody_resources, release.resources_for, security.resources_for):
        built.update(provide(settings, built))
    return built


__all__ = ["CustodyResource", "EncryptedIOManager", "Sealed", "build_resources", "current_model", "model_key",
           "sealed_output", "verdict"]
