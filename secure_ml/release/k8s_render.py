"""Kubernetes manifests for the model server: one server for every deployed model, each pinned by digest.

    manifests = render(config["kubernetes"], models=[PinnedModel("german_credit", "v3", "ab12…"), ...])
    manifests = render(config["kubernetes"], version="v3", model_digest="ab12…")   # one model, default name
    validate(manifests, signed_digests=["ab12…"])     # kubernetes-validate (strict) + Rego admission
    Path("manifests.yaml").write_text(to_yaml(manifests))

What is rendered: a Deployment (non-root, read-only root filesystem, no privilege escalation, all
capabilities dropped, seccomp RuntimeDefault, resource limits, no service account token, image
pinned by digest, every model digest pinned in one annotation (comma-separated) and each checked by
its own init container running ``secure-ml verify-model --digest``; the server is started with one
``--model NAME DIR DIGEST`` per model and serves them all over /v1 and the Open Inference Protocol
v2), a ClusterIP Service, a default-deny NetworkPolicy
for the namespace plus one that admits only the configured clients on the server port, and a
PodDisruptionBudget. Each model's deployed directory (model/, model.sig, DEPLOYMENT.json) is expected on a
read-only volume (``models_claim``) under ``/models/sha256-<digest>/``; the trust anchors (public keys)
come from a ConfigMap, the server's hashed bearer tokens from a Secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import yaml

from secure_ml.custody.integrity import SHA256_HEX
from secure_ml.errors import BadInput, ConfigurationError, PolicyDenied, VerificationError
from secure_ml.release.deployed import DEFAULT_MODEL_NAME

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


class PinnedModel(NamedTuple):
    """One model the server serves: its name (/v2/models/NAME), version and signed digest (64 hex)."""

    name: str
    version: str
    digest: str


_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def _pinned(models: Sequence[PinnedModel] | None, version: str | None, model_digest: str | None) -> list[PinnedModel]:
    if models is None:
        models = [PinnedModel(DEFAULT_MODEL_NAME, str(version or ""), str(model_digest))]
    if not models:
        raise BadInput("nothing to serve: no deployed model")
    for model in models:
        if not isinstance(model.digest, str) or not SHA256_HEX.match(model.digest):
            raise BadInput(f"not a model digest: {str(model.digest)[:80]!r}")
        if not _MODEL_NAME.match(model.name):
            raise BadInput(f"model name {model.name[:70]!r} must be 1-63 lowercase letters, digits or _.-")
    if len({m.name for m in models}) != len(models) or len({m.digest for m in models}) != len(models):
        raise BadInput("each model must be served once, under one name")
    return list(models)


def _verify_container(index: int, model: PinnedModel, image: str, resources: Mapping[str, Any],
                      mounts: list[dict[str, Any]]) -> dict[str, Any]:
    path = f"{MODELS_MOUNT}/sha256-{model.digest}"
    return {
        "name": "verify-model" if index == 0 else f"verify-model-{index}",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["secure-ml"],
        # Refuses to start the pod unless the files on the volume hash to the pinned digest and
        # the signature verifies against the trust anchors: a swapped volume never serves.
        "args": ["verify-model", f"{path}/model", "--signature", f"{path}/model.sig",
                 "--public-key", f"{TRUST_MOUNT}/model-signing.pub", "--digest", f"sha256:{model.digest}"],
        "env": [{"name": "SECURE_ML_HOME", "value": f"{POD_TMP}/secure-ml"}],
        "resources": dict(resources),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }


def render(config: Mapping[str, Any], *, version: str | None = None, model_digest: str | None = None,
           models: Sequence[PinnedModel] | None = None) -> list[dict[str, Any]]:
    """The manifests for one server serving ``models`` (or the one ``model_digest`` as ``version``)."""
    cfg = {**_DEFAULTS, **dict(config)}
    served = _pinned(models, version, model_digest)
    image = str(cfg["image"])
    if "@sha256:" not in image:
        raise ConfigurationError(f"kubernetes.image must be pinned by digest (name@sha256:…), not {image!r}")
    name, namespace, port = str(cfg["name"]), str(cfg["namespace"]), int(cfg["port"])
    pinned = ",".join(f"sha256:{m.digest}" for m in served)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "secure-ml"}
    pod_labels = dict(labels)
    if len(served) == 1 and served[0].version:
        pod_labels["secure-ml.dev/model-version"] = served[0].version
    resources = {k: dict(v) for k, v in dict(cfg["resources"]).items()}
    mounts = [
        {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
        {"name": "trust", "mountPath": TRUST_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": POD_TMP},
    ]
    verifiers = [_verify_container(i, m, image, resources, mounts) for i, m in enumerate(served)]
    model_args = [arg for m in served for arg in ("--model", m.name, f"{MODELS_MOUNT}/sha256-{m.digest}",
                                                   f"sha256:{m.digest}")]
    server = {
        "name": "model-server",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["secure-ml"],
        "args": ["serve", *model_args, "--public-key", f"{TRUST_MOUNT}/model-signing.pub",
                 "--tokens", f"{TOKENS_MOUNT}/tokens.json", "--host", POD_BIND, "--port", str(port)],
        "env": [{"name": "SECURE_ML_HOME", "value": f"{POD_TMP}/secure-ml"}],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10,
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
                    "initContainers": verifiers,
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

    ``signed_digests`` are the model digests (64 hex) that verified at deploy time: every digest the
    pod pins must be one of them.
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
