"""Sensors, schedules and automation conditions.

secure_ml/definitions.py collects ``SENSORS``, ``SCHEDULES`` and ``JOBS`` from every module here.
"""
