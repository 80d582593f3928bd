"""Dagster resources: thin, typed wrappers over the secure_ml core.

``build_resources(env)`` is the one place resources are chosen per environment.
"""

from resources.custody import (
    CustodyResource,
    EncryptedIOManager,
    Sealed,
    build_resources,
    sealed_output,
    verdict,
)

__all__ = ["CustodyResource", "EncryptedIOManager", "Sealed", "build_resources", "sealed_output", "verdict"]
