"""What every automation module shares: the settings, automation.yaml and the on/off switch.

    if automation_on(): ...                    # SECURE_ML_AUTOMATION unset, "on", "1", "true"
    sensor_status()                            # dg.DefaultSensorStatus.RUNNING unless switched off
    automation_config()["landing"]["interval_seconds"]

``SECURE_ML_AUTOMATION=off`` (or 0/false/no/stopped) makes every sensor and schedule start
STOPPED. It sets the *default* status only: a sensor someone started or stopped in the UI keeps
that state in the Dagster instance until it is changed there (or the instance is reset).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import dagster as dg

from secure_ml.errors import ConfigurationError
from secure_ml.settings import Settings

SWITCH = "SECURE_ML_AUTOMATION"
_OFF = {"off", "0", "false", "no", "stopped"}
_ON = {"", "on", "1", "true", "yes", "running"}
TRIGGER_TAG = "secure_ml/trigger"
DROP_TAG = "secure_ml/drop"
DROP_SHA_TAG = "secure_ml/drop_sha256"


def settings() -> Settings:
    return Settings.from_env()


def automation_on(current: Settings | None = None) -> bool:
    value = (current or settings()).environ.get(SWITCH, "").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ConfigurationError(f"{SWITCH} must be on or off, not {value!r}")


def sensor_status(current: Settings | None = None) -> dg.DefaultSensorStatus:
    return dg.DefaultSensorStatus.RUNNING if automation_on(current) else dg.DefaultSensorStatus.STOPPED


def schedule_status(current: Settings | None = None) -> dg.DefaultScheduleStatus:
    return dg.DefaultScheduleStatus.RUNNING if automation_on(current) else dg.DefaultScheduleStatus.STOPPED


@cache
def _load(config_dir: str) -> dict[str, Any]:
    return Settings.from_env({"SECURE_ML_CONFIG": config_dir}).load_config("automation")


def automation_config(current: Settings | None = None) -> dict[str, Any]:
    """automation.yaml (cached per configuration directory)."""
    return _load(str((current or settings()).config_dir))


def section(name: str, current: Settings | None = None) -> dict[str, Any]:
    value = automation_config(current).get(name) or {}
    if not isinstance(value, dict):
        raise ConfigurationError(f"automation.yaml: {name} must be a mapping")
    return value


def seconds(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"automation.yaml: {what} must be a whole number of seconds") from None
    if number < 1:
        raise ConfigurationError(f"automation.yaml: {what} must be at least 1 second")
    return number
