"""Failed runs and failed checks: audited, and POSTed to the webhook in automation.yaml.

    sensors = failure_sensors(settings)    # [failed_runs, failed_checks]; secure_ml/definitions.py

``failed_runs`` (a run-failure sensor) and ``failed_checks`` (reads failed asset-check executions
from the instance after its cursor), every ``failures.interval_seconds``, each write an ``automation.run_failed`` /
``automation.check_failed`` audit entry and call :class:`secure_ml.notify.Notifier`, which audits
the delivery (``notify.webhook``: ok, fail or skipped when no URL is configured). A webhook that
is down is audited and never fails the sensor. Only the one-line reason a check or step gave is
sent: never data, never stack traces (they may quote values).
"""

from __future__ import annotations

import json
import time
from typing import Any

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from resources import CustodyResource
from secure_ml.errors import (
    BadInput,
    ConfigurationError,
    Error,
    IntegrityError,
    KeyUnavailable,
    PolicyDenied,
    VerificationError,
)
from secure_ml.governance.notify import Notifier
from secure_ml.settings import Settings
from sensors._shared import DROP_TAG, TRIGGER_TAG, sensor_status

#: Executions read per check and tick, failed ids remembered, and when a planned check is abandoned.
BATCH = 50
MAX_REPORTED = 2000
STALE_PLANNED_S = 3600.0
FAILED = AssetCheckExecutionRecordStatus.FAILED
PLANNED = AssetCheckExecutionRecordStatus.PLANNED
MAX_REASON = 500


def one_line(text: str) -> str:
    """The last non-empty line of an exception's text (where format_exception_only puts the message)."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:MAX_REASON]


#: Our own errors (secure_ml.errors), to explain one raised straight out of an asset.
_OUR_ERRORS: dict[str, type[Error]] = {cls.__name__: cls for cls in (
    BadInput, ConfigurationError, KeyUnavailable, IntegrityError, VerificationError, PolicyDenied)}


def _ours(error: Any) -> bool:
    return error.cls_name in _OUR_ERRORS and str(error.message).startswith(f"secure_ml.errors.{error.cls_name}")


def _known(error: Any) -> bool:
    return error.cls_name in ("Failure", "DagsterAssetCheckFailedError") or _ours(error)


def root_cause(error: Any) -> dict[str, str]:
    """What went wrong in a failed step, in one line, and of which kind.

    ``kind`` is ``refused`` (a dg.Failure an asset raised with our one-line explanation, or one
    of our own errors: a denial, bad input, a failed verification), ``blocking_check`` (Dagster
    stopping the step because one of its blocking checks failed: the check says why), or
    ``internal`` (anything else: a bug, to be read with --debug).
    """
    chain = []
    while error is not None:
        chain.append(error)
        error = getattr(error, "cause", None)
    if not chain:
        return {"error": "", "kind": "internal"}
    # The outermost error we raised on purpose; else the innermost (the bug's own exception).
    error = next((e for e in chain if _known(e)), chain[-1])
    line = one_line(error.message) or str(error.cls_name or "")
    detail = line.split(": ", 1)[1] if ": " in line else line
    if error.cls_name == "Failure":
        return {"error": detail, "kind": "refused"}
    if _ours(error):
        return {"error": f"{_OUR_ERRORS[error.cls_name].label}: {detail}", "kind": "refused"}
    if error.cls_name == "DagsterAssetCheckFailedError":
        checks = [part.strip() for part in error.message.strip().splitlines()[1:] if part.strip()]
        return {"error": f"blocking check failed: {', '.join(checks) or detail}", "kind": "blocking_check"}
    return {"error": f"{error.cls_name}: {detail}", "kind": "internal"}


def run_failure_details(context: dg.RunFailureSensorContext) -> dict[str, Any]:
    run = context.dagster_run
    steps = [{"step": event.step_key, "error": root_cause(event.step_failure_data.error)["error"]}
             for event in context.get_step_failure_events()]
    return {
        "run_id": run.run_id,
        "job": run.job_name,
        "trigger": run.tags.get(TRIGGER_TAG, "manual"),
        "drop": run.tags.get(DROP_TAG, ""),
        "message": one_line(context.failure_event.message or ""),
        "failed_steps": steps,
    }


def report_failed_run(context: dg.RunFailureSensorContext, custody: CustodyResource) -> None:
    """The ``failed_runs`` sensor's tick: audit the failed run and POST it to the webhook."""
    details = run_failure_details(context)
    subject = f"run:{details['run_id']}"
    custody.record(None, "automation.run_failed", subject=subject, outcome="fail", details=details)
    Notifier.from_config(custody.settings()).notify("run.failed", subject=subject, details=details)


class CheckCursor:
    """Where the failed-check sensor is in the asset-check execution table.

    Execution ids are given when a check is *planned*, and checks of one run finish in any order,
    so "everything after the highest id reported" would miss a check that fails after a later one.
    The cursor keeps a low-water mark (below the oldest check still running) and the failed ids
    above it that were already reported.
    """

    def __init__(self, after: int, reported: list[int] | None = None) -> None:
        self.after, self.reported = after, set(reported or [])

    @classmethod
    def loads(cls, text: str) -> CheckCursor:
        try:
            data = json.loads(text)
            return cls(int(data["after"]), [int(i) for i in data["reported"]])
        except (ValueError, KeyError, TypeError):
            raise dg.Failure("failed_checks cursor is unreadable; reset the sensor's cursor") from None

    def dumps(self) -> str:
        return json.dumps({"after": self.after, "reported": sorted(self.reported)[-MAX_REPORTED:]})


def _check_keys(context: dg.SensorEvaluationContext) -> list[dg.AssetCheckKey]:
    repository = context.repository_def
    return sorted(repository.asset_graph.asset_check_keys, key=str) if repository else []


def _evaluation(record: Any) -> Any:
    event = record.event.dagster_event if record.event else None
    return event.event_specific_data if event else None


def failed_check_evaluations(instance: dg.DagsterInstance, keys: list[dg.AssetCheckKey],
                             cursor: CheckCursor, *, now: float) -> list[dict[str, Any]]:
    """Failed check executions not yet reported (oldest first); advances ``cursor``."""
    storage = instance.event_log_storage
    failed: list[dict[str, Any]] = []
    for key in keys:
        for record in storage.get_asset_check_execution_history(key, limit=BATCH, status={FAILED}):
            if record.id <= cursor.after or record.id in cursor.reported:
                continue
            evaluation = _evaluation(record)
            reason = getattr(evaluation.metadata.get("reason"), "value", "") if evaluation else ""
            cursor.reported.add(record.id)
            failed.append({
                "id": record.id,
                "asset": key.asset_key.to_user_string(),
                "check": key.name,
                "blocking": bool(evaluation and evaluation.blocking),
                "severity": evaluation.severity.value if evaluation else "ERROR",
                "reason": one_line(str(reason or (evaluation.description if evaluation else "") or "")),
                "run_id": record.run_id,
            })
    latest = storage.get_latest_asset_check_execution_by_key(keys).values() if keys else []
    running = [r.id for r in latest if r.status == PLANNED and now - r.create_timestamp < STALE_PLANNED_S]
    highest = max([cursor.after, *(r.id for r in latest)])
    cursor.after = max(cursor.after, (min(running) - 1) if running else highest)
    cursor.reported = {i for i in cursor.reported if i > cursor.after}
    failed.sort(key=lambda item: item["id"])
    return failed


def report_failed_checks(context: dg.SensorEvaluationContext, custody: CustodyResource) -> dg.SkipReason:
    """The ``failed_checks`` sensor's tick: audit and POST each failed check not yet reported."""
    keys = _check_keys(context)
    if context.cursor is None:
        # Like a run-failure sensor, start from now: an old history is not news.
        cursor = CheckCursor(0)
        failed_check_evaluations(context.instance, keys, cursor, now=time.time())
        cursor.reported = set()
        context.update_cursor(cursor.dumps())
        return dg.SkipReason(f"watching {len(keys)} checks from execution {cursor.after}")
    cursor = CheckCursor.loads(context.cursor)
    failed = failed_check_evaluations(context.instance, keys, cursor, now=time.time())
    notifier = Notifier.from_config(custody.settings()) if failed else None
    for item in failed:
        subject = f"check:{item['asset']}:{item['check']}"
        custody.record(None, "automation.check_failed", subject=subject, outcome="fail", details=item)
        assert notifier is not None
        notifier.notify("check.failed", subject=subject, details=item)
    context.update_cursor(cursor.dumps())
    return dg.SkipReason(f"{len(failed)} failed check(s) reported" if failed else "no failed check")


def failure_sensors(settings: Settings) -> list[dg.SensorDefinition]:
    """``failed_runs`` and ``failed_checks``, ticking every ``failures.interval_seconds``."""
    interval = settings.config.automation.failures.interval_seconds
    status = sensor_status(settings)
    failed_runs = dg.run_failure_sensor(
        name="failed_runs", minimum_interval_seconds=interval, default_status=status,
        description="Audits every failed run and POSTs it (run id, job, failed steps and their one-line "
                    "reasons) to the webhook in automation.yaml.",
    )(report_failed_run)
    failed_checks = dg.sensor(
        name="failed_checks", minimum_interval_seconds=interval, default_status=status,
        description="Audits every failed asset check (blocking or not) with its reason and POSTs it to "
                    "the webhook in automation.yaml.",
    )(report_failed_checks)
    return [failed_runs, failed_checks]
