"""Watching the training step: how this run's sandbox behaved against the model's recent runs.

    bounds = WatchBounds.from_mapping(config.get("watch"))           # training.yaml
    problems = deviations(record["isolation"]["watch"], recent, bounds)   # [] when within bounds

The sandbox measures each run (secure_ml.training.sandbox: CPU time, peak memory, block I/O,
bytes to and from the child, tasks started, every denied network or filesystem attempt); the
training record and the asset's metadata carry them. A run deviates when it attempted anything
denied, or when a measure exceeds ``max_ratio`` times the median of the model's recent runs
(at least ``min_history`` of them; fewer, and only the denied attempts are judged) and its noise
floor. The floors are absolute, per measure: a warm page cache reads 0 bytes from disk and a cold
one a few hundred KiB, so a ratio to a median of 0 would fail honest runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from secure_ml.errors import ConfigurationError, refuse_unknown

MEASURES = ("cpu_seconds", "peak_memory_bytes", "block_read_bytes", "block_written_bytes", "bytes_from_child",
            "tasks_started")
MIB = 1 << 20
FLOORS: dict[str, float] = {"cpu_seconds": 5.0, "peak_memory_bytes": 256 * MIB, "block_read_bytes": 64 * MIB,
                            "block_written_bytes": 64 * MIB, "bytes_from_child": 16 * MIB, "tasks_started": 8}


@dataclass(frozen=True)
class WatchBounds:
    window: int = 10
    min_history: int = 3
    max_ratio: float = 3.0
    # Small absolute values vary a lot in ratio (page cache, allocator, thread pools): at or below its
    # floor a measure never deviates, and the median is taken as at least the floor.
    floors: Mapping[str, float] = field(default_factory=lambda: dict(FLOORS))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> WatchBounds:
        data = dict(data or {})
        refuse_unknown(data, cls.__dataclass_fields__, "watch")
        floors = dict(data.get("floors") or {})
        unknown = sorted(set(floors) - set(MEASURES))
        if unknown:
            raise ConfigurationError(f"watch.floors: unknown measure {unknown[0]!r} (known: {', '.join(MEASURES)})")
        try:
            bounds = cls(window=int(data.get("window", cls.window)),
                         min_history=int(data.get("min_history", cls.min_history)),
                         max_ratio=float(data.get("max_ratio", cls.max_ratio)),
                         floors={**FLOORS, **{k: float(v) for k, v in floors.items()}})
        except (TypeError, ValueError):
            raise ConfigurationError("watch: window and min_history are whole numbers, max_ratio and floors "
                                     "numbers") from None
        if any(v < 0 for v in bounds.floors.values()):
            raise ConfigurationError("watch.floors: a floor cannot be negative")
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
        floor = bounds.floors.get(measure, FLOORS[measure])
        if value > floor and value > bounds.max_ratio * max(typical, floor):
            problems.append(f"{measure} {value:g} is over {bounds.max_ratio:g}x the median of the last "
                            f"{len(past)} runs ({typical:g})")
    return problems
