"""The pipeline's Kubernetes objects that are not Jobs: code location, Secrets, ConfigMaps, policies.

    cfg = RenderConfig.load(Path("k8s"))
    objects = [*static_manifests(cfg), *network_policies(cfg), *secrets_and_config_maps(cfg, values),
               *code_location_objects(cfg, values)]

What is rendered: the namespaces and service accounts of ``k8s/manifests/``; the training
namespace's objects and the training launcher's RBAC (``k8s/training-pod.yaml``); the NetworkPolicies
(default deny, then each pod's egress from its ``secure-ml.dev/egress`` label: ``events`` = DNS +
PostgreSQL, ``events-api`` = that + the API server's endpoints, ``none`` = nothing); the Secrets and
the artifacts volume claim the pods name (secret values are never here: each Secret says in an
annotation where its keys come from, and has no data); and the code location's Deployment and
Service as the Dagster chart renders them from the values (template ``deployment-user.yaml``).
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from secure_ml.errors import ConfigurationError
from secure_ml.release.platform import helm_values

Obj = dict[str, Any]
EGRESS_LABEL = "secure-ml.dev/egress"
EGRESS_CLASSES = ("none", "events", "events-api")
SOURCE_ANNOTATION = "secure-ml.dev/value-from"


@dataclass(frozen=True)
class RenderConfig:
    """k8s/render.yaml, parsed once; unknown keys refused."""

    k8s_dir: Path
    image_repository: str
    chart: Mapping[str, str]
    namespace: str
    kubernetes_version: str
    api_server_endpoints: tuple[tuple[str, int], ...]
    postgres_labels: Mapping[str, str]
    postgres_port: int
    webserver_clients_namespace: str
    steps: tuple[str, ...]

    @classmethod
    def load(cls, k8s_dir: Path) -> RenderConfig:
        path = k8s_dir / "render.yaml"
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"{path}: cannot read it: {exc}".splitlines()[0]) from None
        known = {"image_repository", "chart", "namespace", "kubernetes_version", "api_server_endpoints",
                 "postgres", "webserver_clients_namespace", "steps"}
        if set(raw) != known:
            raise ConfigurationError(f"{path}: keys must be {sorted(known)}; unknown {sorted(set(raw) - known)}, "
                                     f"missing {sorted(known - set(raw))}")
        endpoints = []
        for item in raw["api_server_endpoints"] or []:
            try:
                cidr, port = str(ipaddress.ip_network(str(item["cidr"]))), int(item["port"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigurationError(f"{path}: api_server_endpoints: {item!r} is not {{cidr, port}}: {exc}") from None
            endpoints.append((cidr, port))
        if not endpoints:
            raise ConfigurationError(f"{path}: api_server_endpoints is empty (the run worker must reach the API server)")
        steps = tuple(str(s) for s in raw["steps"] or [])
        if not steps or len(set(steps)) != len(steps):
            raise ConfigurationError(f"{path}: steps must list each asset once")
        return cls(k8s_dir=k8s_dir, image_repository=str(raw["image_repository"]), chart=dict(raw["chart"]),
                   namespace=str(raw["namespace"]), kubernetes_version=str(raw["kubernetes_version"]),
                   api_server_endpoints=tuple(endpoints), postgres_labels=dict(raw["postgres"]["pod_labels"]),
                   postgres_port=int(raw["postgres"]["port"]),
                   webserver_clients_namespace=str(raw["webserver_clients_namespace"]), steps=steps)

    def load_yaml(self, name: str) -> Any:
        return yaml.safe_load((self.k8s_dir / name).read_text())


def static_manifests(cfg: RenderConfig) -> list[Obj]:
    """k8s/manifests/*.yaml: namespaces and the step service account."""
    out: list[Obj] = []
    for path in sorted((cfg.k8s_dir / "manifests").glob("*.yaml")):
        out.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def training_manifests(cfg: RenderConfig) -> list[Obj]:
    """k8s/training-pod.yaml after its first document (the pod's own config): the training namespace's
    account, deny-all NetworkPolicy and exchange claim, and the launcher's account, Role and RoleBinding."""
    path = cfg.k8s_dir / "training-pod.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if not docs or "training_sandbox_k8s_config" not in docs[0]:
        raise ConfigurationError(f"{path}: the first document must be training_sandbox_k8s_config")
    return docs[1:]


def _policy(cfg: RenderConfig, name: str, selector: Obj, spec: Obj) -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": cfg.namespace, "labels": {"app.kubernetes.io/part-of": "secure-ml"}},
            "spec": {"podSelector": selector, **spec}}


def network_policies(cfg: RenderConfig) -> list[Obj]:
    """Default deny; ingress to the code location and webserver; egress per ``secure-ml.dev/egress``."""
    dns = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    postgres = {"to": [{"podSelector": {"matchLabels": dict(cfg.postgres_labels)}}],
                "ports": [{"protocol": "TCP", "port": cfg.postgres_port}]}
    # Policies match after Service translation on most CNIs: name the API server's endpoints, not
    # the `kubernetes` Service IP, or the run worker can never create a step Job.
    api = [{"to": [{"ipBlock": {"cidr": cidr}}], "ports": [{"protocol": "TCP", "port": port}]}
           for cidr, port in cfg.api_server_endpoints]
    code_location = {"matchLabels": {"component": "user-deployments", "deployment": "secure-ml"}}
    return [
        _policy(cfg, "default-deny-all", {}, {"policyTypes": ["Ingress", "Egress"]}),
        _policy(cfg, "code-location-from-dagster", code_location, {
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                {"key": "component", "operator": "In", "values": ["dagster-webserver", "dagster-daemon"]}]}}],
                "ports": [{"protocol": "TCP", "port": 3030}]}]}),
        _policy(cfg, "webserver-from-ingress", {"matchLabels": {"component": "dagster-webserver"}}, {
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": cfg.webserver_clients_namespace}}}],
                "ports": [{"protocol": "TCP", "port": 3000}]}]}),
        _policy(cfg, "egress-events", {"matchExpressions": [
            {"key": EGRESS_LABEL, "operator": "In", "values": ["events", "events-api"]}]},
            {"policyTypes": ["Egress"], "egress": [dns, postgres]}),
        _policy(cfg, "egress-code-location-events", code_location,
                {"policyTypes": ["Egress"], "egress": [dns, postgres]}),
        _policy(cfg, "egress-api-server", {"matchLabels": {EGRESS_LABEL: "events-api"}},
                {"policyTypes": ["Egress"], "egress": api}),
        _policy(cfg, "egress-code-location", {"matchExpressions": [
            {"key": "component", "operator": "In", "values": ["dagster-webserver", "dagster-daemon"]}]},
            {"policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": code_location}],
                                                    "ports": [{"protocol": "TCP", "port": 3030}]}]}),
    ]


def _secret(cfg: RenderConfig, name: str, keys: Mapping[str, str], *, kind: str = "Secret",
            namespace: str | None = None) -> Obj:
    """A Secret (or ConfigMap) with no values: the annotation says where each key comes from."""
    extra = {"type": "Opaque"} if kind == "Secret" else {}
    return {"apiVersion": "v1", "kind": kind, **extra,
            "metadata": {"name": name, "namespace": namespace or cfg.namespace,
                         "labels": {"app.kubernetes.io/part-of": "secure-ml"},
                         "annotations": {SOURCE_ANNOTATION: json.dumps(dict(keys), sort_keys=True)}}}


def model_server_inputs(cfg: RenderConfig, server: Mapping[str, Any]) -> list[Obj]:
    """The model server's trust anchors and hashed tokens (release.yaml ``kubernetes``), as references."""
    namespace = str(server.get("namespace", "secure-ml"))
    return [
        _secret(cfg, str(server.get("trust_config_map", "secure-ml-trust")),
                {"model-signing.pub": "the model signer's public key (its key store or KMS)"},
                kind="ConfigMap", namespace=namespace),
        _secret(cfg, str(server.get("tokens_secret", "secure-ml-serving-tokens")),
                {"tokens.json": "hashed bearer tokens (secure-ml serve --issue-token NAME)"}, namespace=namespace),
    ]


def secrets_and_config_maps(cfg: RenderConfig, values: Mapping[str, Any]) -> list[Obj]:
    """Every Secret and volume claim the pipeline's pods name; values left as references."""
    location = helm_values.code_location(values)
    declared = {s["name"] for s in location.get("envSecrets") or []}
    sources = {
        values["global"]["postgresqlSecretName"]: {
            "postgresql-password": "the PostgreSQL role's password (KMS / External Secrets)"},
        "secure-ml-kek": {"SECURE_ML_KEK": "the key-encryption key, base64 (KMS / External Secrets)"},
        # Mounted as a file by the signing steps' pods alone (their dagster-k8s/config op tags,
        # resources/security.py); no other pod names it.
        "secure-ml-signing-key": {"model-signing.pem": "the pipeline's model-signing private key, PEM "
                                                       "(KMS / External Secrets)"},
        "secure-ml-postgres": {"DAGSTER_PG_HOST": "PostgreSQL host", "DAGSTER_PG_PORT": "PostgreSQL port",
                               "DAGSTER_PG_USER": "PostgreSQL role", "DAGSTER_PG_DB": "database name"},
    }
    unknown = declared - set(sources)
    if unknown:
        raise ConfigurationError(f"Helm values name Secrets render does not know: {sorted(unknown)}")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in location.get("volumes") or []
              if "persistentVolumeClaim" in v]
    pvcs = [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": claim, "namespace": cfg.namespace, "labels": {"app.kubernetes.io/part-of": "secure-ml"}},
             # Shared by the code location and every run and step pod, on any node.
             "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}}}}
            for claim in claims]
    return [*(_secret(cfg, name, keys) for name, keys in sources.items()), *pvcs]


def code_location_objects(cfg: RenderConfig, values: Mapping[str, Any]) -> list[Obj]:
    """The code location's Deployment and Service, as chart template ``deployment-user.yaml`` renders them."""
    location = helm_values.code_location(values)
    name, port = location["name"], int(location["port"])
    image = helm_values.chart_image(location["image"])
    selector = {"app.kubernetes.io/name": "dagster", "app.kubernetes.io/instance": helm_values.RELEASE,
                "component": "user-deployments", "deployment": name}
    context = helm_values.code_location_context(values, namespace=cfg.namespace)
    env: list[Obj] = [
        {"name": "DAGSTER_CURRENT_IMAGE", "value": image},
        {"name": "DAGSTER_PG_PASSWORD", "valueFrom": {"secretKeyRef": {
            "name": values["global"]["postgresqlSecretName"], "key": "postgresql-password"}}},
        {"name": "DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT", "value": json.dumps(context, sort_keys=True)},
        *copy.deepcopy(location.get("env") or []),
    ]
    env_from: list[Obj] = [
        {"configMapRef": {"name": f"{helm_values.RELEASE}-user-deployments-shared-env"}},
        {"configMapRef": {"name": f"{helm_values.RELEASE}-{name}-user-env"}},
        *({"configMapRef": dict(c)} for c in location.get("envConfigMaps") or []),
        *({"secretRef": dict(s)} for s in location.get("envSecrets") or []),
    ]
    probe = {k: v for k, v in (location.get("readinessProbe") or {}).items() if k != "enabled"}
    container: Obj = {
        "name": "dagster", "image": image, "imagePullPolicy": location["image"].get("pullPolicy", "IfNotPresent"),
        "securityContext": copy.deepcopy(location["securityContext"]),
        "args": ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(port), *location["dagsterApiGrpcArgs"]],  # nosec B104
        "env": env, "envFrom": env_from, "resources": copy.deepcopy(location["resources"]),
        "readinessProbe": {"exec": {"command": ["dagster", "api", "grpc-health-check", "-p", str(port)]}, **probe},
        **({"livenessProbe": {"exec": {"command": ["dagster", "api", "grpc-health-check", "-p", str(port)]},
                              **location["livenessProbe"]}} if location.get("livenessProbe") else {}),
        "volumeMounts": copy.deepcopy(location.get("volumeMounts") or []),
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{helm_values.RELEASE}-{name}", "namespace": cfg.namespace, "labels": dict(selector)},
        "spec": {"replicas": 1, "selector": {"matchLabels": dict(selector)},
                 "template": {"metadata": {"labels": {**selector, **(location.get("labels") or {})}},
                              "spec": {"serviceAccountName": values["global"]["serviceAccountName"],
                                       "securityContext": copy.deepcopy(location["podSecurityContext"]),
                                       "containers": [container],
                                       "volumes": copy.deepcopy(location.get("volumes") or [])}}},
    }
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": cfg.namespace, "labels": dict(selector)},
               "spec": {"type": "ClusterIP", "selector": dict(selector),
                        "ports": [{"name": "grpc", "port": port, "protocol": "TCP", "targetPort": port}]}}
    return [deployment, service]
