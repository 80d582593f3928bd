"""python -m bench [--quick] [--only NAME]: run the benchmarks and print one table."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

import bench
from bench import Figure


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", help="run only bench modules whose name contains this")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    figures: list[Figure] = []
    for module in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        if not module.name.startswith("bench_") or (args.only and args.only not in module.name):
            continue
        started = time.perf_counter()
        print(f"# {module.name} ...", file=sys.stderr, flush=True)
        rows = importlib.import_module(f"bench.{module.name}").run(args.quick)
        print(f"# {module.name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
        figures.extend(rows)
    header = f"{'issue':>5}  {'figure':<58} {'ours':>12} {'baseline':<34} {'ratio':>7}  {'goal':<14} ok"
    print(header)
    print("-" * len(header))
    for f in figures:
        ours = f"{f.value:.4g} {f.unit}"
        base = f"{f.baseline} {f.baseline_value:.4g}"
        print(f"{f.issue:>5}  {f.name:<58} {ours:>12} {base:<34} {f.ratio:>7.3f}  {f.goal:<14} {'yes' if f.ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps([{**f.__dict__, "ratio": f.ratio} for f in figures], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
