"""New drops in the landing area become dataset versions, and the candidate is rebuilt from them.

The ``landing_drops`` sensor scans ``$SECURE_ML_HOME/landing`` every ``landing.interval_seconds``
(and once more ``landing.recheck_seconds`` later in the same tick when it saw a new file). Each
complete drop (two scans saw it unchanged and settled; never one still being written; see
secure_ml/data/landing.py) becomes ONE run of the ``ingest`` job (sensors/jobs.py), keyed by the
drop's content digest and tagged with its name and digest, that materialises ``dataset`` with
``{"drop": NAME}`` and what follows it in ``landing.groups`` (``validated_dataset``: the data gate).

Why the drop's run stops at the gate: a rejected drop fails its own run, naming the failed check,
and nothing else: the last good model, its checks and its deployment keep their status, and no
asset downstream turns "failed" or "unsynced" for a drop that never became anyone's input. Training,
evaluation, scanning, signing and attestation then follow as one ``train`` run requested by the
``train_on_accepted_data`` sensor (sensors/advance.py), only once every blocking check upstream passed.

The ``weekly_retraining`` schedule (``retraining.cron``) retrains and re-signs on the latest
validated data: the ``train`` job (training and security groups) in one run.

Many models: each drop is routed to its model by the approved source its name matches
(models/NAME.yaml ``sources``); its run materialises that model's assets only. A drop that
matches the sources of two models is refused (audited, named) and runs nothing; a drop matching
no source still gets its run, whose ``dataset`` refuses it (as before). Each model has its own
retraining schedule (``weekly_retraining`` for the default model, ``NAME_weekly_retraining``).

    landing_sensor(settings), retraining_schedule(settings)   # secure_ml/definitions.py builds them
    landing_selection(settings.config.automation)              # what one drop's run materialises

automation.yaml is read when the definitions are built (interval, groups, cron) and, for the
settle and recheck times, on every tick from the custody resource's settings; never at import.
"""

from __future__ import annotations

import time

import dagster as dg

from resources import CustodyResource
from resources.custody import MODEL_TAG, model_asset_key, model_selection, op_name
from secure_ml.config.models import AutomationFile
from secure_ml.data import landing
from secure_ml.errors import ConfigurationError, Error
from secure_ml.settings import Settings
from sensors import jobs
from sensors._shared import DROP_SHA_TAG, DROP_TAG, TRIGGER_TAG, schedule_status, sensor_status


def _models(settings: Settings) -> list[str]:
    return list(dict.fromkeys([settings.config.default_model, *settings.config.models()]))


def landing_selection(automation: AutomationFile, datasets: list[dg.AssetKey] | None = None) -> dg.AssetSelection:
    """What a drop's run (the ``ingest`` job) materialises: each model's ``dataset`` and what follows it in
    ``landing.groups``."""
    return (dg.AssetSelection.assets(*(datasets or [dg.AssetKey("dataset")])).downstream()
            & jobs.ingest_selection(automation))


def retraining_selection(automation: AutomationFile) -> dg.AssetSelection:
    return jobs.train_selection(automation)


def drop_run_request(drop: landing.Drop, model: str | None = None,
                     asset_selection: list[dg.AssetKey] | None = None, op: str = "dataset") -> dg.RunRequest:
    """The run for one complete drop: keyed by its digest, so the same bytes never run twice. ``op``: the op
    of the model's ``dataset`` in the sensor's job (each model's copy is numbered: dataset, dataset_2)."""
    tags = {TRIGGER_TAG: "landing", DROP_TAG: drop.name, DROP_SHA_TAG: drop.sha256}
    return dg.RunRequest(
        run_key=drop.run_key,
        run_config={"ops": {op: {"config": {"drop": drop.name}}}},
        tags={**tags, MODEL_TAG: model} if model else tags,
        asset_selection=asset_selection,
    )


def _routed_request(context: dg.SensorEvaluationContext, current: Settings, drop: landing.Drop) -> dg.RunRequest:
    """The drop's run, confined to the model its source feeds (when the project has several models)."""
    from secure_ml.governance.sources import ApprovedSources

    models = _models(current)
    if len(models) == 1:
        return drop_run_request(drop)
    default = current.config.default_model
    model = ApprovedSources.from_settings(current).route(drop.name) or default
    dataset = model_asset_key("dataset", model, default)
    selection = landing_selection(current.config.automation, [dataset]) & model_selection(model)
    repository = getattr(context, "repository_def", None)
    if repository is None:
        raise ConfigurationError("the landing sensor needs its code location to route a drop to its model")
    graph = repository.asset_graph
    keys = sorted(selection.resolve(graph))
    # The run is the sensor's job subset to these keys, and Dagster names a subset's ops from its own assets.
    return drop_run_request(drop, model, keys, op_name(graph, dataset, dg.AssetSelection.assets(*keys)))


def settle_seconds(current: Settings) -> float:
    """The longer of ours and the dataset asset's own (pipeline.yaml): it refuses younger drops."""
    return max(current.config.automation.landing.settle_seconds, current.config.pipeline.dataset.settle_seconds)


def scan_landing(context: dg.SensorEvaluationContext, custody: CustodyResource) -> dg.SensorResult:
    """The ``landing_drops`` sensor's tick: one run request per complete, settled, new drop."""
    current = custody.settings()
    recheck = current.config.automation.landing.recheck_seconds
    try:
        cursor = landing.LandingCursor.loads(context.cursor)
    except Error as exc:
        custody.record(None, "automation.landing", subject="cursor", outcome="fail",
                       details={"reason": exc.explain()})
        raise
    settle = settle_seconds(current)
    requests: list[dg.RunRequest] = []
    for attempt in range(2):
        if attempt:
            # A drop seen for the first time is looked at again after `recheck_seconds` within this
            # tick (unchanged and settled by then: taken), instead of waiting a whole daemon loop.
            if not cursor.pending or recheck <= 0:
                break
            time.sleep(recheck)
        for drop in landing.scan(current.landing_dir, cursor, settle_seconds=settle):
            cursor.mark_done(drop)
            try:
                requests.append(_routed_request(context, current, drop))
            except Error as exc:  # e.g. the drop matches two models' sources: refused, named, no run
                custody.record(None, "automation.landing", subject=f"sha256:{drop.sha256}", outcome="deny",
                               details={"drop": drop.name, "reason": exc.explain()})
                continue
            custody.record(None, "automation.landing", subject=f"sha256:{drop.sha256}",
                           details={"drop": drop.name, "bytes": drop.size, "run_key": drop.run_key})
    pending = sorted(cursor.pending)
    skip = None if requests else (f"waiting for {len(pending)} drop(s) to settle: {', '.join(pending[:5])}"
                                  if pending else "no new complete drop")
    return dg.SensorResult(run_requests=requests, cursor=cursor.dumps(), skip_reason=skip)


def landing_sensor(settings: Settings) -> dg.SensorDefinition:
    """``landing_drops``: scans the landing area every ``landing.interval_seconds``."""
    automation = settings.config.automation
    default = settings.config.default_model
    return dg.sensor(
        name="landing_drops",
        job_name=jobs.INGEST,
        minimum_interval_seconds=automation.landing.interval_seconds,
        default_status=sensor_status(settings),
        description="New complete CSV/Parquet drops in the landing area become dataset versions; each drop "
                    "is one `ingest` run (keyed by its sha256) through validation. Training and signing "
                    "follow as a `train` run once every blocking check passed.",
    )(scan_landing)


def retraining_schedules(settings: Settings) -> list[dg.ScheduleDefinition]:
    """One retraining schedule per model (each model retrains in its own run)."""
    default = settings.config.default_model
    return [retraining_schedule(settings, None if m == default else m) for m in _models(settings)]


def retraining_schedule(settings: Settings, model: str | None = None) -> dg.ScheduleDefinition:
    """``weekly_retraining`` on ``retraining.cron`` (``NAME_weekly_retraining`` for another model): a ``train``
    run (the named job, so the Runs page and timeline name it) of that model's training and security assets."""
    automation = settings.config.automation
    default = settings.config.default_model
    chosen = model or default
    target = retraining_selection(automation) & model_selection(chosen)
    several = len(_models(settings)) > 1

    def request(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        tags = {TRIGGER_TAG: "schedule", MODEL_TAG: chosen}
        if not several:
            return dg.RunRequest(tags=tags)
        return dg.RunRequest(tags=tags, asset_selection=sorted(target.resolve(context.repository_def.asset_graph)))

    return dg.schedule(
        name=f"{model}_weekly_retraining" if model else "weekly_retraining",
        job_name=jobs.TRAIN,
        cron_schedule=automation.retraining.cron,
        execution_timezone=automation.retraining.timezone,
        default_status=schedule_status(settings),
        description="Retrain, evaluate, scan and sign on the latest validated dataset (automation.yaml "
                    "retraining.cron); blocking checks stop the run as anywhere else.",
    )(request)
