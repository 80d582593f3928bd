"""The pipeline's named jobs, split at the gates: ``ingest``, ``train``, ``release``.

    pipeline_jobs(settings.config.automation)   # secure_ml/definitions.py lists them
    INGEST, TRAIN, RELEASE                       # their names (the Runs page and timeline show them)

A drop's run is ``ingest`` only: ``dataset`` and what follows it in ``landing.groups`` (by default
``validated_dataset``). A rejected drop therefore fails that run alone and touches nothing it could
not change: the last good model, its checks and its deployment keep their status. Training and
security (``train``: ``retraining.groups``) then follow by the ``train_on_accepted_data`` sensor
once every upstream blocking check passed (sensors/advance.py), or by the weekly schedule, or by
hand, always as a ``train`` run; ``release`` (registration and deployment) is always a deliberate act. ``secure-ml pipeline
run`` runs the same jobs in order and stops at the first that fails.
"""

from __future__ import annotations

import dagster as dg

from secure_ml.config.models import AutomationFile

INGEST, TRAIN, RELEASE = "ingest", "train", "release"
#: the job tag a run launched from the UI carries (sensors, the schedule and the CLI set their own)
_UI = {"secure_ml/trigger": "ui"}


def ingest_selection(automation: AutomationFile) -> dg.AssetSelection:
    """Every model's assets in ``landing.groups`` (``dataset``, ``validated_dataset``; lazy: grows with the graph)."""
    return dg.AssetSelection.groups(*automation.landing.groups)  # every model's dataset and validated_dataset


def train_selection(automation: AutomationFile) -> dg.AssetSelection:
    return dg.AssetSelection.groups(*automation.retraining.groups) - ingest_selection(automation)


def release_selection(automation: AutomationFile) -> dg.AssetSelection:
    return dg.AssetSelection.groups("release")


def pipeline_jobs(automation: AutomationFile) -> list[dg.UnresolvedAssetJobDefinition]:
    """The three jobs, in the order a drop goes through them."""
    return [
        dg.define_asset_job(INGEST, selection=ingest_selection(automation), tags=_UI,
                            description="Ingest one drop and validate it (the data gate). A rejected drop "
                                        "fails here, naming the failed check; nothing downstream is touched."),
        dg.define_asset_job(TRAIN, selection=train_selection(automation), tags=_UI,
                            description="Train, evaluate, scan, sign and attest on the latest accepted "
                                        "validated dataset."),
        dg.define_asset_job(RELEASE, selection=release_selection(automation), tags=_UI,
                            description="Register the signed candidate and deploy the approved production "
                                        "version (a deliberate act: never automatic)."),
    ]
