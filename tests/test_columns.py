"""What each column is (secure_ml.data.columns) and Dagster's column schema built from it.

Touches: the shipped German Credit schema file, the core facts, resources.metadata's TableSchema and
plot entries. Does not touch: a Dagster instance (tests/test_training_stage.py reads the real
materialization's `dagster/column_schema`).
"""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import pytest
import yaml

from resources.metadata import plot_metadata, standard_metadata
from secure_ml.data.columns import class_names, column_facts
from secure_ml.data.schema import load_schema
from secure_ml.errors import ConfigurationError

SCHEMA = Path(__file__).resolve().parents[1] / "secure_ml" / "config" / "schemas" / "german_credit.yaml"


def test_each_column_is_tagged_with_classification_pii_and_role() -> None:
    schema = load_schema(SCHEMA)
    facts = {f["name"]: f for f in column_facts(schema, classification="confidential",
                                                  pii_actions={"contact": "hash", "ssn": "drop"})}
    assert list(facts)[:2] == ["risk", "sex"] and "ssn" not in facts  # dropped identifiers are gone
    assert facts["risk"]["tags"] == {"classification": "confidential", "pii": "none", "role": "label"}
    assert facts["risk"]["description"] == "label: bad risk (0), good risk (1)"
    assert facts["age"]["tags"]["role"] == "protected" and facts["duration"]["description"] == "months"
    assert facts["contact"] == {"name": "contact", "type": "string", "description": "personal identifier, hashed",
                                "tags": {"classification": "confidential", "pii": "hash", "role": "pii"}}
    assert class_names(schema) == {"0": "bad risk", "1": "good risk"}
    present = column_facts(schema, present=["risk", "age"])
    assert [f["name"] for f in present] == ["risk", "age"] and present[0]["tags"]["classification"] == "unclassified"


def test_dagster_gets_the_row_count_and_the_columns_tab() -> None:
    schema = load_schema(SCHEMA)
    metadata = standard_metadata(schema, rows=1000, classification="internal", pii_actions={"contact": "redact"})
    assert metadata["dagster/row_count"] == 1000
    table = metadata["dagster/column_schema"]
    assert isinstance(table, dg.TableSchema)
    columns = {c.name: c for c in table.columns}
    assert columns["contact"].tags == {"classification": "internal", "pii": "redact", "role": "pii"}
    assert columns["credit_amount"].type == "integer"


def test_one_entry_per_plot_with_the_png_inline() -> None:
    entries = plot_metadata({"roc": b"\x89PNG-roc", "loss": b"\x89PNG-loss"})
    assert set(entries) == {"plot_roc", "plot_loss"}
    png = base64.b64encode(b"\x89PNG-roc").decode()
    assert entries["plot_roc"].value == f"![ROC curve](data:image/png;base64,{png})"


def test_class_names_must_name_each_value(tmp_path: Path) -> None:
    raw = yaml.safe_load(SCHEMA.read_text())
    raw["columns"]["risk"]["classes"] = ["bad", "good"]
    del raw["reference"]
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigurationError, match="'classes' must map each value to a name"):
        load_schema(path)
