"""Training follows accepted data: a sensor that requests the named ``train`` job, per model.

    sensor = training_sensor(settings)          # ``train_on_accepted_data``; secure_ml/definitions.py
    train_requests(instance, graph, models=[...], default="german_credit")   # what one tick requests

Each tick, for every model: when its latest ``validated_dataset`` materialization is newer than its
latest ``trained_model`` and every blocking check of its ingest assets (``dataset``,
``validated_dataset``) passed on its latest execution, the sensor requests one run of the ``train``
job confined to that model's training and security assets, keyed by that validated version (so the
same accepted data never trains twice, and a training that failed is not retried on it). A rejected
drop is never materialised and its failed verdicts are the checks' latest: nothing is requested. A
check still running (planned) waits for the next tick.

Why a sensor and not declarative automation (docs/ARCHITECTURE.md, "Automation"): Dagster 1.13 runs
asset-level automation conditions as its implicit ``__ASSET_JOB`` (``submit_asset_runs`` picks only
implicit job names), so such runs are anonymous on the Runs page and timeline; the job-level
conditions (``define_asset_job(automation_condition=...)``, a preview) launch the whole job, every
model's training at once. This sensor gives every run the ``train`` name and one model's assets.
Registration and deployment stay deliberate acts: nothing requests ``release``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from resources import CustodyResource
from resources.custody import model_asset_key, model_selection
from secure_ml.settings import Settings
from sensors import jobs
from sensors._shared import DROP_TAG, MODEL_TAG, TRIGGER_TAG, sensor_status

NAME = "train_on_accepted_data"
PASSED = AssetCheckExecutionRecordStatus.SUCCEEDED


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey) -> Any:
    records = instance.fetch_materializations(key, limit=1).records
    return records[0] if records else None


def gate_open(instance: dg.DagsterInstance, graph: Any, assets: Sequence[dg.AssetKey]) -> tuple[bool, str]:
    """Whether every blocking check of ``assets`` passed on its latest execution, and if not, which did not."""
    keys = [k for k in graph.get_check_keys_for_assets(set(assets)) if graph.get_check_spec(k).blocking]
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys) if keys else {}
    waiting = sorted(f"{k.asset_key.to_user_string()}:{k.name}" for k in keys
                     if k not in latest or latest[k].status != PASSED)
    return not waiting, ", ".join(waiting)


def train_requests(instance: dg.DagsterInstance, graph: Any, *, models: Sequence[str], default: str,
                   automation: Any) -> tuple[list[dg.RunRequest], list[str]]:
    """The ``train`` runs due now (one per model with new accepted data), and why each other model waits."""
    requests: list[dg.RunRequest] = []
    notes: list[str] = []
    for model in models:
        validated = _latest(instance, model_asset_key("validated_dataset", model, default))
        if validated is None:
            continue
        trained = _latest(instance, model_asset_key("trained_model", model, default))
        if trained is not None and trained.storage_id > validated.storage_id:
            continue  # trained on (or after) the latest accepted version already
        ingest = sorted((jobs.ingest_selection(automation) & model_selection(model)).resolve(graph))
        ok, waiting = gate_open(instance, graph, ingest)
        if not ok:  # a failed (or still running) blocking check upstream: nothing advances
            notes.append(f"{model}: waiting for {waiting}")
            continue
        keys = sorted((jobs.train_selection(automation) & model_selection(model)).resolve(graph))
        metadata = validated.asset_materialization.metadata if validated.asset_materialization else {}
        source = str(getattr(metadata.get("source"), "value", "") or "")
        tags = {TRIGGER_TAG: "automation", MODEL_TAG: model, **({DROP_TAG: source} if source else {})}
        requests.append(dg.RunRequest(run_key=f"train:{model}:{validated.storage_id}", asset_selection=keys,
                                      tags=tags))
    return requests, notes


def advance_training(context: dg.SensorEvaluationContext, custody: CustodyResource) -> dg.SensorResult:
    """The ``train_on_accepted_data`` sensor's tick."""
    settings = custody.settings()
    repository = context.repository_def
    if repository is None:
        return dg.SensorResult(skip_reason="no code location to read the graph from")
    default = settings.config.default_model
    models = list(dict.fromkeys([default, *settings.config.models()]))
    requests, notes = train_requests(context.instance, repository.asset_graph, models=models, default=default,
                                     automation=settings.config.automation)
    skip = None if requests else ("; ".join(notes) or "no new accepted data")
    return dg.SensorResult(run_requests=requests, skip_reason=skip)


def training_sensor(settings: Settings) -> dg.SensorDefinition:
    """``train_on_accepted_data``: every ``conditions.interval_seconds``, targets the ``train`` job."""
    return dg.sensor(
        name=NAME,
        job_name=jobs.TRAIN,
        minimum_interval_seconds=settings.config.automation.conditions.interval_seconds,
        default_status=sensor_status(settings),
        description="When a model's validated dataset is accepted (every blocking check of dataset and "
                    "validated_dataset passed), runs the `train` job for that model: train, evaluate, scan, "
                    "sign, attest. A rejected drop or a failed check requests nothing; release stays manual.",
    )(advance_training)
