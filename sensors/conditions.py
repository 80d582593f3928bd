"""Automation conditions and freshness, applied to the assets every stage defines.

    assets = map_assets(assets, settings.config.automation)   # secure_ml/definitions.py
    sensor = asset_automation_sensor(settings)

Every asset in ``conditions.groups`` (data, training, security) that has upstream assets gets

    AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()
        & ~AutomationCondition.execution_failed()

so it is brought up to date when an upstream asset changes, and only when every blocking check
on its upstream assets passed (or will run first in the same run, where a failure stops it), and
never to retry a step that failed (a rejected drop stays rejected; it is not re-validated). The
``asset_automation`` sensor evaluates these conditions every ``conditions.interval_seconds``.
Release assets carry no condition: registering and deploying are deliberate, approved acts.

``deployment`` gets a time-window freshness policy (``freshness.deployment_fail_hours`` /
``deployment_warn_hours``): the daemon marks a model deployed longer ago than that WARN / FAIL
in the UI. An asset whose stage set no owners gets its group's owners (``conditions.owners``), and
one with no kinds the kinds of the stage contract, so the UI always says who answers for an asset
and what it is. automation.yaml is read when the definitions are built, never at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import dagster as dg

from secure_ml.config.models import AutomationFile
from secure_ml.settings import Settings
from sensors._shared import TRIGGER_TAG, sensor_status

#: Stage names (a key's last part: every model's ``deployment`` is fresh or stale on its own).
FRESH_ASSETS = ("deployment",)
#: Kinds from the stage contract (assets/__init__.py) for an asset whose stage set none.
CONTRACT_KINDS: dict[str, set[str]] = {
    "dataset": {"parquet"}, "validated_dataset": {"json"}, "trained_model": {"pytorch", "safetensors"},
    "model_evaluation": {"json"}, "scan_report": {"json"}, "model_signature": {"sigstore"},
    "attestation": {"in-toto"}, "registered_model": {"json"}, "deployment": {"kubernetes"},
}

# ~execution_failed: a step that refused its input (a rejected drop) is not re-run on the same input
# by automation; the next drop's own run, or a person, runs it again.
ADVANCE_WHEN_CHECKS_PASS = (
    dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
    & ~dg.AutomationCondition.execution_failed()
).with_label("eager, once every upstream blocking check passed, unless its last run failed")


def deployment_freshness(automation: AutomationFile) -> dg.FreshnessPolicy:
    return dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=automation.freshness.deployment_fail_hours),
        warn_window=timedelta(hours=automation.freshness.deployment_warn_hours),
    )


def map_assets(assets: Sequence[Any], automation: AutomationFile) -> list[Any]:
    """The stages' assets with automation conditions, freshness policies and default owners applied."""
    automated = set(automation.conditions.groups)
    owners = automation.conditions.owners
    freshness = deployment_freshness(automation)

    def mapped(spec: dg.AssetSpec) -> dg.AssetSpec:
        changes: dict[str, Any] = {}
        if spec.group_name in automated and spec.deps and spec.automation_condition is None:
            changes["automation_condition"] = ADVANCE_WHEN_CHECKS_PASS
        if spec.key.path[-1] in FRESH_ASSETS and spec.freshness_policy is None:
            changes["freshness_policy"] = freshness
        if not spec.owners and owners.get(spec.group_name or ""):
            changes["owners"] = list(owners[spec.group_name or ""])
        if not spec.kinds and spec.key.path[-1] in CONTRACT_KINDS:
            changes["kinds"] = CONTRACT_KINDS[spec.key.path[-1]]
        return spec.replace_attributes(**changes) if changes else spec

    out: list[Any] = []
    for item in assets:
        if isinstance(item, dg.AssetsDefinition | dg.AssetSpec):
            out.extend(dg.map_asset_specs(mapped, [item]))
        else:  # source assets and the like: nothing to automate
            out.append(item)
    return out


def asset_automation_sensor(settings: Settings) -> dg.AutomationConditionSensorDefinition:
    """The sensor that evaluates the assets' automation conditions (conditions.interval_seconds)."""
    return dg.AutomationConditionSensorDefinition(
        "asset_automation",
        target=dg.AssetSelection.all(),
        default_status=sensor_status(settings),
        minimum_interval_seconds=settings.config.automation.conditions.interval_seconds,
        run_tags={TRIGGER_TAG: "automation"},
        description="Evaluates the assets' automation conditions: downstream assets advance when upstream "
                    "changed and every upstream blocking check passed.",
    )
