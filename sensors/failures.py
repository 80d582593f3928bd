"""Failed runs and failed checks: audited, and POSTed to the webhook in automation.yaml.

``failed_runs`` (a run-failure sensor) and ``failed_checks`` (reads asset-check evaluations from
the event log after its cursor, a storage id) each write an ``automation.run_failed`` /
``automation.check_failed`` audit entry and call :class:`secure_ml.notify.Notifier`, which audits
the delivery (``notify.webhook``: ok, fail or skipped when no URL is configured). A webhook that
is down is audited and never fails the sensor. Only the one-line reason a check or step gave is
sent: never data, never stack traces (they may quote values).
"""

from __future__ import annotations

import warnings
from typing import Any

import dagster as dg

from resources import CustodyResource
from secure_ml.notify import Notifier
from sensors._shared import DROP_TAG, TRIGGER_TAG, seconds, section, sensor_status

_FAILURES = section("failures")
INTERVAL = seconds(_FAILURES.get("interval_seconds", 15), "failures.interval_seconds")
#: Check evaluations read per tick; the cursor carries on from the last one read.
BATCH = 200
MAX_REASON = 500


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:MAX_REASON]


def _root_cause(error: Any) -> str:
    while error is not None and getattr(error, "cause", None) is not None:
        error = error.cause
    if error is None:
        return ""
    line = _one_line(error.message) or str(error.cls_name or "")
    return line.split(": ", 1)[1] if error.cls_name == "Failure" and ": " in line else line


def run_failure_details(context: dg.RunFailureSensorContext) -> dict[str, Any]:
    run = context.dagster_run
    steps = [{"step": event.step_key, "error": _root_cause(event.step_failure_data.error)}
             for event in context.get_step_failure_events()]
    return {
        "run_id": run.run_id,
        "job": run.job_name,
        "trigger": run.tags.get(TRIGGER_TAG, "manual"),
        "drop": run.tags.get(DROP_TAG, ""),
        "message": _one_line(context.failure_event.message or ""),
        "failed_steps": steps,
    }


@dg.run_failure_sensor(
    name="failed_runs",
    minimum_interval_seconds=INTERVAL,
    default_status=sensor_status(),
    description="Audits every failed run and POSTs it (run id, job, failed steps and their one-line "
                "reasons) to the webhook in automation.yaml.",
)
def failed_runs(context: dg.RunFailureSensorContext, custody: CustodyResource) -> None:
    details = run_failure_details(context)
    subject = f"run:{details['run_id']}"
    custody.record(None, "automation.run_failed", subject=subject, outcome="fail", details=details)
    Notifier.from_config(custody.settings()).notify("run.failed", subject=subject, details=details)


def failed_check_evaluations(instance: dg.DagsterInstance, after: int,
                             limit: int = BATCH) -> tuple[list[dict[str, Any]], int]:
    """Failed check evaluations stored after storage id ``after`` (oldest first) and the new cursor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION, after_cursor=after),
            limit=limit, ascending=True,
        )
    failed: list[dict[str, Any]] = []
    cursor = after
    for record in records:
        cursor = max(cursor, record.storage_id)
        event = record.event_log_entry.dagster_event
        evaluation = event.event_specific_data if event else None
        if evaluation is None or evaluation.passed:
            continue
        reason = getattr(evaluation.metadata.get("reason"), "value", "") or evaluation.description or ""
        failed.append({
            "asset": evaluation.asset_key.to_user_string(),
            "check": evaluation.check_name,
            "blocking": bool(evaluation.blocking),
            "severity": evaluation.severity.value,
            "reason": _one_line(str(reason)),
            "run_id": record.event_log_entry.run_id,
        })
    return failed, cursor


def latest_storage_id(instance: dg.DagsterInstance) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION), limit=1, ascending=False)
    return records[0].storage_id if records else 0


@dg.sensor(
    name="failed_checks",
    minimum_interval_seconds=INTERVAL,
    default_status=sensor_status(),
    description="Audits every failed asset check (blocking or not) with its reason and POSTs it to "
                "the webhook in automation.yaml.",
)
def failed_checks(context: dg.SensorEvaluationContext, custody: CustodyResource) -> dg.SkipReason:
    if context.cursor is None:
        # Like a run-failure sensor, start from now: an old history is not news.
        start = latest_storage_id(context.instance)
        context.update_cursor(str(start))
        return dg.SkipReason(f"watching check evaluations after event {start}")
    try:
        after = int(context.cursor)
    except ValueError:
        raise dg.Failure("failed_checks cursor is not an event id; reset the sensor's cursor") from None
    failed, cursor = failed_check_evaluations(context.instance, after)
    notifier = Notifier.from_config(custody.settings()) if failed else None
    for item in failed:
        subject = f"check:{item['asset']}:{item['check']}"
        custody.record(None, "automation.check_failed", subject=subject, outcome="fail", details=item)
        assert notifier is not None
        notifier.notify("check.failed", subject=subject, details=item)
    context.update_cursor(str(cursor))
    return dg.SkipReason(f"{len(failed)} failed check(s) reported" if failed else "no failed check")


SENSORS = [failed_runs, failed_checks]
