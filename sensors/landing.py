"""New drops in the landing area become dataset versions, and the candidate is rebuilt from them.

The ``landing_drops`` sensor scans ``$SECURE_ML_HOME/landing`` every ``landing.interval_seconds``
(and once more ``landing.recheck_seconds`` later in the same tick when it saw a new file). Each
complete drop (two scans saw it unchanged and settled; never one still being written; see
secure_ml/data/landing.py) becomes ONE run, keyed by the drop's content digest and tagged with its
name and digest, that materialises ``dataset`` with ``{"drop": NAME}`` and everything downstream
of it in the groups ``landing.groups`` (data, training, security: validated, trained, evaluated,
scanned, signed and attested; release stays a deliberate act).

Why one run per drop rather than "ingest, then let eager automation pick it up": inside a run,
a failed blocking check stops every asset after it (Dagster's run machinery enforces it), so a
poisoned or tampered drop can never reach training; the whole drop -> candidate history is one
run in the UI, tagged with the drop; and it starts one process, not one per stage. The automation
conditions on the downstream assets (sensors/conditions.py) cover everything else (a dataset
re-materialised by hand, a check re-run) with the same rule: advance only when every blocking
check upstream passed.

The ``weekly_retraining`` schedule (``retraining.cron``) retrains and re-signs on the latest
validated data: the training and security groups in one run.
"""

from __future__ import annotations

import time

import dagster as dg

from resources import CustodyResource
from secure_ml.data import landing
from secure_ml.errors import Error
from secure_ml.settings import Settings
from sensors._shared import (
    DROP_SHA_TAG,
    DROP_TAG,
    TRIGGER_TAG,
    schedule_status,
    seconds,
    section,
    sensor_status,
)

_LANDING = section("landing")
_RETRAINING = section("retraining")
RECHECK_SECONDS = float(_LANDING.get("recheck_seconds", 2))
LANDING_GROUPS: list[str] = list(_LANDING.get("groups") or ["data", "training", "security"])
RETRAINING_GROUPS: list[str] = list(_RETRAINING.get("groups") or ["training", "security"])

#: ``dataset`` and everything downstream of it in the landing groups (lazy: grows with the graph).
LANDING_SELECTION = dg.AssetSelection.assets("dataset").downstream() & dg.AssetSelection.groups(*LANDING_GROUPS)
RETRAINING_SELECTION = dg.AssetSelection.groups(*RETRAINING_GROUPS)


def drop_run_request(drop: landing.Drop) -> dg.RunRequest:
    """The run for one complete drop: keyed by its digest, so the same bytes never run twice."""
    return dg.RunRequest(
        run_key=drop.run_key,
        run_config={"ops": {"dataset": {"config": {"drop": drop.name}}}},
        tags={TRIGGER_TAG: "landing", DROP_TAG: drop.name, DROP_SHA_TAG: drop.sha256},
    )


def _settle_seconds(current: Settings) -> float:
    """The longer of ours and the dataset asset's own (pipeline.yaml): it refuses younger drops."""
    ours = float(_LANDING.get("settle_seconds", landing.SETTLE_SECONDS))
    dataset = (current.load_config("pipeline").get("dataset") or {}).get("settle_seconds", 0)
    return max(ours, float(dataset or 0))


@dg.sensor(
    name="landing_drops",
    target=LANDING_SELECTION,
    minimum_interval_seconds=seconds(_LANDING.get("interval_seconds", 5), "landing.interval_seconds"),
    default_status=sensor_status(),
    description="New complete CSV/Parquet drops in the landing area become dataset versions; each drop "
                "is one run (keyed by its sha256) through validation, training, scanning and signing.",
)
def landing_drops(context: dg.SensorEvaluationContext, custody: CustodyResource) -> dg.SensorResult:
    current = custody.settings()
    try:
        cursor = landing.LandingCursor.loads(context.cursor)
    except Error as exc:
        custody.record(None, "automation.landing", subject="cursor", outcome="fail",
                       details={"reason": exc.explain()})
        raise
    settle = _settle_seconds(current)
    requests: list[dg.RunRequest] = []
    for attempt in range(2):
        if attempt:
            # A drop seen for the first time is looked at again after `recheck_seconds` within this
            # tick (unchanged and settled by then: taken), instead of waiting a whole daemon loop.
            if not cursor.pending or RECHECK_SECONDS <= 0:
                break
            time.sleep(RECHECK_SECONDS)
        for drop in landing.scan(current.landing_dir, cursor, settle_seconds=settle):
            requests.append(drop_run_request(drop))
            cursor.mark_done(drop)
            custody.record(None, "automation.landing", subject=f"sha256:{drop.sha256}",
                           details={"drop": drop.name, "bytes": drop.size, "run_key": drop.run_key})
    pending = sorted(cursor.pending)
    skip = None if requests else (f"waiting for {len(pending)} drop(s) to settle: {', '.join(pending[:5])}"
                                  if pending else "no new complete drop")
    return dg.SensorResult(run_requests=requests, cursor=cursor.dumps(), skip_reason=skip)


weekly_retraining = dg.ScheduleDefinition(
    name="weekly_retraining",
    target=RETRAINING_SELECTION,
    cron_schedule=str(_RETRAINING.get("cron", "0 3 * * 1")),
    execution_timezone=str(_RETRAINING.get("timezone", "UTC")),
    default_status=schedule_status(),
    tags={TRIGGER_TAG: "schedule"},
    description="Retrain, evaluate, scan and sign on the latest validated dataset (automation.yaml "
                "retraining.cron); blocking checks stop the run as anywhere else.",
)


SENSORS = [landing_drops]
SCHEDULES = [weekly_retraining]
