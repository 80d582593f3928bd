"""Dagster assets and asset checks, one module per pipeline stage.

secure_ml/definitions.py loads every module of this package, so a new stage is a new module.
"""
