"""Watching the training step: how this run's sandbox behaved against the model's recent runs.

    bounds = WatchBounds.from_mapping(config.get("watch"))           # training.yaml
    problems = deviations(record["isolation"]["watch"], recent, bounds)   # [] when within bounds

The sandbox measures each run (secure_ml.training.sandbox: CPU time, peak memory, block I/O,
bytes to and from the child, tasks started, every denied network or filesystem attempt); the
training record and the asset's metadata carry them. A run deviates when it attempted anything
denied, or when a measure exceeds ``max_ratio`` times the median of the model's recent runs
(at least ``min_history`` of them; fewer, and only the denied attempts are judged).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from secure_ml.errors import ConfigurationError

MEASURES = ("cpu_seconds", "peak_memory_bytes", "block_read_bytes", "block_written_bytes", "bytes_from_child",
            "tasks_started")


@dataclass(frozen=True)
class WatchBounds:
    window: int = 10
    min_history: int = 3
    max_ratio: float = 3.0
    # Small absolute values (a few ms of CPU, a few KiB) vary a lot in ratio; below these nothing deviates.
    floor: float = 1.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> WatchBounds:
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigurationError(f"watch: unknown setting {unknown[0]!r}")
        try:
            bounds = cls(window=int(data.get("window", cls.window)),
                         min_history=int(data.get("min_history", cls.min_history)),
                         max_ratio=float(data.get("max_ratio", cls.max_ratio)),
                         floor=float(data.get("floor", cls.floor)))
        except (TypeError, ValueError):
            raise ConfigurationError("watch: window and min_history are whole numbers, max_ratio a number") from None
        if bounds.window < 1 or bounds.min_history < 1 or bounds.max_ratio <= 1:
            raise ConfigurationError("watch: window and min_history must be at least 1, max_ratio above 1")
        return bounds


def deviations(current: Mapping[str, Any], recent: Sequence[Mapping[str, Any]], bounds: WatchBounds) -> list[str]:
    """Why this run deviates (one line each); empty when it does not."""
    problems = [f"denied attempt: {attempt}" for attempt in current.get("denied") or []]
    history = list(recent)[:bounds.window]
    if len(history) < bounds.min_history:
        return problems
    for measure in MEASURES:
        value = current.get(measure)
        past = [float(run[measure]) for run in history if isinstance(run.get(measure), (int, float))]
        if not isinstance(value, (int, float)) or len(past) < bounds.min_history:
            continue
        typical = statistics.median(past)
        if value > bounds.floor and value > bounds.max_ratio * max(typical, bounds.floor):
            problems.append(f"{measure} {value:g} is over {bounds.max_ratio:g}x the median of the last "
                            f"{len(past)} runs ({typical:g})")
    return problems
