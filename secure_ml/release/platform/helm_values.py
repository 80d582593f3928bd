"""The Dagster Helm chart's values: pinned to our image, checked as the chart would check them.

    values = pin_images(yaml.safe_load(Path("k8s/values.yaml").read_text()), repository, "sha256:…")
    chart = load_chart(Path("dagster"), name="dagster", version="1.13.27")   # or None: the strict model only
    check_values(values, kubernetes_version="1.33", chart=chart)   # ConfigurationError names the first refusal
    context = code_location_context(values, namespace="secure-ml-pipeline")

Two checks. (1) ``ChartValues``, always: a strict model of the sections we set (unknown keys
refused, the keys we rely on required). The chart's schema leaves ``global``, the top level and each
code location open to unknown keys, which helm would silently ignore, so a misspelt key there is
caught only here. (2) When given the chart the user pulled (``helm pull dagster/dagster --version
… --untar``; nothing of the chart is kept in this repository), the chart's own
``values.schema.json``, with jsonschema as helm validates it: Draft 7, over the chart's default
``values.yaml`` with ours laid over it (helm's coalescing: maps merged, anything else replaced,
``null`` removes), so its ``required`` lists apply as helm applies them; its Kubernetes ``$ref``s
(``kubernetesjsonschema.dev``, which cannot be reached from here or from many clusters) resolved
offline to kubernetes-validate's bundled definitions for our Kubernetes version; any other remote
``$ref`` refused in one line. Kubernetes sub-objects (security contexts, volumes, resources) are
checked by ``kubernetes_parts_as_pod`` against Kubernetes' own strict schema as well.

``code_location_context`` is the container context the chart hands to the code location
(``DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT``, template ``dagsterUserDeployments.k8sContainerContext``)
and that dagster-k8s merges into every run and step pod.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from secure_ml.custody.integrity import SHA256_HEX
from secure_ml.errors import BadInput, ConfigurationError

IMAGE_PLACEHOLDER = ("IMAGE_REPOSITORY", "IMAGE_DIGEST")
# The Kubernetes definitions a chart's values schema refers to (any version: all resolve offline to
# kubernetes-validate's definitions for our Kubernetes version).
K8S_DEFINITIONS_URL = re.compile(r"https://kubernetesjsonschema\.dev/[\w.-]+/_definitions\.json")
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


@dataclass(frozen=True)
class Chart:
    """A chart directory as ``helm pull --untar`` leaves it: its values schema and default values."""

    directory: Path
    name: str
    version: str
    schema: Path
    defaults: Path | None


def load_chart(directory: Path, *, name: str, version: str) -> Chart:
    """The chart at ``directory``, which must be chart ``name`` at ``version`` and carry a values schema."""
    meta_path = directory / "Chart.yaml"
    try:
        meta = yaml.safe_load(meta_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"--chart {directory}: no readable Chart.yaml ({type(exc).__name__}); give the "
                                 f"directory `helm pull {name}/{name} --version {version} --untar` made") from None
    if not isinstance(meta, dict) or (str(meta.get("name")), str(meta.get("version"))) != (name, version):
        got = (meta.get("name"), meta.get("version")) if isinstance(meta, dict) else meta
        raise ConfigurationError(f"--chart {directory}: chart {got!r}, not {name} {version} (k8s/render.yaml pins it)")
    schema = directory / "values.schema.json"
    if not schema.is_file():
        raise ConfigurationError(f"--chart {directory}: the chart has no values.schema.json")
    defaults = directory / "values.yaml"
    return Chart(directory, name, version, schema, defaults if defaults.is_file() else None)


def check_values(values: Mapping[str, Any], *, kubernetes_version: str, chart: Chart | None = None) -> ChartValues:
    """The values as the chart would accept them, or ConfigurationError naming the first refusal."""
    if chart is not None:
        problems = chart_schema_problems(values, chart=chart, kubernetes_version=kubernetes_version)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigurationError(f"Helm values: {problems[0]} (the chart's values.schema.json){more}")
    try:
        return ChartValues.model_validate(dict(values))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]).replace("global_", "global")
        raise ConfigurationError(f"Helm values: {where}: {first['msg']} (strict model of the chart's values)") from None


def coalesce(defaults: Mapping[str, Any], ours: Mapping[str, Any]) -> Obj:
    """Our values laid over the chart's defaults as helm does: maps merged, anything else replaced, null removes."""
    out = copy.deepcopy(dict(defaults))
    for key, value in ours.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = coalesce(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def chart_schema_problems(values: Mapping[str, Any], *, chart: Chart, kubernetes_version: str) -> list[str]:
    """Each place the chart's values.schema.json refuses its defaults with ``values`` over them, as one line."""
    from jsonschema.exceptions import best_match
    from referencing.exceptions import Unresolvable

    validator = _chart_validator(str(chart.schema), chart.schema.stat().st_mtime_ns, kubernetes_version)
    merged = dict(values)
    if chart.defaults is not None:
        try:
            defaults = yaml.safe_load(chart.defaults.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{chart.defaults}: not YAML: {exc}".splitlines()[0]) from None
        if not isinstance(defaults, dict):
            raise ConfigurationError(f"{chart.defaults}: the chart's default values are not a mapping")
        merged = coalesce(defaults, values)
    problems = []
    try:
        errors = sorted(validator.iter_errors(merged), key=lambda e: [str(p) for p in e.absolute_path])
    except Unresolvable as exc:
        raise ConfigurationError(f"{chart.schema}: refers to {str(exc.ref)[:120]}, which is not resolved offline "
                                 f"(only kubernetesjsonschema.dev definitions are)") from None
    for error in errors:
        error = best_match([error])  # into anyOf (a section or null): the branch that explains it
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        problems.append(f"{where}: {error.message[:200]}")
    return problems


def kubernetes_definitions(kubernetes_version: str) -> Obj:
    """kubernetes-validate's definitions for ``kubernetes_version``, laid out as chart ``$ref``s expect.

    Charts refer to ``#/definitions/…`` (Kubernetes' old layout); the bundled file has ``$defs``:
    both are given. They stand in for ``https://kubernetesjsonschema.dev/<version>/_definitions.json``."""
    import kubernetes_validate

    bundled = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    definitions_file = bundled / f"v{kubernetes_version}.0-local" / "_definitions.json"
    if not definitions_file.is_file():
        raise ConfigurationError(f"kubernetes-validate has no definitions for Kubernetes {kubernetes_version}")
    definitions = json.loads(definitions_file.read_text())["$defs"]
    return {"definitions": definitions, "$defs": definitions}


@functools.lru_cache(maxsize=4)
def _chart_validator(schema_path: str, mtime_ns: int, kubernetes_version: str) -> Any:
    import jsonschema
    from referencing import Registry, Resource
    from referencing.exceptions import NoSuchResource
    from referencing.jsonschema import DRAFT7

    try:
        schema = json.loads(Path(schema_path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{schema_path}: not a JSON schema: {exc}".splitlines()[0]) from None
    definitions = DRAFT7.create_resource(kubernetes_definitions(kubernetes_version))

    def retrieve(uri: str) -> Resource[Any]:
        if K8S_DEFINITIONS_URL.fullmatch(uri):
            return definitions
        raise NoSuchResource(ref=uri)  # no network: nothing else is fetched

    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigurationError(f"{schema_path}: not a valid Draft 7 schema: {exc.message[:200]}") from None
    return jsonschema.Draft7Validator(schema, registry=Registry(retrieve=retrieve))  # type: ignore[call-arg]


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
