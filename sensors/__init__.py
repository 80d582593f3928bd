"""Sensors, schedules, freshness and the named jobs.

Each module builds its definitions from settings (``landing_sensor(settings)``,
``failure_sensors(settings)``, ``training_sensor(settings)``, ``retraining_schedule(settings)``,
``map_assets(assets, automation)``); secure_ml/definitions.py lists them. Nothing here reads
configuration at import time.
"""
