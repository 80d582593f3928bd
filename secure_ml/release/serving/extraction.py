"""Model-extraction defences: how precise the answers are, and a detector for extraction traffic.

    output = OutputPolicy.from_config({"decimals": 2})          # or {"label_only": true}; None: full
    output.render(probability, threshold)                        # {"probability": 0.73, "label": 1}
    detector = ExtractionDetector(model.spec)                   # from the model's own preprocessing
    verdict = detector.observe("frontend", rows)                 # an ExtractionVerdict the first time only
    detector.flagged("frontend")                                 # then the server throttles the token

The detector runs two tests per token; either flags it, once, sticky for the server's life.

1. Distance from the training distribution. Training data rarely has a numeric feature more than
   ``z_limit`` standard deviations from its training mean (the preprocessing holds both); queries
   that sweep the input space (uniform or synthetic, what a surrogate needs) often do. Over a
   sliding window of a token's last ``window`` instances, more than ``max_atypical_share`` of them
   that far out flags the token.
2. PRADA (Juuti et al., 2019): the distance from each query to the nearest of the token's earlier
   queries (numeric features standardised, categories one-hot). Honest queries drawn from the data
   give roughly normal minimum distances; an attacker who perturbs a few seed rows (the Jacobian
   augmentation that near-data extraction needs) gives a skewed mix of tiny and large ones. Once
   ``prada_min_distances`` are in, a Shapiro-Wilk W over the last ``prada_window`` of them under
   ``prada_w`` flags the token. Repeated identical queries are not counted. Memory is bounded: the
   last ``prada_history`` queries per token, for the 1,000 most recently new tokens.

Honest traffic from the data's own distribution passes both (tests/test_extraction.py replays the
test split, a uniform sweep attack and a seed-perturbation attack against the real app).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_ml.errors import ConfigurationError
from secure_ml.release.serving.model import FeatureSpec


PRADA_MAX_CLIENTS = 1_000


@dataclass(frozen=True)
class OutputPolicy:
    """What an answer reveals: full-precision probabilities, rounded ones, or the label only."""

    decimals: int | None = None
    label_only: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> OutputPolicy:
        config = dict(config or {})
        unknown = sorted(set(config) - {"decimals", "label_only"})
        if unknown:
            raise ConfigurationError(f"serving.output: unknown key {unknown[0]!r} (decimals, label_only)")
        decimals = config.get("decimals")
        if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int)
                                     or not 0 <= decimals <= 15):
            raise ConfigurationError("serving.output.decimals must be an integer from 0 to 15")
        label_only = config.get("label_only", False)
        if not isinstance(label_only, bool):
            raise ConfigurationError("serving.output.label_only must be true or false")
        return cls(decimals, label_only)

    def render(self, probability: float, threshold: float) -> dict[str, Any]:
        label = int(probability >= threshold)
        if self.label_only:
            return {"label": label}
        shown = probability if self.decimals is None else round(probability, self.decimals)
        return {"probability": shown, "label": label}


@dataclass(frozen=True)
class ExtractionVerdict:
    client: str
    queries: int
    atypical_share: float
    window: int
    test: str = "distribution"          # distribution | prada
    shapiro_w: float | None = None

    def details(self) -> dict[str, Any]:
        if self.test == "prada":
            return {"queries": self.queries, "test": "prada", "shapiro_w": round(self.shapiro_w or 0.0, 3),
                    "window": self.window, "reason": "the distances between the token's queries are not normal "
                                                     "(perturbed seed rows: model extraction)"}
        return {"queries": self.queries, "atypical_share": round(self.atypical_share, 3), "window": self.window,
                "test": "distribution", "reason": "queries far from the training distribution (model extraction)"}


class _Distances:
    """One token's recent queries (encoded) and the minimum distance of each to those before it."""

    def __init__(self, history: int, window: int) -> None:
        self.queries: deque[np.ndarray] = deque(maxlen=history)
        self.minimums: deque[float] = deque(maxlen=window)

    def add(self, vector: np.ndarray) -> None:
        if self.queries:
            nearest = float(np.min(np.linalg.norm(np.stack(self.queries) - vector, axis=1)))
            if nearest == 0.0:
                return   # a repeated query tells an attacker nothing new (and a monitor repeats itself)
            self.minimums.append(nearest)
        self.queries.append(vector)


class ExtractionDetector:
    """Flags a token whose recent queries sit far from the training distribution (see the module doc)."""

    def __init__(self, spec: FeatureSpec, *, window: int = 50, min_queries: int = 20, z_limit: float = 3.0,
                 max_atypical_share: float = 0.3, max_clients: int = 10_000, prada: bool = True,
                 prada_w: float = 0.70, prada_min_distances: int = 40, prada_window: int = 100,
                 prada_history: int = 200) -> None:
        if not (0 < min_queries <= window and z_limit > 0 and 0 < max_atypical_share < 1):
            raise ConfigurationError("extraction detector: need 0 < min_queries <= window, z_limit > 0, "
                                     "0 < max_atypical_share < 1")
        if not (0 < prada_w < 1 and 3 <= prada_min_distances <= prada_window and prada_history >= 2):
            raise ConfigurationError("extraction detector: need 0 < prada_w < 1, 3 <= prada_min_distances <= "
                                     "prada_window, prada_history >= 2")
        self.prada = prada
        self.prada_w, self.prada_min, self.prada_window, self.prada_history = (
            prada_w, prada_min_distances, prada_window, prada_history)
        self._distances: dict[str, _Distances] = {}
        self.spec = spec
        self.window, self.min_queries = window, min_queries
        self.z_limit, self.max_share = z_limit, max_atypical_share
        self.max_clients = max_clients
        self._recent: dict[str, deque[bool]] = {}
        self._seen: dict[str, int] = {}
        self._flagged: set[str] = set()
        self._lock = threading.Lock()

    def atypical(self, row: Mapping[str, Any]) -> bool:
        """True if any numeric feature is more than ``z_limit`` training standard deviations out."""
        return any(abs((float(row[name]) - mean) / scale) > self.z_limit
                   for name, (mean, scale) in self.spec.numeric.items())

    def flagged(self, client: str) -> bool:
        return client in self._flagged

    def encode(self, row: Mapping[str, Any]) -> np.ndarray:
        """Standardised numeric features, then one-hot categories: the space PRADA measures distances in."""
        numeric = [(float(row[n]) - mean) / scale for n, (mean, scale) in self.spec.numeric.items()]
        onehot = [1.0 if row[n] == c else 0.0 for n, cats in self.spec.categorical.items() for c in cats]
        return np.asarray(numeric + onehot, dtype=np.float32)

    def _prada(self, client: str, rows: Sequence[Mapping[str, Any]]) -> float | None:
        """Shapiro-Wilk W of the token's recent minimum distances, once there are enough (lock held)."""
        from scipy.stats import shapiro

        distances = self._distances.get(client)
        if distances is None:
            if len(self._distances) >= min(self.max_clients, PRADA_MAX_CLIENTS):
                self._distances.pop(next(iter(self._distances)))
            distances = self._distances[client] = _Distances(self.prada_history, self.prada_window)
        for row in rows:
            distances.add(self.encode(row))
        if len(distances.minimums) < self.prada_min:
            return None
        values = np.fromiter(distances.minimums, dtype=np.float64)
        if float(np.ptp(values)) == 0.0:
            return 0.0   # every query the same distance from the last (a grid walk): as far from normal as it gets
        return float(shapiro(values).statistic)

    def observe(self, client: str, rows: Sequence[Mapping[str, Any]]) -> ExtractionVerdict | None:
        """Record ``rows`` (validated instances) for ``client``; a verdict the first time it is flagged."""
        marks = [self.atypical(row) for row in rows]
        with self._lock:
            if client in self._flagged:
                return None
            if client not in self._recent and len(self._recent) >= self.max_clients:
                self._recent.pop(next(iter(self._recent)))   # bounded memory: forget the oldest client
            recent = self._recent.setdefault(client, deque(maxlen=self.window))
            recent.extend(marks)
            self._seen[client] = self._seen.get(client, 0) + len(marks)
            share = sum(recent) / len(recent)
            if len(recent) >= self.min_queries and share > self.max_share:
                self._flagged.add(client)
                return ExtractionVerdict(client, self._seen[client], share, len(recent))
            w = self._prada(client, rows) if self.prada else None
            if w is not None and w < self.prada_w:
                self._flagged.add(client)
                return ExtractionVerdict(client, self._seen[client], share, len(self._distances[client].minimums),
                                         test="prada", shapiro_w=w)
            return None
