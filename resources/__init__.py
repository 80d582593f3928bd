"""Dagster resources: thin, typed wrappers over the secure_ml core.

``build_resources(settings)`` is the one place resources are chosen per environment. Each module
here that provides resources defines ``resources_for(settings) -> dict[str, resource]``; they are
merged in module-name order (``custody`` first, since the others depend on it).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from resources.custody import (
    CustodyResource,
    EncryptedIOManager,
    Sealed,
    sealed_output,
    verdict,
)
from secure_ml.settings import Settings


def build_resources(settings: Settings) -> dict[str, Any]:
    """Every resource for ``settings.env``; the one place they are chosen."""
    merged: dict[str, Any] = {}
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in sorted(names, key=lambda n: (n != "custody", n)):
        module = importlib.import_module(f"{__name__}.{name}")
        provide = getattr(module, "resources_for", None)
        if provide is not None:
            merged.update(provide(settings, merged))
    return merged


__all__ = ["CustodyResource", "EncryptedIOManager", "Sealed", "build_resources", "sealed_output", "verdict"]
