"""German-credit-shaped drops of any size, written in chunks (memory bounded by the chunk).

    python -m bench.large_drop ROWS OUT.csv [--seed 0]      # e.g. 10000000 /tmp/drop-10m.csv (~500 MB)

Rows are resampled from the bundled sample with jittered numerics (labels and categories kept, every
value inside the schema's ranges), so the drop passes validation and the poisoning screen like the
sample does. Nothing generated here is committed: write it outside the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "german_credit.csv"
CHUNK = 500_000


def write_drop(rows: int, out: Path, *, seed: int = 0, chunk: int = CHUNK) -> Path:
    """Write ``rows`` rows to ``out`` (CSV) atomically, ``chunk`` rows at a time."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    sample = pd.read_csv(SAMPLE)
    rng = np.random.default_rng(seed)
    tmp = out.with_name(f".{out.name}.part")
    with tmp.open("w", newline="") as handle:
        done = 0
        while done < rows:
            n = min(chunk, rows - done)
            part = sample.iloc[rng.integers(0, len(sample), n)].reset_index(drop=True)
            part["credit_amount"] = np.clip((part["credit_amount"] * rng.lognormal(0, 0.1, n)).round(),
                                            1, 100_000).astype("int64")
            part["duration"] = np.clip(part["duration"] + rng.integers(-2, 3, n), 1, 120)
            part["age"] = np.clip(part["age"] + rng.integers(-2, 3, n), 18, 100)
            part.to_csv(handle, index=False, header=done == 0)
            done += n
    os.replace(tmp, out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.large_drop")
    parser.add_argument("rows", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = write_drop(args.rows, args.out, seed=args.seed)
    print(f"{path}: {args.rows} rows, {path.stat().st_size / 2**20:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
