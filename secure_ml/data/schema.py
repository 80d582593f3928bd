"""Per-dataset schema files: what a drop must look like, reviewed by a person, versioned in git.

    schema = load_schema(config_dir / "schemas" / "german_credit.yaml")
    schema.label, schema.features, schema.numeric, schema.categorical, schema.protected
    reference = load_reference(schema)          # the bundled trusted sample, digest-checked (or None)

    draft = infer_schema(frame, name="loans", label="defaulted", protected=["sex"])
    text = dump_schema(draft)                   # YAML with a "review me" header; `secure-ml schema init`

The format (``format: secure-ml-schema/1``)::

    dataset: german_credit
    label: risk                       # the column a model predicts
    protected: [sex, age]             # attributes fairness is measured on
    rows: {min: 100, max: 50000000}   # row-count bounds
    reference: {file: german_credit.reference.csv, sha256: ...}   # optional trusted sample
    columns:
      age: {type: integer, min: 18, max: 100}
      sex: {type: category, allowed: [female, male]}
      notes: {type: text, nullable: true, role: ignore}

Column types: ``integer``, ``number``, ``category``, ``text`` (free text; never a feature),
``boolean``. ``nullable`` defaults to false, ``role`` to ``feature`` (``ignore`` keeps a column
out of the features; the label column's role is implied). Unknown keys are errors, so a typo
does not silently weaken a check.
"""

from __future__ import annotations

import fnmatch
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from secure_ml.custody.integrity import sha256_bytes
from secure_ml.errors import ConfigurationError, IntegrityError

FORMAT = "secure-ml-schema/1"
TYPES = ("integer", "number", "category", "text", "boolean")
ROLES = ("feature", "ignore")
#: pandas dtype names each schema type accepts (pandas 3 strings are ``str``).
DTYPES: dict[str, tuple[str, ...]] = {
    "integer": ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"),
    "number": ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
               "Int8", "Int16", "Int32", "Int64", "float16", "float32", "float64", "Float32", "Float64"),
    "category": ("str", "string", "object", "category"),
    "text": ("str", "string", "object"),
    "boolean": ("bool", "boolean"),
}
_COLUMN_KEYS = {"type", "nullable", "min", "max", "allowed", "role", "description", "classes"}
_TOP_KEYS = {"format", "dataset", "description", "label", "protected", "rows", "reference", "columns"}
#: a category column with more distinct values than this is inferred as free text
MAX_CATEGORIES = 50


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    allowed: tuple[Any, ...] | None = None
    role: str = "feature"
    description: str = ""
    #: the label's class names, (value, name) pairs: what the UI's confusion matrix calls each class
    classes: tuple[tuple[str, str], ...] = ()

    @property
    def dtypes(self) -> tuple[str, ...]:
        # a nullable integer column read from CSV arrives as float64
        extra = ("float64",) if self.type == "integer" and self.nullable else ()
        return DTYPES[self.type] + extra


@dataclass(frozen=True)
class Schema:
    dataset: str
    label: str
    columns: dict[str, Column]
    protected: tuple[str, ...] = ()
    min_rows: int = 1
    max_rows: int | None = None
    reference_file: Path | None = None
    reference_sha256: str | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def features(self) -> list[str]:
        return [c.name for c in self.columns.values()
                if c.name != self.label and c.role == "feature" and c.type != "text"]

    @property
    def numeric(self) -> list[str]:
        return [n for n in self.features if self.columns[n].type in ("integer", "number")]

    @property
    def categorical(self) -> list[str]:
        return [n for n in self.features if self.columns[n].type in ("category", "boolean")]

    def digest(self) -> str:
        return sha256_bytes(self.path.read_bytes()) if self.path else ""


def load_schema(path: Path | str) -> Schema:
    """Parse and check a schema file; every problem is one ConfigurationError naming it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"schema file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigurationError(f"schema file {path} is not valid YAML") from None
    return parse_schema(raw, path=path)


def parse_schema(raw: Any, *, path: Path | None = None) -> Schema:
    where = f"schema {path}" if path else "schema"
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{where} must be a mapping")
    if raw.get("format") != FORMAT:
        raise ConfigurationError(f"{where}: format must be {FORMAT!r}, not {raw.get('format')!r}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigurationError(f"{where}: unknown keys {sorted(unknown)}")
    columns_raw = raw.get("columns")
    if not isinstance(columns_raw, dict) or not columns_raw:
        raise ConfigurationError(f"{where}: 'columns' must map column names to their rules")
    columns = {str(name): _column(str(name), spec, where) for name, spec in columns_raw.items()}
    label = raw.get("label")
    if not isinstance(label, str) or label not in columns:
        raise ConfigurationError(f"{where}: 'label' must name one of the columns (got {label!r})")
    protected = raw.get("protected") or []
    if not isinstance(protected, list) or any(p not in columns for p in protected):
        raise ConfigurationError(f"{where}: 'protected' must list columns of the schema")
    rows = raw.get("rows") or {}
    if not isinstance(rows, dict) or set(rows) - {"min", "max"}:
        raise ConfigurationError(f"{where}: 'rows' takes only min and max")
    min_rows, max_rows = rows.get("min", 1), rows.get("max")
    if not isinstance(min_rows, int) or (max_rows is not None and (not isinstance(max_rows, int) or max_rows < min_rows)):
        raise ConfigurationError(f"{where}: rows.min and rows.max must be integers with min <= max")
    reference_file = reference_sha256 = None
    if raw.get("reference") is not None:
        ref = raw["reference"]
        if not isinstance(ref, dict) or set(ref) != {"file", "sha256"}:
            raise ConfigurationError(f"{where}: 'reference' needs exactly file and sha256")
        name = str(ref["file"])
        if "/" in name or "\\" in name or name.startswith("."):
            raise ConfigurationError(f"{where}: reference file must sit beside the schema ({name!r})")
        reference_file = (path.parent if path else Path(".")) / name
        reference_sha256 = str(ref["sha256"])
    if not isinstance(raw.get("dataset"), str) or not raw["dataset"]:
        raise ConfigurationError(f"{where}: 'dataset' (a name) is required")
    return Schema(dataset=raw["dataset"], label=label, columns=columns, protected=tuple(protected),
                  min_rows=min_rows, max_rows=max_rows, reference_file=reference_file,
                  reference_sha256=reference_sha256, path=path)


def _column(name: str, spec: Any, where: str) -> Column:
    if not isinstance(spec, dict):
        raise ConfigurationError(f"{where}: column {name!r} must be a mapping of rules")
    unknown = set(spec) - _COLUMN_KEYS
    if unknown:
        raise ConfigurationError(f"{where}: column {name!r} has unknown keys {sorted(unknown)}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigurationError(f"{where}: column {name!r} type must be one of {', '.join(TYPES)} (got {kind!r})")
    role = spec.get("role", "feature")
    if role not in ROLES:
        raise ConfigurationError(f"{where}: column {name!r} role must be one of {', '.join(ROLES)}")
    allowed = spec.get("allowed")
    if allowed is not None and (not isinstance(allowed, list) or not allowed):
        raise ConfigurationError(f"{where}: column {name!r} 'allowed' must be a non-empty list")
    for bound in ("min", "max"):
        value = spec.get(bound)
        if value is not None and (kind not in ("integer", "number") or isinstance(value, bool)
                                  or not isinstance(value, int | float)):
            raise ConfigurationError(f"{where}: column {name!r} {bound} must be a number on a numeric column")
    if spec.get("min") is not None and spec.get("max") is not None and spec["min"] > spec["max"]:
        raise ConfigurationError(f"{where}: column {name!r} has min > max")
    classes = spec.get("classes") or {}
    if not isinstance(classes, dict) or not all(isinstance(v, str) for v in classes.values()):
        raise ConfigurationError(f"{where}: column {name!r} 'classes' must map each value to a name")
    return Column(name=name, type=kind, nullable=bool(spec.get("nullable", False)), min=spec.get("min"),
                  max=spec.get("max"), allowed=tuple(allowed) if allowed is not None else None, role=role,
                  description=str(spec.get("description") or ""),
                  classes=tuple((str(k), str(v)) for k, v in classes.items()))


def select_schema(source: str, schemas: Mapping[str, Any], config_dir: Path) -> Path:
    """The schema file for a drop named ``source``: the first ``by_source`` glob that matches, else ``default``."""
    for pattern, file in dict(schemas.get("by_source") or {}).items():
        if fnmatch.fnmatch(source, str(pattern)):
            return config_dir / str(file)
    default = schemas.get("default")
    if not default:
        raise ConfigurationError(f"no schema for drop {source!r}: set schemas.default or schemas.by_source "
                                 "in validation.yaml")
    return config_dir / str(default)


def load_reference(schema: Schema) -> pd.DataFrame | None:
    """The schema's bundled trusted sample, refused unless it hashes to the pinned digest."""
    if schema.reference_file is None:
        return None
    try:
        data = schema.reference_file.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"reference sample not found: {schema.reference_file}") from None
    actual = sha256_bytes(data)
    if actual != schema.reference_sha256:
        # A swapped reference would make poisoned labels look normal: refuse it.
        raise IntegrityError(f"reference sample {schema.reference_file.name} hashes to sha256:{actual[:16]}…, "
                             f"not the sha256:{str(schema.reference_sha256)[:16]}… its schema pins")
    if schema.reference_file.suffix == ".parquet":
        return pd.read_parquet(io.BytesIO(data))
    return pd.read_csv(io.BytesIO(data))


# -- drafting a schema from a trusted sample ---------------------------------------------------------
def infer_schema(frame: pd.DataFrame, *, name: str, label: str | None = None,
                 protected: Sequence[str] = (), max_categories: int = MAX_CATEGORIES) -> dict[str, Any]:
    """A starting schema (a mapping ready for :func:`dump_schema`) for a person to review."""
    if frame.empty:
        raise ConfigurationError("cannot infer a schema from a frame with no rows")
    if label is not None and label not in frame.columns:
        raise ConfigurationError(f"label column {label!r} is not in the data (columns: {list(frame.columns)})")
    missing = [p for p in protected if p not in frame.columns]
    if missing:
        raise ConfigurationError(f"protected columns {missing} are not in the data")
    columns: dict[str, dict[str, Any]] = {}
    for column in frame.columns:
        series = frame[column]
        spec: dict[str, Any] = {}
        distinct = series.dropna().unique()
        if pd.api.types.is_bool_dtype(series):
            spec["type"] = "boolean"
        elif pd.api.types.is_integer_dtype(series) or (
                pd.api.types.is_float_dtype(series) and series.dropna().mod(1).eq(0).all() and len(distinct)):
            spec["type"] = "integer"
        elif pd.api.types.is_numeric_dtype(series):
            spec["type"] = "number"
        else:
            spec["type"] = "category" if len(distinct) <= max_categories else "text"
        if series.isna().any():
            spec["nullable"] = True
        if spec["type"] in ("integer", "number") and len(distinct):
            low, high = series.min(), series.max()
            spec["min"], spec["max"] = (int(low), int(high)) if spec["type"] == "integer" else (float(low), float(high))
            if column == label and len(distinct) <= max_categories:
                spec = {"type": spec["type"], "allowed": sorted(int(v) for v in distinct)}
        elif spec["type"] in ("category", "boolean"):
            spec["allowed"] = sorted((v.item() if hasattr(v, "item") else v for v in distinct), key=str)
        elif spec["type"] == "text":
            spec["role"] = "ignore"
        columns[str(column)] = spec
    return {
        "format": FORMAT,
        "dataset": name,
        "label": label,
        "protected": list(protected),
        "rows": {"min": max(1, len(frame) // 10), "max": len(frame) * 1000},
        "columns": columns,
    }


def dump_schema(draft: Mapping[str, Any], *, source: str = "") -> str:
    """YAML text for a drafted schema, with a header asking for review."""
    header = [
        "# DRAFT written by `secure-ml schema init`" + (f" from {source}" if source else "") + ".",
        "# Review before use: ranges and categories are only what this sample happened to contain.",
        "# Widen what legitimately varies, tighten what must not, and set label and protected.",
    ]
    if draft.get("label") is None:
        header.append("# REVIEW: 'label' is not set; name the column a model predicts.")
    body = yaml.safe_dump(dict(draft), sort_keys=False, allow_unicode=True, default_flow_style=None, width=110)
    return "\n".join(header) + "\n" + body
