"""What each column of a dataset is, for catalogues and the UI: type, description, classification, PII.

    facts = column_facts(schema, classification="confidential", pii_actions={"email": "hash"})
    facts[0]  # {"name": "risk", "type": "integer", "description": "label: bad risk (0), good risk (1)",
              #  "tags": {"classification": "confidential", "pii": "none", "role": "label"}}

Built from the dataset's schema (secure_ml/data/schema.py) and the PII handling applied to the drop
(secure_ml/data/pii.py): the schema says what a column is, the source's approval says how sensitive
the data is, and the PII plan says which identifiers were hashed or redacted. The Dagster layer turns
these into ``dagster/column_schema``; nothing here imports Dagster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from secure_ml.data.schema import Schema


def column_facts(schema: Schema, *, classification: str | None = None,
                 pii_actions: Mapping[str, str] | None = None,
                 present: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One entry per column of ``schema`` (in schema order, then PII columns kept after handling),
    restricted to ``present`` when given. Tags: ``classification`` (the source's, or ``unclassified``),
    ``pii`` (``none`` or the action applied: hash, redact), ``role`` (label, protected, feature, ...)."""
    actions = dict(pii_actions or {})
    names = [*schema.columns, *(c for c, a in actions.items() if a != "drop" and c not in schema.columns)]
    if present is not None:
        names = [n for n in names if n in set(present)]
    facts = []
    for name in names:
        column = schema.columns.get(name)
        role = ("label" if name == schema.label else "protected" if name in schema.protected
                else column.role if column else "pii")
        description = column.description if column else f"personal identifier, {actions[name]}ed"
        if column and column.classes:
            description = "label: " + ", ".join(f"{n} ({v})" for v, n in column.classes) + \
                (f"; {description}" if description else "")
        facts.append({
            "name": name,
            "type": column.type if column else "string",
            "description": description,
            "tags": {"classification": classification or "unclassified",
                     "pii": actions.get(name, "none"), "role": role},
        })
    return facts


def class_names(schema: Schema) -> dict[str, str]:
    """The label's class names by value (as strings), e.g. ``{"0": "bad risk", "1": "good risk"}``;
    empty when the schema names none."""
    label = schema.columns.get(schema.label)
    return dict(label.classes) if label else {}
