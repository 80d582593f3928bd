"""Model-extraction defences: how precise the answers are, and a detector for extraction traffic.

    output = OutputPolicy.from_config({"decimals": 2})          # or {"label_only": true}; None: full
    output.render(probability, threshold)                        # {"probability": 0.73, "label": 1}
    detector = ExtractionDetector(model.spec)                   # from the model's own preprocessing
    verdict = detector.observe("frontend", rows)                 # an ExtractionVerdict the first time only
    detector.flagged("frontend")                                 # then the server throttles the token

The detector measures how far a token's queries sit from the training distribution. Training data
rarely has a numeric feature more than ``z_limit`` standard deviations from its training mean (the
preprocessing holds both); queries that sweep the input space (uniform or synthetic, what a surrogate
needs) often do. Over a sliding window of a token's last ``window`` instances, more than
``max_atypical_share`` of them that far out flags the token: once, sticky for the server's life.
Honest traffic from the data's own distribution stays well under the share (tests/test_extraction.py
replays the test split and runs a surrogate attack against it).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from secure_ml.errors import ConfigurationError
from secure_ml.release.serving.model import FeatureSpec


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

    def details(self) -> dict[str, Any]:
        return {"queries": self.queries, "atypical_share": round(self.atypical_share, 3), "window": self.window,
                "reason": "queries far from the training distribution (model extraction)"}


class ExtractionDetector:
    """Flags a token whose recent queries sit far from the training distribution (see the module doc)."""

    def __init__(self, spec: FeatureSpec, *, window: int = 50, min_queries: int = 20, z_limit: float = 3.0,
                 max_atypical_share: float = 0.3, max_clients: int = 10_000) -> None:
        if not (0 < min_queries <= window and z_limit > 0 and 0 < max_atypical_share < 1):
            raise ConfigurationError("extraction detector: need 0 < min_queries <= window, z_limit > 0, "
                                     "0 < max_atypical_share < 1")
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
            if len(recent) < self.min_queries:
                return None
            share = sum(recent) / len(recent)
            if share <= self.max_share:
                return None
            self._flagged.add(client)
            return ExtractionVerdict(client, self._seen[client], share, len(recent))
