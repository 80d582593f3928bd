"""What every automation module shares: the on/off switch and the run tags.

    sensor_status(settings)                    # dg.DefaultSensorStatus.RUNNING unless switched off
    schedule_status(settings)
    settings.config.automation.landing.interval_seconds   # automation.yaml, typed (secure_ml.config)

``SECURE_ML_AUTOMATION=off`` (or 0/false/no/stopped) makes every sensor and schedule start
STOPPED. It sets the *default* status only: a sensor someone started or stopped in the UI keeps
that state in the Dagster instance until it is changed there (or the instance is reset). Nothing
here runs at import time: the switch and automation.yaml are read when the definitions are built
(secure_ml/definitions.py) and, for what a tick needs, when the sensor is evaluated.
"""

from __future__ import annotations

import dagster as dg

from resources.custody import DROP_SHA_TAG, DROP_TAG, IDENTITY_TAG, MODEL_TAG, TRIGGER_TAG
from secure_ml.errors import ConfigurationError
from secure_ml.settings import Settings

SWITCH = "SECURE_ML_AUTOMATION"
_OFF = {"off", "0", "false", "no", "stopped"}
_ON = {"", "on", "1", "true", "yes", "running"}
__all__ = ["DROP_SHA_TAG", "DROP_TAG", "IDENTITY_TAG", "MODEL_TAG", "TRIGGER_TAG", "automation_on",
           "schedule_status", "sensor_status"]


def automation_on(settings: Settings) -> bool:
    value = settings.environ.get(SWITCH, "").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ConfigurationError(f"{SWITCH} must be on or off, not {value!r}")


def sensor_status(settings: Settings) -> dg.DefaultSensorStatus:
    return dg.DefaultSensorStatus.RUNNING if automation_on(settings) else dg.DefaultSensorStatus.STOPPED


def schedule_status(settings: Settings) -> dg.DefaultScheduleStatus:
    return dg.DefaultScheduleStatus.RUNNING if automation_on(settings) else dg.DefaultScheduleStatus.STOPPED
