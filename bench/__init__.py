"""Benchmarks. `make bench` runs every bench/bench_*.py module's ``run(quick)``.

Each figure is printed as a ratio to a baseline measured in the same run, because these machines
are noisy. A module's ``run(quick: bool) -> list[Figure]`` returns its rows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Figure:
    issue: int
    name: str          # what was measured
    value: float       # ours
    unit: str
    baseline: str      # what we compare against
    baseline_value: float
    goal: str          # e.g. ">= 0.6x" or "<= 64 MiB"
    ok: bool

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value if self.baseline_value else float("nan")
