"""A deterministic, seeded, stratified train/test split that depends on row content, not row order.

    train, test = split(frame, label="risk", test_fraction=0.2, seed=20261123)

Each row gets a keyed hash of its content (the seed is the key); within each label class the rows
with the smallest hashes, ``round(test_fraction * class size)`` of them, form the test set. The
same rows therefore land on the same side however a drop is ordered, each class keeps its share
in both sets, and a different seed gives a different, equally stratified split. Both sets keep
the drop's row order.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from secure_ml.errors import BadInput


def assign_test(frame: pd.DataFrame, label: str, *, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean mask of the rows that go to the test set."""
    if label not in frame.columns:
        raise BadInput(f"split: no label column {label!r}")
    if not 0 < test_fraction < 1:
        raise BadInput(f"split: test_fraction must be between 0 and 1, not {test_fraction}")
    hash_key = hashlib.sha256(f"secure-ml split {seed}".encode()).hexdigest()[:16]
    hashes = pd.util.hash_pandas_object(frame, index=False, hash_key=hash_key).to_numpy()
    labels = frame[label].astype(str).to_numpy()
    test = np.zeros(len(frame), dtype=bool)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        take = int(round(test_fraction * len(members)))
        if take == len(members) and len(members) > 1:
            take -= 1  # keep at least one of every class for training
        order = np.lexsort((members, hashes[members]))  # by hash, ties (identical rows) by position
        test[members[order[:take]]] = True
    return test


def split(frame: pd.DataFrame, label: str, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test), both with a fresh 0-based index."""
    test = assign_test(frame, label, test_fraction=test_fraction, seed=seed)
    return frame[~test].reset_index(drop=True), frame[test].reset_index(drop=True)
