"""Simulated poisoning for benchmarks, tests and calibration (never used on real drops).

    drop, mask = flip_subgroup(frame, "risk", frame["purpose"] == "car", fraction=0.2, seed=1)
    drop, mask = flip_class(frame, "risk", source=1, target=0, fraction=0.1, seed=1)   # only 1 -> 0
    drop, mask = trigger_backdoor(frame, "risk", {"purpose": "vacation/others", "duration": 60},
                                  target=0, fraction=0.05, seed=1)

Each returns a copy and the mask of the rows it changed. Uniform flips are
:func:`secure_ml.poisoning.flip_labels`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd


def flip_subgroup(frame: pd.DataFrame, label: str, members: pd.Series | np.ndarray, *, fraction: float,
                  seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Flip ``fraction`` of the labels of the rows in one subgroup (to another class at random)."""
    rng = np.random.default_rng(seed)
    inside = np.flatnonzero(np.asarray(members, dtype=bool))
    chosen = rng.choice(inside, size=int(round(fraction * len(inside))), replace=False)
    out = frame.copy()
    values = out[label].to_numpy().copy()
    classes = np.unique(values)
    for i in chosen:
        others = classes[classes != values[i]]
        values[i] = others[rng.integers(len(others))]
    out[label] = values
    mask = np.zeros(len(frame), dtype=bool)
    mask[chosen] = True
    return out, mask


def flip_class(frame: pd.DataFrame, label: str, *, source: Any, target: Any, fraction: float,
               seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Class-conditional flips: ``fraction`` of the rows labelled ``source`` become ``target``."""
    members = (frame[label] == source).to_numpy()
    rng = np.random.default_rng(seed)
    inside = np.flatnonzero(members)
    chosen = rng.choice(inside, size=int(round(fraction * len(inside))), replace=False)
    out = frame.copy()
    values = out[label].to_numpy().copy()
    values[chosen] = target
    out[label] = values
    mask = np.zeros(len(frame), dtype=bool)
    mask[chosen] = True
    return out, mask


def trigger_backdoor(frame: pd.DataFrame, label: str, trigger: Mapping[str, Any], *, target: Any,
                     fraction: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A backdoor: ``fraction`` of the rows get the trigger's (rare) values and the target label."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(frame), size=int(round(fraction * len(frame))), replace=False)
    out = frame.copy()
    for column, value in trigger.items():
        values = out[column].to_numpy().copy()
        values[chosen] = value
        out[column] = values
    values = out[label].to_numpy().copy()
    values[chosen] = target
    out[label] = values
    mask = np.zeros(len(frame), dtype=bool)
    mask[chosen] = True
    return out, mask


def rare_trigger(reference: pd.DataFrame, numeric: list[str], categorical: list[str]) -> dict[str, Any]:
    """A plausible trigger: the rarest value of one categorical feature and the reference's 99th
    percentile of the most finely valued numeric feature (two of those when there is no categorical one)."""
    trigger: dict[str, Any] = {}
    if categorical:
        column = categorical[-1]
        trigger[column] = reference[column].value_counts().idxmin()
    fine = sorted(numeric, key=lambda c: -reference[c].nunique())
    for column in fine[: 1 if categorical else 2]:
        value = float(np.nanquantile(reference[column].to_numpy(dtype=np.float64), 0.99))
        trigger[column] = int(round(value)) if pd.api.types.is_integer_dtype(reference[column]) else value
    return trigger


def flip_labels(frame: pd.DataFrame, label: str, fraction: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A copy with ``fraction`` of rows given a different label at random; returns (frame, flipped mask)."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    n = len(out)
    chosen = rng.choice(n, size=int(round(fraction * n)), replace=False)
    values = out[label].to_numpy().copy()
    classes = np.unique(values)
    for i in chosen:
        others = classes[classes != values[i]]
        values[i] = others[rng.integers(len(others))]
    out[label] = values
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return out, mask


def bootstrap(frame: pd.DataFrame, seed: int, rows: int | None = None) -> pd.DataFrame:
    """A resample with replacement (a plausible new drop of the same population)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(frame), size=rows or len(frame))
    return frame.iloc[picks].reset_index(drop=True)
