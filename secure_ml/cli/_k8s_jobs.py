"""The run worker's and each step's Kubernetes Job, built by dagster-k8s's own code.

    jobs = run_and_step_jobs(values, executor_config, image="repo@sha256:…", namespace="secure-ml-pipeline",
                             steps=["dataset", "trained_model"])

Merged exactly as the K8sRunLauncher and the k8s_job_executor's step handler merge them
(``K8sContainerContext.create_for_run`` then ``_get_container_context``): the run launcher's config
from the Helm values, then the code location's container context (what the chart passes as
``DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT``), then the executor's ``step_k8s_config`` and its
``per_step_k8s_config`` entry; ``construct_dagster_k8s_job`` builds the Job. Lives in the CLI, the
composition point, because dagster-k8s is Dagster; the core renders everything else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from secure_ml.errors import ConfigurationError
from secure_ml.release.platform import helm_values

RUN_ID = "00000000-0000-4000-8000-000000000000"  # a placeholder run: names only, never used in a cluster
JOB_NAME = "__ASSET_JOB"


def _snake(camel: Mapping[str, Any]) -> dict[str, Any]:
    import re

    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in camel.items()}


def _launcher_context(values: Mapping[str, Any]) -> Any:
    """The K8sRunLauncher half of ``create_for_run``: the chart's instance config for the launcher."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    cfg = values["runLauncher"]["config"]["k8sRunLauncher"]
    return K8sContainerContext().merge(K8sContainerContext(
        image_pull_policy=cfg.get("imagePullPolicy"),
        service_account_name=values["global"]["serviceAccountName"],
        env_config_maps=[f"{helm_values.RELEASE}-pipeline-env", *(c["name"] for c in cfg.get("envConfigMaps") or [])],
        env_secrets=[s["name"] for s in cfg.get("envSecrets") or []],
        env_vars=list(cfg.get("envVars") or []),
        volume_mounts=list(cfg.get("volumeMounts") or []),
        volumes=list(cfg.get("volumes") or []),
        labels=dict(cfg.get("labels") or {}),
        namespace=cfg.get("jobNamespace"),
        resources=cfg.get("resources"),
        scheduler_name=cfg.get("schedulerName"),
        security_context=cfg.get("securityContext"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(_snake(cfg.get("runK8sConfig") or {})),
    ))


def _run_context(values: Mapping[str, Any], namespace: str) -> Any:
    from dagster_k8s.container_context import K8sContainerContext

    location = K8sContainerContext.create_from_config(helm_values.code_location_context(values, namespace=namespace))
    return _launcher_context(values).merge(K8sContainerContext().merge(location))


def processed_executor_config(executor_config: Mapping[str, Any]) -> dict[str, Any]:
    """job_executor.yaml's ``execution.config`` through dagster-k8s's own executor config schema."""
    from dagster._config import process_config
    from dagster._config.field import resolve_to_config_type
    from dagster_k8s.executor import _K8S_EXECUTOR_CONFIG_SCHEMA

    result = process_config(resolve_to_config_type(_K8S_EXECUTOR_CONFIG_SCHEMA), dict(executor_config))
    if not result.success:
        first = result.errors[0] if result.errors else None
        raise ConfigurationError(f"k8s/job_executor.yaml: {getattr(first, 'message', 'invalid')}")
    return dict(result.value or {})


def _executor_context(exc_cfg: Mapping[str, Any]) -> Any:
    """The executor's own container context, field for field as ``k8s_job_executor`` builds it."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    return K8sContainerContext(
        image_pull_policy=exc_cfg.get("image_pull_policy"), image_pull_secrets=exc_cfg.get("image_pull_secrets"),
        service_account_name=exc_cfg.get("service_account_name"), env_config_maps=exc_cfg.get("env_config_maps"),
        env_secrets=exc_cfg.get("env_secrets"), env_vars=exc_cfg.get("env_vars"),
        volume_mounts=exc_cfg.get("volume_mounts"), volumes=exc_cfg.get("volumes"), labels=exc_cfg.get("labels"),
        namespace=exc_cfg.get("job_namespace"), resources=exc_cfg.get("resources"),
        scheduler_name=exc_cfg.get("scheduler_name"), security_context=exc_cfg.get("security_context"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(exc_cfg.get("step_k8s_config", {})),
    )


def _job_config(values: Mapping[str, Any], image: str) -> Any:
    from dagster_k8s.job import DagsterK8sJobConfig

    return DagsterK8sJobConfig(job_image=image, dagster_home=values["global"]["dagsterHome"],
                               instance_config_map=f"{helm_values.RELEASE}-instance",
                               postgres_password_secret=values["global"]["postgresqlSecretName"])


def _manifest(job: Any, namespace: str) -> dict[str, Any]:
    import kubernetes

    manifest: dict[str, Any] = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    manifest["metadata"]["namespace"] = namespace
    return manifest


def run_worker_job(values: Mapping[str, Any], *, image: str, namespace: str) -> dict[str, Any]:
    """The Job K8sRunLauncher.launch_run creates for one run."""
    from dagster_k8s.job import construct_dagster_k8s_job, get_job_name_from_run_id

    context = _run_context(values, namespace)
    name = get_job_name_from_run_id(RUN_ID)
    job = construct_dagster_k8s_job(
        job_config=_job_config(values, image), args=["dagster", "api", "execute_run", "{}"], job_name=name,
        pod_name=name, component="run_worker", user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": JOB_NAME, "dagster/run-id": RUN_ID, "dagster/code-location": "secure_ml"},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": JOB_NAME}])
    return _manifest(job, context.namespace or namespace)


def op_tags() -> dict[str, dict[str, str]]:
    """Each op's tags, asset checks' ops included, from the code location's own definitions (a signing
    step's or a training launcher's ``dagster-k8s/config``)."""
    from secure_ml.definitions import build_definitions

    graph = build_definitions().resolve_asset_graph()
    return {assets_def.op.name: dict(assets_def.op.tags or {})
            for assets_def in graph.assets_defs if assets_def.is_executable}


def step_job(values: Mapping[str, Any], exc_cfg: Mapping[str, Any], step: str, *, image: str,
             namespace: str, tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Job K8sStepHandler.launch_step creates for ``step`` (an asset's op, with its ``tags``)."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_k8s_job_name,
        get_user_defined_k8s_config,
    )

    per_step = UserDefinedDagsterK8sConfig.from_dict((exc_cfg.get("per_step_k8s_config") or {}).get(step, {}))
    context = (_run_context(values, namespace).merge(_executor_context(exc_cfg))
               # the op's own dagster-k8s/config tags (a signing step's key mount), as the step handler merges them
               .merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(dict(tags or {}))))
               .merge(K8sContainerContext(run_k8s_config=per_step)))
    name = f"dagster-step-{get_k8s_job_name(RUN_ID, step)}"
    job = construct_dagster_k8s_job(
        job_config=_job_config(values, exc_cfg.get("job_image") or image),
        args=["dagster", "api", "execute_step", "{}"], job_name=name, pod_name=name, component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": JOB_NAME, "dagster/op": step, "dagster/run-id": RUN_ID},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": JOB_NAME}, {"name": "DAGSTER_RUN_STEP_KEY", "value": step}])
    return _manifest(job, context.namespace or namespace)


def run_and_step_jobs(values: Mapping[str, Any], executor_config: Mapping[str, Any], *, image: str,
                      namespace: str, steps: Sequence[str],
                      tags: Mapping[str, Mapping[str, str]] | None = None) -> list[dict[str, Any]]:
    """The run worker's Job and each step's; ``tags``: each op's tags (default: the definitions' own)."""
    exc_cfg = processed_executor_config(executor_config)
    tags = op_tags() if tags is None else tags
    unknown = set(exc_cfg.get("per_step_k8s_config") or {}) - set(steps)
    if unknown:
        raise ConfigurationError(f"k8s/job_executor.yaml: per_step_k8s_config names no step: {sorted(unknown)}")
    # An asset check's op is a step too: the ones whose pods differ (their own dagster-k8s/config) are rendered.
    checks = sorted(op for op, t in tags.items() if op not in steps and "dagster-k8s/config" in t)
    return [run_worker_job(values, image=image, namespace=namespace),
            *(step_job(values, exc_cfg, step, image=image, namespace=namespace, tags=tags.get(step))
              for step in [*steps, *checks])]
