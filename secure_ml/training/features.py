"""Features: what the model reads, fitted on the training split only, stored as JSON (no pickle).

    spec = DataSpec.from_validated(validated_dataset)          # label, numeric, categorical
    prep = Preprocessing.fit(train_frame, spec)                # standardisation + one-hot categories
    X, unknown = prep.transform(frame, where="request")        # float32 matrix, unseen categories
    Preprocessing.from_json(prep.to_json()) == prep

A category not seen in training becomes the all-zero code (no known category's weight applies)
and is counted in :meth:`Preprocessing.transform`'s report; NaN or infinite numbers are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_ml.errors import BadInput, IntegrityError

PREPROCESSING_FORMAT = "secure-ml-preprocessing/1"


@dataclass(frozen=True)
class DataSpec:
    label: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]

    def __init__(self, label: str, numeric: Sequence[str], categorical: Sequence[str]) -> None:
        object.__setattr__(self, "label", str(label))
        object.__setattr__(self, "numeric", tuple(str(c) for c in numeric))
        object.__setattr__(self, "categorical", tuple(str(c) for c in categorical))

    @classmethod
    def from_validated(cls, validated: Mapping[str, Any]) -> DataSpec:
        try:
            return cls(validated["label"], validated["numeric"], validated["categorical"])
        except (KeyError, TypeError):
            raise BadInput("validated_dataset lacks label, numeric or categorical") from None


@dataclass(frozen=True)
class Preprocessing:
    """Standardisation of numerics and one-hot codes of categoricals; JSON only (no pickle)."""

    label: str
    numeric: dict[str, tuple[float, float]]
    categorical: dict[str, tuple[str, ...]]

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(c) for c in self.categorical.values())

    @classmethod
    def fit(cls, frame: Any, spec: DataSpec) -> Preprocessing:
        """Fit on the training split only; refuses empty, one-class or non-finite training data."""
        import pandas as pd

        missing = [c for c in (spec.label, *spec.numeric, *spec.categorical) if c not in frame.columns]
        if missing:
            raise BadInput(f"training split lacks column {missing[0]!r}")
        if len(frame) == 0:
            raise BadInput("the training split is empty: nothing to train on")
        labels = _labels(frame[spec.label], "training split")
        classes = sorted(set(labels.tolist()))
        if len(classes) < 2:
            raise BadInput(f"the training split has one class only ({spec.label} = {int(classes[0])}): "
                           "a classifier needs both")
        numeric: dict[str, tuple[float, float]] = {}
        for name in spec.numeric:
            values = _numbers(frame[name], name, "training split")
            std = float(values.std())
            numeric[name] = (float(values.mean()), std if std > 0 and math.isfinite(std) else 1.0)
        categorical: dict[str, tuple[str, ...]] = {}
        for name in spec.categorical:
            column = frame[name]
            known = sorted({str(v) for v in column[pd.notna(column)].tolist()})
            categorical[name] = tuple(known)
        return cls(spec.label, numeric, categorical)

    def transform(self, frame: Any, *, where: str = "data") -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
        """(float32 matrix, unknown categories per column: {count, values}). Non-finite numbers refused."""
        import pandas as pd

        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise BadInput(f"{where} lacks column {missing[0]!r}")
        out = np.zeros((len(frame), self.width), dtype=np.float32)
        for i, (name, (mean, std)) in enumerate(self.numeric.items()):
            out[:, i] = (_numbers(frame[name], name, where) - mean) / std
        column = len(self.numeric)
        unknown: dict[str, dict[str, Any]] = {}
        for name, categories in self.categorical.items():
            values = frame[name]
            # each present value's str() looked up among the fitted categories (-1: unknown or missing), in
            # pandas' own hashing: no Python object per row
            if not pd.api.types.is_string_dtype(values.dtype) or values.dtype == object:
                values = values.astype(str).where(values.notna())  # str(v) of every present value
            codes = pd.Categorical(values, categories=list(categories)).codes.astype(np.int64)
            rows = np.flatnonzero(codes >= 0)
            out[rows, column + codes[rows]] = 1.0
            if (codes < 0).any():
                seen = values[codes < 0]
                shown = sorted({"<missing>" if pd.isna(v) else str(v)[:40] for v in seen.tolist()})
                unknown[name] = {"count": int((codes < 0).sum()), "values": shown[:10]}
            column += len(categories)
        return out, unknown

    def labels(self, frame: Any, *, where: str = "data") -> np.ndarray:
        if self.label not in frame.columns:
            raise BadInput(f"{where} lacks the label column {self.label!r}")
        return _labels(frame[self.label], where).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PREPROCESSING_FORMAT,
            "label": self.label,
            "features": self.features,
            "numeric": {n: {"mean": m, "std": s} for n, (m, s) in self.numeric.items()},
            "categorical": {n: {"categories": list(c), "unknown": "all-zero code"} for n, c in self.categorical.items()},
            "fitted_on": "training split only",
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preprocessing:
        try:
            if data.get("format") != PREPROCESSING_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            # The order of ``features`` is the column order of the encoding (JSON objects carry none).
            order = [str(f) for f in data["features"]]
            if sorted(order) != sorted([*data["numeric"], *data["categorical"]]):
                raise ValueError("features do not match numeric and categorical")
            numeric = {n: (float(data["numeric"][n]["mean"]), float(data["numeric"][n]["std"]))
                       for n in order if n in data["numeric"]}
            categorical = {n: tuple(str(c) for c in data["categorical"][n]["categories"])
                           for n in order if n in data["categorical"]}
            if any(not (math.isfinite(m) and math.isfinite(s) and s > 0) for m, s in numeric.values()):
                raise ValueError("a non-finite mean or scale")
            return cls(str(data["label"]), numeric, categorical)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"preprocessing.json is not usable ({exc})") from None


def _labels(column: Any, where: str) -> np.ndarray:
    import pandas as pd

    if column.isna().any():
        raise BadInput(f"{where}: the label has {int(column.isna().sum())} missing values")
    values = pd.to_numeric(column, errors="coerce")
    if values.isna().any() or not set(values.unique().tolist()) <= {0, 1}:
        raise BadInput(f"{where}: the label must be 0 or 1")
    return values.to_numpy(dtype=np.float64)


def _numbers(column: Any, name: str, where: str) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise BadInput(f"{where}: feature {name!r} has {int(bad.sum())} NaN, infinite or non-numeric values "
                       f"(first at row {int(np.flatnonzero(bad)[0])})")
    return values

