"""Every model gets the same stages with its own lineage: per-model copies of the stage assets.

    assets, checks = for_models(stage_assets, stage_checks, models=["german_credit", "breast_cancer"],
                                default="german_credit")

The stage bodies (assets/data.py ... assets/release.py) are written once, for unprefixed keys. The
default model keeps those keys (``dataset``, ``trained_model``, ...); every other model gets copies
whose keys, dependencies and checks are prefixed with its name (``breast_cancer/dataset`` ->
``breast_cancer/validated_dataset`` -> ...) through ``AssetsDefinition.with_attributes``, so a copy
is the same code with its own lineage, data versions, checks and history. A body finds its model from
the key it runs for (resources.custody.current_model), and acts on that model's spec.

Every asset carries the tag ``secure_ml/model: NAME``: the UI filters a model's graph and checks
by it, and the landing sensor, the schedules and ``pipeline run`` select one model's assets with
:func:`model_selection`. Groups stay the stage names (data, training, security, release), so
automation.yaml's group lists mean the same for every model. Why this and not a static partition
per model: docs/ARCHITECTURE.md, "Many models".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dagster as dg

from resources.custody import MODEL_TAG, model_asset_key, model_selection

__all__ = ["MODEL_TAG", "for_models", "model_asset_key", "model_selection"]


def _prefixed(keys: set[dg.AssetKey], model: str, default: str) -> dict[dg.AssetKey, dg.AssetKey]:
    if model == default:
        return {}
    return {key: dg.AssetKey([model, *key.path]) for key in keys}


def for_models(stage_assets: Sequence[Any], stage_checks: Sequence[Any], *, models: Sequence[str],
               default: str) -> tuple[list[Any], list[Any]]:
    """The stage assets and checks once per model (the default model unprefixed), each tagged with its model."""
    definitions = [a for a in stage_assets if isinstance(a, dg.AssetsDefinition)]
    keys = {key for a in definitions for key in a.keys}
    assets: list[Any] = []
    checks: list[Any] = []
    for model in dict.fromkeys([default, *models]):
        replacements = _prefixed(keys, model, default)
        for asset in definitions:
            copy = asset.with_attributes(asset_key_replacements=replacements) if replacements else asset
            assets.extend(dg.map_asset_specs(lambda spec, m=model: spec.merge_attributes(tags={MODEL_TAG: m}), [copy]))
        for check in stage_checks:
            checks.append(check.with_attributes(asset_key_replacements=replacements) if replacements else check)
    return assets, checks
