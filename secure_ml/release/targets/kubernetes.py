"""The ``kubernetes`` deploy target: one server for every live model, each pinned by its verified digest.

    deployments/kubernetes/<version>-<digest12>/{model/, model.sig, attestation.dsse.json,
                                                 manifests.yaml, DEPLOYMENT.json}

The manifests (secure_ml.release.k8s_render, configured by release.yaml ``kubernetes``) render ONE
server with every model live on this target (the release passes them in ``config["live_models"]``,
from secure_ml.release.deployed.live_models: one live version per model, never a revoked one) and
the model being deployed, exactly as ``secure-ml k8s render --model NAME DIGEST`` repeated would; they are
validated in strict mode and by the Rego admission policy before anything is written; the model
directory is copied onto the models volume and the manifests applied by the platform. The pod's
init container re-verifies the model against the pinned digest, so no health check runs here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_ml.release import k8s_render
from secure_ml.release.deployed import HealthResult
from secure_ml.security.verification import TrustPolicy

MANIFESTS = "manifests.yaml"


class KubernetesTarget:
    name = "kubernetes"

    def write(self, staging: Path, *, version: str, model_digest: str, config: Mapping[str, Any]) -> dict[str, str]:
        kubernetes = dict(config.get("kubernetes") or {})
        name = str(config.get("served_name") or (config.get("serving") or {}).get("model_name")
                   or k8s_render.DEFAULT_MODEL_NAME)
        others = [k8s_render.PinnedModel(m.name, m.version, m.digest) for m in config.get("live_models") or []
                  if m.name != name]
        manifests = k8s_render.render(kubernetes, models=[*others, k8s_render.PinnedModel(name, version, model_digest)])
        # With a trust policy, the release passes the digests its verified deployment statements admit
        # (secure_ml.release.signed.SignedDecisions.admitted_digests); before one exists, the one just verified.
        admitted = config.get("admitted_model_digests")
        k8s_render.validate(manifests, signed_digests=list(admitted) if admitted is not None else
                            [*(m.digest for m in others), model_digest],
                            kubernetes_version=str(kubernetes.get("kubernetes_version", "1.33")))
        (staging / MANIFESTS).write_text(k8s_render.to_yaml(manifests))
        return {"manifests": MANIFESTS}

    def activate(self, root: Path, location: Path, *, version: str, model_digest: str) -> None:
        return None  # applied by the platform (kubectl / GitOps); the init container verifies in the pod

    def health(self, location: Path, *, trust: TrustPolicy) -> HealthResult | None:
        return None

    def clear(self, root: Path) -> None:
        return None
