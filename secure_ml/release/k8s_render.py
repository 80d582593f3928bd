"""Kubernetes manifests for the model server, pinned to one verified model digest.

    manifests = render(config["kubernetes"], version="v3", model_digest="ab12…")
    validate(manifests, signed_digests=["ab12…"])     # kubernetes-validate (strict) + Rego admission
    Path("manifests.yaml").write_text(to_yaml(manifests))

What is rendered: a Deployment (non-root, read-only root filesystem, no privilege escalation, all
capabilities dropped, seccomp RuntimeDefault, resource limits, no service account token, image
pinned by digest, the model digest pinned in an annotation and checked by an init container
running ``secure-ml verify-model --digest``), a ClusterIP Service, a default-deny NetworkPolicy
for the namespace plus one that admits only the configured clients on the server port, and a
PodDisruptionBudget. The model directory and its signature bundle are expected on a read-only
volume (``models_claim``) under ``/models/sha256-<digest>/``; the trust anchors (public keys)
come from a ConfigMap, the server's hashed bearer tokens from a Secret.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from secure_ml.errors import BadInput, ConfigurationError, PolicyDenied, VerificationError

ANNOTATION = "secure-ml.dev/model-digest"
MODELS_MOUNT = "/models"
TRUST_MOUNT = "/etc/secure-ml/trust"
TOKENS_MOUNT = "/etc/secure-ml/tokens"
UID = 10001
# In the pod: an in-memory emptyDir private to the pod (not a shared host /tmp).
POD_TMP = "/tmp"  # nosec B108
# In the pod the server must listen on the pod IP; the NetworkPolicy decides who reaches it.
POD_BIND = "0.0.0.0"  # nosec B104

_DEFAULTS: dict[str, Any] = {
    "namespace": "secure-ml",
    "name": "secure-ml-model",
    "image": "",
    "replicas": 2,
    "port": 8080,
    "allowed_client_labels": {"app.kubernetes.io/name": "secure-ml-gateway"},
    "models_claim": "secure-ml-models",
    "trust_config_map": "secure-ml-trust",
    "tokens_secret": "secure-ml-serving-tokens",  # nosec B105 - a Secret's name, not a secret
    "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
}


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def render(config: Mapping[str, Any], *, version: str, model_digest: str) -> list[dict[str, Any]]:
    """The manifests for serving ``model_digest`` (a 64-hex digest) as ``version``."""
    cfg = {**_DEFAULTS, **dict(config)}
    if not isinstance(model_digest, str) or len(model_digest) != 64 or not all(c in "0123456789abcdef" for c in model_digest):
        raise BadInput(f"not a model digest: {str(model_digest)[:80]!r}")
    image = str(cfg["image"])
    if "@sha256:" not in image:
        raise ConfigurationError(f"kubernetes.image must be pinned by digest (name@sha256:…), not {image!r}")
    name, namespace, port = str(cfg["name"]), str(cfg["namespace"]), int(cfg["port"])
    pinned = f"sha256:{model_digest}"
    model_path = f"{MODELS_MOUNT}/sha256-{model_digest}"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "secure-ml"}
    pod_labels = {**labels, "secure-ml.dev/model-version": version}
    resources = {k: dict(v) for k, v in dict(cfg["resources"]).items()}
    mounts = [
        {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
        {"name": "trust", "mountPath": TRUST_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": POD_TMP},
    ]
    verify = {
        "name": "verify-model",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["secure-ml"],
        # Refuses to start the pod unless the files on the volume hash to the pinned digest and
        # the signature verifies against the trust anchors: a swapped volume never serves.
        "args": ["verify-model", f"{model_path}/model", "--signature", f"{model_path}/model.sig",
                 "--public-key", f"{TRUST_MOUNT}/model-signing.pub", "--digest", pinned],
        "env": [{"name": "SECURE_ML_HOME", "value": f"{POD_TMP}/secure-ml"}],
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    server = {
        "name": "model-server",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["secure-ml"],
        "args": ["serve", "--model-dir", model_path, "--digest", pinned,
                 "--public-key", f"{TRUST_MOUNT}/model-signing.pub",
                 "--tokens", f"{TOKENS_MOUNT}/tokens.json", "--host", POD_BIND, "--port", str(port)],
        "env": [{"name": "SECURE_ML_HOME", "value": f"{POD_TMP}/secure-ml"}],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": [*mounts, {"name": "tokens", "mountPath": TOKENS_MOUNT, "readOnly": True}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "annotations": {ANNOTATION: pinned}},
        "spec": {
            "replicas": int(cfg["replicas"]),
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {ANNOTATION: pinned}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "initContainers": [verify],
                    "containers": [server],
                    "volumes": [
                        {"name": "models", "persistentVolumeClaim": {"claimName": str(cfg["models_claim"]),
                                                                     "readOnly": True}},
                        {"name": "trust", "configMap": {"name": str(cfg["trust_config_map"])}},
                        {"name": "tokens", "secret": {"secretName": str(cfg["tokens_secret"])}},
                        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"type": "ClusterIP", "selector": labels,
                 "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]},
    }
    default_deny = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "default-deny-all", "namespace": namespace, "labels": labels},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }
    allow_clients = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-allow-clients", "namespace": namespace, "labels": labels},
        "spec": {
            "podSelector": {"matchLabels": labels},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": dict(cfg["allowed_client_labels"])}}],
                "ports": [{"protocol": "TCP", "port": port}],
            }],
        },
    }
    budget = {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}},
    }
    return [deployment, service, default_deny, allow_clients, budget]


def validate(manifests: Sequence[Mapping[str, Any]], *, signed_digests: Sequence[str],
             kubernetes_version: str = "1.33", annotation: str = ANNOTATION,
             model_namespaces: Sequence[str] = ("secure-ml",)) -> None:
    """kubernetes-validate in strict mode, then the Rego admission policy; raise on the first bad object.

    ``signed_digests`` are the model digests (64 hex) that verified at deploy time.
    """
    import kubernetes_validate

    from secure_ml.governance.policy import PolicyEngine

    namespaces = {*model_namespaces, *(str((m.get("metadata") or {}).get("namespace", "")) for m in manifests)} - {""}
    engine = PolicyEngine({"admission": {"model_digest_annotation": annotation, "model_namespaces": sorted(namespaces),
                                         "signed_model_digests": [f"sha256:{d}" for d in signed_digests]}})
    for manifest in manifests:
        what = f"{manifest.get('kind', '?')}/{(manifest.get('metadata') or {}).get('name', '?')}"
        try:
            kubernetes_validate.validate(dict(manifest), kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path) or "(top)"
            raise VerificationError(f"{what} is not a valid Kubernetes {kubernetes_version} object at {path}: "
                                    f"{str(exc.message)[:200]}") from None
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            raise VerificationError(f"{what}: {getattr(exc, 'message', exc)}") from None
        decision = engine.decide("admission", dict(manifest))
        if not decision.allowed:
            raise PolicyDenied(f"admission policy refuses {what}: " + "; ".join(decision.reasons))


def to_yaml(manifests: Sequence[Mapping[str, Any]]) -> str:
    return yaml.safe_dump_all([dict(m) for m in manifests], sort_keys=False)
