"""Crash safety, smoke-sized (issue 15): the real CLI killed with SIGKILL mid-way, then checked.

Touches: bench/crash_harness.py running ``python -m secure_ml keys rotate`` and ``pipeline run
--select dataset`` (ingest) in subprocesses against a temporary SECURE_ML_HOME, killing each process
group at seeded random points, re-running it, and checking the store objects, the audit chain and the
registry. Six kills here; ``make crash`` runs 200+ across every stage (README has the table).
Does not touch: the release stages (they need a whole pipeline run first: `make crash`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import crash_harness  # noqa: E402

pytestmark = pytest.mark.slow  # kills the pipeline and CLI and recovers


@pytest.mark.slow
def test_killed_rotation_and_ingest_recover_with_nothing_partial(tmp_path: Path) -> None:
    report = tmp_path / "crash.json"
    code = crash_harness.main(["--stages", "rotation,ingest", "--kills", "6", "--seed", "3",
                               "--budget-seconds", "900", "--json", str(report)])
    results = {r["stage"]: r for r in json.loads(report.read_text())}
    assert code == 0, results
    for stage in ("rotation", "ingest"):
        result = results[stage]
        assert result["kills"] >= 1 and result["recoveries"] == result["kills"], result
        assert result["partial_artifacts"] == 0 and result["audit_failures"] == 0 and not result["problems"]
    assert sum(r["kills"] for r in results.values()) == 6


def test_check_home_finds_a_partial_artifact(tmp_path: Path) -> None:
    """The harness's check can fail: a truncated store object is found, a cut audit log is found."""
    from secure_ml.settings import Settings, init_home

    settings = Settings.from_env({"SECURE_ML_HOME": str(tmp_path / "home"), "SECURE_ML_ACTOR": "t"})
    init_home(settings)
    ref = settings.artifact_store().put_bytes(b"x" * 5000)
    assert crash_harness.check_home(settings.home) == {"partial": [], "leftovers": [], "audit": [], "registry": []}
    path = settings.artifact_store().path_for(ref.sha256)
    path.chmod(0o600)
    path.write_bytes(path.read_bytes()[:-10])
    audit = settings.audit_path
    audit.chmod(0o600)
    audit.write_bytes(audit.read_bytes()[:-5])
    found = crash_harness.check_home(settings.home)
    assert len(found["partial"]) == 1 and found["audit"]
