"""Deploy targets behind one protocol (:class:`~secure_ml.release.targets.base.DeployTarget`).

    target = targets.get("kubernetes")       # BadInput naming the choices for an unknown name
    sorted(targets.TARGETS)                  # what `secure-ml deploy --target` offers

A new target is one module in this package (a class with ``name``, ``write``, ``activate``,
``health`` and ``clear``) and its line in ``TARGETS`` below.
"""

from __future__ import annotations

from secure_ml.errors import BadInput
from secure_ml.release.targets.base import DeployTarget
from secure_ml.release.targets.kubernetes import KubernetesTarget
from secure_ml.release.targets.local import LocalTarget

TARGETS: dict[str, DeployTarget] = {
    "local": LocalTarget(),
    "kubernetes": KubernetesTarget(),
}


def get(name: str) -> DeployTarget:
    """The target called ``name``."""
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        raise BadInput(f"unknown deploy target {str(name)[:40]!r} (one of {', '.join(TARGETS)})") from None


__all__ = ["TARGETS", "DeployTarget", "get"]
