"""The unseen-rows table (issue 20) run as a resumable log: each drop's decisions are appended as
one JSON line as soon as they are known, so a long run on a busy machine keeps what it measured.

    python -m bench.unseen_log LOG.jsonl CLEAN ATTACKED [INDEX[:SCENARIO] ...]   # run (skips jobs in the log)
    python -m bench.unseen_log LOG.jsonl                                      # print the table so far

Same jobs, seeds and decisions as ``bench_data.unseen_table`` (``_unseen_one``), in the order given:
a data set's index (0 German credit, 1 breast cancer, 2 diabetes) for all its scenarios, or
``INDEX:SCENARIO`` for one (default: all three data sets).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def run(log: Path, clean: int, attacked: int, order: list[str], workers: int = 2) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from bench.bench_data import SCENARIOS, _unseen_one

    done = {tuple(r["job"]) for r in _read(log)}
    jobs: list[tuple[int, str, int]] = []
    for entry in order:
        index, _, only = entry.partition(":")
        for scenario in [only] if only else SCENARIOS:
            if scenario not in SCENARIOS:
                raise SystemExit(f"unknown scenario {scenario!r}; one of {SCENARIOS}")
            jobs += [(int(index), scenario, seed) for seed in range(clean if scenario == "clean" else attacked)
                     if (int(index), scenario, seed) not in done and (int(index), scenario, seed) not in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool, log.open("a") as out:
        futures = {pool.submit(_unseen_one, job): job for job in jobs}
        for future in as_completed(futures):
            name, scenario, decided = future.result()
            out.write(json.dumps({"job": list(futures[future]), "name": name, "scenario": scenario,
                                  "decided": decided}) + "\n")
            out.flush()


def _read(log: Path) -> list[dict]:  # type: ignore[type-arg]
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def table(log: Path) -> dict[tuple[str, str], dict[str, float]]:
    from bench.bench_data import METHODS, SCENARIOS, datasets

    rows = _read(log)
    out: dict[tuple[str, str], dict[str, float]] = {}
    for name, *_ in datasets():
        for scenario in SCENARIOS:
            cell = [r["decided"] for r in rows if r["name"] == name and r["scenario"] == scenario]
            if not cell:
                continue
            out[(name, scenario)] = {m: float(np.nanmean([c[m] for c in cell])) for m in METHODS}
            out[(name, scenario)]["runs"] = len(cell)
    return out


if __name__ == "__main__":
    from bench.bench_data import markdown

    path = Path(sys.argv[1])
    if len(sys.argv) > 2:
        run(path, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] or ["0", "1", "2"])
    print(markdown(table(path)))
