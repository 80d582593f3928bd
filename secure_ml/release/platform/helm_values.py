"""The Dagster Helm chart's values: pinned to our image, checked against the chart's values schema.

    values = pin_images(yaml.safe_load(Path("k8s/values.yaml").read_text()), repository, "sha256:…")
    check_values(values)             # raises ConfigurationError naming the first key the chart refuses
    context = code_location_context(values, namespace="secure-ml-pipeline")

``ChartValues`` is a strict model (unknown keys refused) of the chart's ``values.schema.json`` for the
chart version in k8s/render.yaml, written from the chart's own schema source
(``helm/dagster/schema/schema/charts`` in the dagster repository, the pydantic models the chart's
values.schema.json is generated from). Neither helm nor the chart can be had from the package
registries this project uses, so the schema is modelled, not vendored: k8s/README.md says so.
Kubernetes sub-objects (security contexts, volumes, resources) are checked by
``kubernetes_parts_as_pod`` against Kubernetes' own schema instead.

``code_location_context`` is the container context the chart hands to the code location
(``DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT``, template ``dagsterUserDeployments.k8sContainerContext``)
and that dagster-k8s merges into every run and step pod.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from secure_ml.custody.integrity import SHA256_HEX
from secure_ml.errors import BadInput, ConfigurationError

IMAGE_PLACEHOLDER = ("IMAGE_REPOSITORY", "IMAGE_DIGEST")
# The chart's fullname for release `dagster` of chart `dagster` (release name contains the chart name).
RELEASE = "dagster"

Obj = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Image(_Strict):
    repository: str
    tag: str
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None


class _PodParts(_Strict):
    """Keys every Dagster pod section shares (values: Kubernetes objects, checked as a Pod)."""

    env: dict[str, str] | list[Obj] | None = None
    envConfigMaps: list[Obj] | None = None
    envSecrets: list[Obj] | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    nodeSelector: Obj | None = None
    affinity: Obj | None = None
    tolerations: list[Obj] | None = None
    podSecurityContext: Obj | None = None
    securityContext: Obj | None = None
    resources: Obj | None = None
    livenessProbe: Obj | None = None
    startupProbe: Obj | None = None
    volumeMounts: list[Obj] | None = None
    volumes: list[Obj] | None = None
    schedulerName: str | None = None


class IncludeConfig(_Strict):
    enabled: bool


class UserDeployment(_PodParts):
    name: str
    image: Image
    dagsterApiGrpcArgs: list[str] | None = None
    codeServerArgs: list[str] | None = None
    includeConfigInLaunchedRuns: IncludeConfig | None = None
    port: int
    readinessProbe: Obj | None = None


class UserDeployments(_Strict):
    enabled: bool
    enableSubchart: bool
    imagePullSecrets: list[Obj] | None = None
    deployments: list[UserDeployment] = Field(min_length=1)


class Service(_Strict):
    type: str | None = None
    port: int
    annotations: dict[str, str] | None = None


class Webserver(_PodParts):
    replicaCount: int | None = None
    image: Image | None = None
    nameOverride: str | None = None
    pathPrefix: str | None = None
    service: Service | None = None
    workspace: Obj | None = None
    deploymentLabels: dict[str, str] | None = None
    readinessProbe: Obj | None = None
    enableReadOnly: bool | None = None
    dbStatementTimeout: int | None = None
    dbPoolRecycle: int | None = None
    logLevel: str | None = None


class Daemon(_PodParts):
    enabled: bool | None = None
    image: Image | None = None
    runCoordinator: Obj | None = None
    heartbeatTolerance: int | None = None
    deploymentLabels: dict[str, str] | None = None
    readinessProbe: Obj | None = None
    runMonitoring: Obj | None = None
    runRetries: Obj | None = None
    sensors: Obj | None = None
    schedules: Obj | None = None


class RunK8sConfig(_Strict):
    containerConfig: Obj | None = None
    podSpecConfig: Obj | None = None
    podTemplateSpecMetadata: Obj | None = None
    jobSpecConfig: Obj | None = None
    jobMetadata: Obj | None = None


class K8sRunLauncherConfig(_Strict):
    image: Image | None = None
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"]
    jobNamespace: str | None = None
    loadInclusterConfig: bool
    kubeconfigFile: str | None = None
    envConfigMaps: list[Obj]
    envSecrets: list[Obj]
    envVars: list[str]
    volumeMounts: list[Obj]
    volumes: list[Obj]
    labels: dict[str, str] | None = None
    failPodOnRunFailure: bool | None = None
    resources: Obj | None = None
    schedulerName: str | None = None
    securityContext: Obj | None = None
    runK8sConfig: RunK8sConfig | None = None


class RunLauncherConfig(_Strict):
    k8sRunLauncher: K8sRunLauncherConfig


class RunLauncher(_Strict):
    type: Literal["K8sRunLauncher"]
    config: RunLauncherConfig


class PostgresService(_Strict):
    port: int


class PostgreSQL(_Strict):
    enabled: bool
    image: Obj | None = None
    postgresqlScheme: str | None = None
    postgresqlHost: str
    postgresqlUsername: str
    postgresqlPassword: str | None = None
    postgresqlDatabase: str
    postgresqlParams: Obj | None = None
    service: PostgresService


class Global(_Strict):
    postgresqlSecretName: str
    dagsterHome: str
    serviceAccountName: str
    celeryConfigSecretName: str | None = None
    dagsterInstanceConfigMap: str | None = None


class Telemetry(_Strict):
    enabled: bool


class Busybox(_Strict):
    image: Image


class ComputeLogManager(_Strict):
    type: Literal["NoOpComputeLogManager", "AzureBlobComputeLogManager", "GCSComputeLogManager",
                  "S3ComputeLogManager", "CustomComputeLogManager"]
    config: Obj | None = None


class ChartValues(_Strict):
    """The top-level keys the chart's values schema allows; the sections we set are modelled in full."""

    global_: Global = Field(alias="global")
    telemetry: Telemetry
    busybox: Busybox
    computeLogManager: ComputeLogManager
    dagster_user_deployments: UserDeployments = Field(alias="dagster-user-deployments")
    runLauncher: RunLauncher
    dagsterWebserver: Webserver
    dagsterDaemon: Daemon
    postgresql: PostgreSQL
    generatePostgresqlPasswordSecret: Literal[False]
    # Allowed by the chart, not used here (left unmodelled: any value the chart accepts).
    generateCeleryConfigSecret: bool | None = None
    rabbitmq: Obj | None = None
    redis: Obj | None = None
    flower: Obj | None = None
    ingress: Obj | None = None
    imagePullSecrets: list[Obj] | None = None
    scheduler: Obj | None = None
    pythonLogs: Obj | None = None
    migrate: Obj | None = None
    serviceAccount: Obj | None = None
    retention: Obj | None = None
    additionalInstanceConfig: Obj | None = None


def check_values(values: Mapping[str, Any]) -> ChartValues:
    """The values as the chart would accept them, or ConfigurationError naming the first bad key."""
    try:
        return ChartValues.model_validate(dict(values))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]).replace("global_", "global")
        raise ConfigurationError(f"Helm values: {where}: {first['msg']} (chart schema)") from None


def image_ref(repository: str, digest: str) -> str:
    """``repository@sha256:<hex>`` for a ``sha256:<hex>`` digest; BadInput for anything else."""
    hexpart = digest.removeprefix("sha256:")
    if not digest.startswith("sha256:") or not SHA256_HEX.match(hexpart):
        raise BadInput(f"not an image digest (sha256:<64 hex>): {digest[:80]!r}")
    if not repository or "@" in repository or ":" in repository.rsplit("/", 1)[-1]:
        raise ConfigurationError(f"image_repository must be a name without tag or digest, not {repository!r}")
    return f"{repository}@{digest}"


def pin_images(values: Mapping[str, Any], repository: str, digest: str) -> Obj:
    """A copy of ``values`` with every placeholder image set to ``repository@digest``.

    The chart writes images as ``repository:tag``; ``repository@sha256`` and tag ``<hex>`` make that
    ``repository@sha256:<hex>``, an image pinned by digest.
    """
    ref = image_ref(repository, digest)
    pinned = copy.deepcopy(dict(values))
    found = 0

    def visit(node: Any) -> None:
        nonlocal found
        if isinstance(node, dict):
            if (node.get("repository"), node.get("tag")) == IMAGE_PLACEHOLDER:
                node["repository"], node["tag"] = ref.rsplit(":", 1)[0], digest.removeprefix("sha256:")
                found += 1
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(pinned)
    if not found:
        raise ConfigurationError("Helm values: no image placeholder (IMAGE_REPOSITORY / IMAGE_DIGEST) to pin")
    return pinned


def chart_image(image: Mapping[str, Any]) -> str:
    """The image string the chart renders from an ``image`` section (``repository:tag``)."""
    return f"{image['repository']}:{image['tag']}"


def code_location(values: Mapping[str, Any]) -> Obj:
    return dict(values["dagster-user-deployments"]["deployments"][0])


def code_location_context(values: Mapping[str, Any], *, namespace: str) -> Obj:
    """The chart's ``DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT`` for the code location, as a dict."""
    location = code_location(values)
    k8s: Obj = {
        "image_pull_policy": location["image"].get("pullPolicy"),
        "env_config_maps": [f"{RELEASE}-{location['name']}-user-env",
                            *(c["name"] for c in location.get("envConfigMaps") or [] if "name" in c)],
    }
    if location.get("envSecrets"):
        k8s["env_secrets"] = [s["name"] for s in location["envSecrets"] if "name" in s]
    for key, ours in (("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("labels", "labels"),
                      ("resources", "resources"), ("schedulerName", "scheduler_name")):
        if location.get(key):
            k8s[ours] = copy.deepcopy(location[key])
    k8s["namespace"] = namespace
    k8s["service_account_name"] = values["global"]["serviceAccountName"]
    if isinstance(location.get("env"), list) and location["env"]:
        k8s["env"] = copy.deepcopy(location["env"])
    run_k8s_config: Obj = {"pod_spec_config": {"automount_service_account_token": True}}
    if location.get("annotations"):
        run_k8s_config["pod_template_spec_metadata"] = {"annotations": dict(location["annotations"])}
    k8s["run_k8s_config"] = run_k8s_config
    return {"k8s": k8s}


def kubernetes_parts_as_pod(section: Mapping[str, Any], *, name: str, namespace: str) -> Obj:
    """A Pod carrying one values section's Kubernetes objects, for strict schema validation."""
    container: Obj = {"name": "check", "image": "check"}
    for key in ("securityContext", "resources", "volumeMounts", "livenessProbe", "startupProbe"):
        if section.get(key):
            container[key] = copy.deepcopy(section[key])
    if isinstance(section.get("env"), list):
        container["env"] = copy.deepcopy(section["env"])
    spec: Obj = {"containers": [container]}
    for key, ours in (("podSecurityContext", "securityContext"), ("volumes", "volumes"),
                      ("nodeSelector", "nodeSelector"), ("affinity", "affinity"), ("tolerations", "tolerations")):
        if section.get(key):
            spec[ours] = copy.deepcopy(section[key])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}, "spec": spec}
