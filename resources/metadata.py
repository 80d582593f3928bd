"""Dagster's standard metadata and first-class plots, from facts the core computes.

    standard_metadata(schema, rows=1000, classification="confidential", pii_actions={"email": "hash"})
    # {"dagster/row_count": 1000, "dagster/column_schema": TableSchema(...)}: the Columns tab, with
    # classification, PII and role tags per column (secure_ml.data.columns)
    plot_metadata({"roc": png_bytes, ...}, charts={"roc": "ROC AUC **0.79** ..."})
    # {"roc": MetadataValue.md("ROC AUC ..."), "plot_roc": MetadataValue.md("![ROC curve](data:image/png;base64,...)")}

Thin: what a column is and how a plot looks are decided in the core (secure_ml/data/columns.py,
secure_ml/training/evaluation.py and charts.py); this module only wraps them in Dagster's metadata types.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from secure_ml.data.columns import column_facts
from secure_ml.data.schema import Schema

#: plot name -> the title of its metadata entry
PLOT_TITLES = {"roc": "ROC curve", "confusion": "Confusion matrix", "calibration": "Calibration",
               "groups": "Per-group rates", "loss": "Training loss"}


def column_schema(facts: Sequence[Mapping[str, Any]]) -> dg.TableSchema:
    return dg.TableSchema(columns=[
        dg.TableColumn(name=str(f["name"]), type=str(f["type"]), description=str(f["description"]) or None,
                       tags={str(k): str(v) for k, v in dict(f["tags"]).items()})
        for f in facts])


def standard_metadata(schema: Schema, *, rows: int, classification: Any = None,
                      pii_actions: Mapping[str, str] | None = None,
                      present: Sequence[str] | None = None) -> dict[str, Any]:
    facts = column_facts(schema, classification=str(classification) if classification else None,
                         pii_actions=pii_actions, present=present)
    return {"dagster/row_count": int(rows), "dagster/column_schema": column_schema(facts)}


def plot_metadata(plots: Mapping[str, bytes], charts: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One markdown entry per PNG plot (``plot_NAME``), each after its inline text chart(s) (``NAME``,
    ``NAME_<part>``; secure_ml/training/charts.py): the UI shows markdown under 1,000 characters inline,
    so the chart is readable at a glance and the PNG is one [Show Markdown] away."""
    charts = dict(charts or {})
    out: dict[str, Any] = {}
    for name, png in plots.items():
        for key in [k for k in charts if k == name or k.startswith(f"{name}_")]:
            out[key] = dg.MetadataValue.md(charts.pop(key))
        title = PLOT_TITLES.get(name, name)
        out[f"plot_{name}"] = dg.MetadataValue.md(
            f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})")
    out.update({key: dg.MetadataValue.md(text) for key, text in charts.items()})
    return out
