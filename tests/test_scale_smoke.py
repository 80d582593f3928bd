"""Scale smoke (issue 17): a generated German-credit-shaped drop through the pipeline up to training.

Touches: bench/large_drop.py writing a drop in chunks, `secure-ml pipeline run --select
+validated_dataset --json` as a real child process on a fresh home (real Dagster instance,
encryption, DVC, Great Expectations, the poisoning screen), the event-log step timings and the
child's peak RSS that bench/bench_scale.py reports. Does not touch: 1M/10M rows (`make
bench-large`), training.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench.bench_scale import measure_rows, table
from bench.large_drop import write_drop


def test_generated_drop_is_written_in_chunks_and_stays_in_the_schema(tmp_path: Path) -> None:
    drop = write_drop(2_500, tmp_path / "german_credit_2500.csv", chunk=1_000)
    frame = pd.read_csv(drop)
    assert len(frame) == 2_500 and not list(tmp_path.glob(".*.part"))
    assert frame["credit_amount"].between(1, 100_000).all() and frame["age"].between(18, 100).all()
    assert frame["duration"].between(1, 120).all() and set(frame["risk"]) == {0, 1}
    assert write_drop(2_500, tmp_path / "same.csv", chunk=1_000).read_bytes() == drop.read_bytes()  # seeded
    with pytest.raises(ValueError, match="at least 1"):
        write_drop(0, tmp_path / "none.csv")


@pytest.mark.slow
def test_a_generated_drop_runs_up_to_training_with_timings_and_peak_memory(tmp_path: Path) -> None:
    result = measure_rows(5_000, tmp_path)
    summary = result["summary"]
    assert summary["success"], summary["step_failures"]
    assert [a["asset"] for a in summary["assets"]] == ["dataset", "validated_dataset"]
    assert all(a["materialized"] for a in summary["assets"])
    steps = result["steps"]
    assert steps["dataset"] > 0 and steps["validated_dataset"] > 0
    assert steps["run"] >= steps["dataset"] + steps["validated_dataset"]
    assert 100 * 2**20 < result["peak_rss"] < 2 * 2**30
    assert not list(tmp_path.glob("*.csv"))  # the generated drop is deleted
    rendered = table([result])
    assert "| validated_dataset |" in rendered and "| peak RSS |" in rendered and "5,000 rows" in rendered


def test_utf8_is_checked_a_chunk_at_a_time_with_the_exact_offset() -> None:
    """Large drops are checked without a second, decoded copy; the reported offset stays exact when
    a character or the bad byte straddles a chunk boundary."""
    from secure_ml.data.ingest import _first_invalid_utf8

    text = ("aé€😀" * 50).encode()
    bad = text[:101] + b"\xff" + text[101:]
    for chunk in (1, 2, 3, 4, 7, 64, 1 << 24):
        assert _first_invalid_utf8(text, chunk=chunk) is None
        assert _first_invalid_utf8(bad, chunk=chunk) == 101
        assert _first_invalid_utf8(text[:-1], chunk=chunk) == len(text) - 4  # a cut 4-byte character
