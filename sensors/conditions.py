"""Automation conditions and freshness, applied to the assets every stage defines.

    assets = map_assets(assets)      # secure_ml/definitions.py calls this on the loaded assets

Every asset in ``conditions.groups`` (data, training, security) that has upstream assets gets

    AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()

so it is brought up to date when an upstream asset changes, and only when every blocking check
on its upstream assets passed (or will run first in the same run, where a failure stops it). The
``asset_automation`` sensor evaluates these conditions every ``conditions.interval_seconds``.
Release assets carry no condition: registering and deploying are deliberate, approved acts.

``deployment`` gets a time-window freshness policy (``freshness.deployment_fail_hours`` /
``deployment_warn_hours``): the daemon marks a model deployed longer ago than that WARN / FAIL
in the UI. An asset whose stage set no owners gets its group's owners (``conditions.owners``), and
one with no kinds the kinds of the stage contract, so the UI always says who answers for an asset
and what it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import dagster as dg

from secure_ml.errors import ConfigurationError
from sensors._shared import seconds, section, sensor_status

_CONDITIONS = section("conditions")
_FRESHNESS = section("freshness")
AUTOMATED_GROUPS: frozenset[str] = frozenset(_CONDITIONS.get("groups") or ("data", "training", "security"))
GROUP_OWNERS: dict[str, list[str]] = {str(k): list(v) for k, v in (_CONDITIONS.get("owners") or {}).items()}
FRESH_ASSETS = (dg.AssetKey("deployment"),)
#: Kinds from the stage contract (assets/__init__.py) for an asset whose stage set none.
CONTRACT_KINDS: dict[str, set[str]] = {
    "dataset": {"parquet"}, "validated_dataset": {"json"}, "trained_model": {"pytorch", "safetensors"},
    "model_evaluation": {"json"}, "scan_report": {"json"}, "model_signature": {"sigstore"},
    "attestation": {"in-toto"}, "registered_model": {"json"}, "deployment": {"kubernetes"},
}

ADVANCE_WHEN_CHECKS_PASS = (
    dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("eager, once every upstream blocking check passed")

DEPLOYMENT_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=timedelta(hours=float(_FRESHNESS.get("deployment_fail_hours", 168))),
    warn_window=timedelta(hours=float(_FRESHNESS.get("deployment_warn_hours", 120))),
)


def _mapped(spec: dg.AssetSpec) -> dg.AssetSpec:
    changes: dict[str, Any] = {}
    if spec.group_name in AUTOMATED_GROUPS and spec.deps and spec.automation_condition is None:
        changes["automation_condition"] = ADVANCE_WHEN_CHECKS_PASS
    if spec.key in FRESH_ASSETS and spec.freshness_policy is None:
        changes["freshness_policy"] = DEPLOYMENT_FRESHNESS
    if not spec.owners and GROUP_OWNERS.get(spec.group_name or ""):
        changes["owners"] = GROUP_OWNERS[spec.group_name or ""]
    if not spec.kinds and spec.key.to_user_string() in CONTRACT_KINDS:
        changes["kinds"] = CONTRACT_KINDS[spec.key.to_user_string()]
    return spec.replace_attributes(**changes) if changes else spec


def map_assets(assets: Sequence[Any]) -> list[Any]:
    """The loaded assets with automation conditions, freshness policies and default owners applied."""
    out: list[Any] = []
    for item in assets:
        if isinstance(item, dg.AssetsDefinition | dg.AssetSpec):
            out.extend(dg.map_asset_specs(_mapped, [item]))
        else:  # source assets and the like: nothing to automate
            out.append(item)
    return out


asset_automation = dg.AutomationConditionSensorDefinition(
    "asset_automation",
    target=dg.AssetSelection.all(),
    default_status=sensor_status(),
    minimum_interval_seconds=seconds(_CONDITIONS.get("interval_seconds", 10), "conditions.interval_seconds"),
    run_tags={"secure_ml/trigger": "automation"},
    description="Evaluates the assets' automation conditions: downstream assets advance when upstream "
                "changed and every upstream blocking check passed.",
)

SENSORS = [asset_automation]


def executor_for(settings: Any) -> dg.ExecutorDefinition | None:
    """``in_process`` where automation.yaml ``executor.<env>`` says so; None keeps Dagster's default."""
    choice = str((section("executor").get(settings.env) or "default")).strip()
    if choice == "k8s":
        return _k8s_job_executor()
    if choice == "in_process":
        return dg.in_process_executor
    if choice in ("default", "multiprocess"):
        return None if choice == "default" else dg.multiprocess_executor
    raise ConfigurationError(f"automation.yaml: executor.{settings.env} must be in_process, multiprocess, k8s or default")


def _k8s_job_executor() -> dg.ExecutorDefinition:
    """One hardened pod per step (dagster-k8s), configured from k8s/job_executor.yaml when present."""
    from pathlib import Path

    import yaml
    from dagster_k8s import k8s_job_executor

    path = Path(__file__).resolve().parents[1] / "k8s" / "job_executor.yaml"
    if not path.exists():  # an image without the k8s/ folder: configure it per run instead
        return k8s_job_executor
    config = (yaml.safe_load(path.read_text()) or {}).get("execution", {}).get("config") or {}
    return k8s_job_executor.configured(config, name="k8s_job_executor")
