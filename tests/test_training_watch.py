"""Watching the training sandbox: the deviation rules and the record's isolation verdict.

Touches: secure_ml.training.watch and secure_ml.training.record on plain mappings, and one real
sandboxed probe whose measures (CPU, memory, I/O, tasks, denied attempts) are read back. The
Dagster check that uses them runs in tests/test_training_stage.py.
"""

from __future__ import annotations

import pytest

from secure_ml.errors import ConfigurationError
from secure_ml.training import sandbox
from secure_ml.training.record import record_problems
from secure_ml.training.watch import WatchBounds, deviations

RUN = {"cpu_seconds": 10.0, "peak_memory_bytes": 2e8, "block_read_bytes": 0, "block_written_bytes": 0,
       "bytes_from_child": 5e5, "tasks_started": 12, "denied": []}


def test_a_run_like_the_recent_ones_passes_and_one_far_off_or_denied_fails() -> None:
    bounds = WatchBounds(window=5, min_history=3, max_ratio=3.0)
    history = [RUN, {**RUN, "cpu_seconds": 12.0}, {**RUN, "cpu_seconds": 9.0}]
    assert deviations({**RUN, "cpu_seconds": 25.0}, history, bounds) == []
    far = deviations({**RUN, "cpu_seconds": 40.0, "tasks_started": 400}, history, bounds)
    assert far == ["cpu_seconds 40 is over 3x the median of the last 3 runs (10)",
                   "tasks_started 400 is over 3x the median of the last 3 runs (12)"]
    assert deviations({**RUN, "denied": ["socket.connect"]}, history, bounds) == ["denied attempt: socket.connect"]
    # Too little history: only denied attempts are judged.
    assert deviations({**RUN, "cpu_seconds": 1e6}, history[:2], bounds) == []
    assert deviations({**RUN, "denied": ["open /keys"]}, [], bounds) == ["denied attempt: open /keys"]
    # A cold page cache after warm ones (median 0 bytes read) is noise, not a deviation; a gigabyte is not.
    assert deviations({**RUN, "block_read_bytes": 651264}, history, bounds) == []
    assert deviations({**RUN, "block_read_bytes": 1 << 30}, history, bounds) == [
        "block_read_bytes 1.07374e+09 is over 3x the median of the last 3 runs (0)"]
    tight = WatchBounds.from_mapping({"floors": {"block_read_bytes": 0}})
    assert deviations({**RUN, "block_read_bytes": 651264}, history, tight) != []
    with pytest.raises(ConfigurationError, match="unknown measure 'gpu'"):
        WatchBounds.from_mapping({"floors": {"gpu": 1}})
    with pytest.raises(ConfigurationError, match="unknown setting 'ratio'"):
        WatchBounds.from_mapping({"ratio": 2})
    with pytest.raises(ConfigurationError, match="max_ratio above 1"):
        WatchBounds.from_mapping({"max_ratio": 0.5})


def test_the_record_fails_when_the_configured_isolation_level_was_not_met() -> None:
    base = {"format": "secure-ml-training-record/1"}
    assert "the model was not trained in the isolated process" in record_problems(
        {**base, "isolation": {"isolated": False, "level_met": False, "configured": "namespaces"}}, "0" * 64)
    assert "the training sandbox did not reach its configured level (namespaces)" not in record_problems(
        {**base, "isolation": {"isolated": True, "level_met": True, "configured": "namespaces"}}, "0" * 64)


@pytest.mark.skipif(sandbox.namespace_prefix() is None, reason="this host cannot create namespaces")
def test_the_sandbox_measures_what_the_child_did() -> None:
    report = sandbox.probe_isolation(sandbox.IsolationPolicy(), connect=("127.0.0.1", 9), read=["/root/x"])
    watch = report["policy"]["watch"]
    assert watch["cpu_seconds"] > 0 and watch["peak_memory_bytes"] > 1 << 20
    assert watch["bytes_to_child"] > 0 and watch["bytes_from_child"] > 0 and watch["tasks_started"] >= 1
    assert watch["denied"][0].startswith("socket.")
    assert any(d.startswith("open /root") for d in watch["denied"]) == ("/root" in report["policy"]["hidden"])
