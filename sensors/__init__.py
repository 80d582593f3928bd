"""Sensors, schedules and automation conditions.

Each module builds its definitions from settings (``landing_sensor(settings)``,
``failure_sensors(settings)``, ``asset_automation_sensor(settings)``, ``retraining_schedule(settings)``,
``map_assets(assets, automation)``); secure_ml/definitions.py lists them. Nothing here reads
configuration at import time.
"""
