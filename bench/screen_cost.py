"""Screening cost at scale, the scan against today's four detectors in one process (issue 20).

    python -m bench.screen_cost [ROWS] [REPEATS]

The bench's derived frame (``bench_data._derived``: the German credit sample resampled to ROWS rows,
1,000,000 by default, numeric values jittered) screened against the schema's pinned reference:
the full screen, then the same screen without the label-likelihood scan (today's detectors),
alternating, best of REPEATS each, with the load average before and after (the ratio moves with it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def measure(rows: int = 1_000_000, repeats: int = 3) -> dict[str, float]:
    import pandas as pd

    import secure_ml.data.poisoning as poisoning
    from bench.bench_data import REPO, _derived
    from secure_ml.data.schema import load_reference, load_schema

    schema = load_schema(REPO / "secure_ml" / "config" / "schemas" / "german_credit.yaml")
    reference = load_reference(schema)
    with tempfile.TemporaryDirectory() as tmp:
        _derived(rows, Path(tmp) / "derived.parquet")
        frame = pd.read_parquet(Path(tmp) / "derived.parquet")
    scan = poisoning._likelihood

    def timed(with_scan: bool) -> float:
        poisoning._likelihood = scan if with_scan else (lambda *args, **kwargs: [])
        try:
            started = time.perf_counter()
            poisoning.screen(frame, reference, label=schema.label, numeric=schema.numeric,
                             categorical=schema.categorical)
            return time.perf_counter() - started
        finally:
            poisoning._likelihood = scan

    load_before = os.getloadavg()[0]
    new, old = [], []
    for _ in range(repeats):
        new.append(timed(True))
        old.append(timed(False))
    return {"rows": rows, "screen_seconds": min(new), "screen_today_seconds": min(old),
            "ratio": min(new) / min(old), "load_before": load_before, "load_after": os.getloadavg()[0]}


if __name__ == "__main__":
    print(json.dumps(measure(*(int(a) for a in sys.argv[1:3]))))
