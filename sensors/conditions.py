"""Freshness, owners and kinds, applied to the assets every stage defines.

    assets = map_assets(assets, settings.config.automation)   # secure_ml/definitions.py

No asset carries an automation condition: every run is one of the named jobs (sensors/jobs.py), so
the Runs page and the timeline name it. Training follows accepted data through the
``train_on_accepted_data`` sensor (sensors/advance.py), which requests the ``train`` job only once
every blocking check upstream passed; Dagster's declarative automation would run as its anonymous
``__ASSET_JOB`` (docs/ARCHITECTURE.md, "Automation"). Release assets are never automatic:
registering and deploying are deliberate, approved acts.

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

#: Stage names (a key's last part: every model's ``deployment`` is fresh or stale on its own).
FRESH_ASSETS = ("deployment",)
#: Kinds from the stage contract (assets/__init__.py) for an asset whose stage set none.
CONTRACT_KINDS: dict[str, set[str]] = {
    "dataset": {"parquet"}, "validated_dataset": {"json"}, "trained_model": {"pytorch", "safetensors"},
    "model_evaluation": {"json"}, "scan_report": {"json"}, "model_signature": {"sigstore"},
    "attestation": {"in-toto"}, "registered_model": {"json"}, "deployment": {"kubernetes"},
}


def deployment_freshness(automation: AutomationFile) -> dg.FreshnessPolicy:
    return dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=automation.freshness.deployment_fail_hours),
        warn_window=timedelta(hours=automation.freshness.deployment_warn_hours),
    )


def map_assets(assets: Sequence[Any], automation: AutomationFile) -> list[Any]:
    """The stages' assets with freshness policies, default owners and kinds applied."""
    owners = automation.conditions.owners
    freshness = deployment_freshness(automation)

    def mapped(spec: dg.AssetSpec) -> dg.AssetSpec:
        changes: dict[str, Any] = {}
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
