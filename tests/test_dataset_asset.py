"""The `dataset` asset's chain of custody on a real Dagster instance, and `secure-ml pipeline run`.

Touches: the real `dataset` asset and every check assets/data.py defines, materialised with
dg.materialize on the DagsterInstance under the fixture's DAGSTER_HOME (SQLite), the real
encrypted store and audit log, and a small downstream asset defined here that reads `dataset`
through the encrypted IO manager (it stands in for validated_dataset, so this file does not wait
on that stage). One byte of the stored ciphertext is flipped, between runs and, by a watcher
thread acting as an attacker on the disk, in the middle of a run. The installed `secure-ml`
CLI runs `pipeline run --select dataset --json` in a subprocess. Every file under DAGSTER_HOME
(event log, run storage) and the audit log is searched for key material.
Does not touch: the approval, DVC and access-control behaviour of the data stage
(tests/test_data_stage.py), or any stage after `dataset`.
"""

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

import assets.data as data_stage
import resources
from resources import CustodyResource
from secure_ml.settings import Settings
from tests.conftest import SAMPLE_CSV, land_file

pytestmark = pytest.mark.slow  # materialises the pipeline through the CLI

CLI = str(Path(sys.executable).parent / "secure-ml")
CUSTODY_CHECKS = ("ciphertext_authentic", "provenance_matches")


@dg.asset(ins={"dataset": dg.AssetIn()}, group_name="test", owners=["team:test"], code_version="1")
def dataset_profile(context: dg.AssetExecutionContext, dataset: pd.DataFrame,
                    custody: CustodyResource) -> dg.Output[Any]:
    """Downstream of `dataset` (stands in for validated_dataset): its row and column counts."""
    return custody.output(context, {"rows": len(dataset), "columns": list(dataset.columns)})


def stage_checks() -> list[Any]:
    return list(dg.load_asset_checks_from_modules([data_stage]))


def materialize(settings: Settings, *, drop: str | None = None,
                selection: dg.AssetSelection | None = None) -> dg.ExecuteInProcessResult:
    with dg.DagsterInstance.get() as instance:
        return dg.materialize(
            [data_stage.dataset, dataset_profile, *stage_checks()],
            instance=instance,
            resources=resources.build_resources(settings),
            selection=selection,
            run_config={"ops": {"dataset": {"config": {"drop": drop}}}} if drop else None,
            raise_on_error=False,
        )


def evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    return {e.asset_key.to_user_string(): {k: getattr(v, "value", v) for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}


def reason(evaluation: dg.AssetCheckEvaluation) -> str:
    return str(evaluation.metadata["reason"].value)


def flip_one_byte(path: Path, offset: int | None = None) -> None:
    blob = bytearray(path.read_bytes())
    offset = len(blob) // 2 if offset is None else offset
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))


def test_dataset_checks_pass_then_one_flipped_byte_fails_them_and_blocks_downstream(settings: Settings) -> None:
    drop = land_file(settings, SAMPLE_CSV)
    first = materialize(settings, drop=drop)
    assert first.success
    metadata = materialized(first)
    assert set(metadata) == {"dataset", "dataset_profile"}
    digest = metadata["dataset"]["sha256"]
    assert first.get_asset_materialization_events()[0].materialization.tags["dagster/data_version"] == digest
    checks = evaluations(first)
    for name in CUSTODY_CHECKS:
        assert checks[name].passed, reason(checks[name])
    assert "bytes authenticated; digest matches" in reason(checks["ciphertext_authentic"])
    assert reason(checks["provenance_matches"]).startswith(f"provenance names sha256:{digest[:16]}")
    assert settings.artifact_store().get_json(metadata["dataset_profile"]["sha256"])["rows"] == 1000

    # An attacker with write access to the store flips one byte of the dataset's ciphertext.
    stored = settings.artifacts_dir / metadata["dataset"]["stored_at"]
    assert stored == settings.artifact_store().path_for(digest)
    flip_one_byte(stored)

    # The checks and the downstream asset run again (the dataset itself is not re-ingested).
    second = materialize(settings, selection=dg.AssetSelection.checks_for_assets(data_stage.dataset)
                         | dg.AssetSelection.assets(dataset_profile))
    assert not second.success or "dataset_profile" not in materialized(second)
    checks = evaluations(second)
    failed = checks["ciphertext_authentic"]
    assert not failed.passed and failed.severity == dg.AssetCheckSeverity.ERROR
    assert failed.metadata["subject"].value == f"sha256:{digest}"
    assert "integrity failure" in reason(failed) and "failed authentication" in reason(failed)
    assert checks["provenance_matches"].passed  # the provenance record was not touched
    assert "dataset_profile" not in materialized(second)  # blocked: it never ran
    profile_events = [e for e in second.all_events if e.step_key == "dataset_profile"]
    assert not [e for e in profile_events if e.event_type_value == "STEP_START"]
    assert [e.step_key for e in second.get_step_failure_events()] == ["dataset_ciphertext_authentic"]
    entries = list(settings.audit_log().entries())
    fail = [e for e in entries if e["action"] == "check.ciphertext_authentic" and e["outcome"] == "fail"]
    assert len(fail) == 1 and fail[0]["details"]["run_id"] == second.run_id
    settings.audit_log().verify()
    assert_no_key_material(settings)


def key_spellings(settings: Settings) -> list[str]:
    found = []
    for entry in json.loads(settings.keyring_path.read_text())["keys"].values():
        material = base64.b64decode(entry["material"])
        found += [entry["material"], material.hex(), base64.urlsafe_b64encode(material).decode().rstrip("=")]
    return found


def assert_no_key_material(settings: Settings) -> None:
    """Search every file under DAGSTER_HOME (SQLite event log, run storage, compute logs) and the
    audit log for any spelling of any key in the keyring."""
    searched = [p for p in Path(os.environ["DAGSTER_HOME"]).rglob("*") if p.is_file()]
    searched.append(settings.audit_path)
    assert any(p.suffix == ".db" for p in searched)  # the SQLite event log is among them
    spellings = key_spellings(settings)
    secrets = [s.encode() for s in spellings] + [bytes.fromhex(spellings[1])]
    for path in searched:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"key material in {path}"


class ByteFlipper(threading.Thread):
    """An attacker on the disk: flips one byte of the first new object to appear in the store."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.objects = settings.artifacts_dir / "objects"
        self.before = set(self.objects.glob("*/*.smle"))
        self.flipped: Path | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.flipped is None:
            new = set(self.objects.glob("*/*.smle")) - self.before
            if new:
                (target,) = sorted(new)[:1]
                flip_one_byte(target)
                self.flipped = target
            time.sleep(0.001)


def test_a_byte_flipped_during_the_run_fails_the_check_and_downstream_never_runs(settings: Settings) -> None:
    """The same, in one run: the byte flips right after `dataset` stores its ciphertext."""
    drop = land_file(settings, SAMPLE_CSV)
    flipper = ByteFlipper(settings)
    flipper.start()
    try:
        result = materialize(settings, drop=drop)
    finally:
        flipper.stop.set()
        flipper.join()
    assert flipper.flipped is not None
    metadata = materialized(result)
    assert flipper.flipped == settings.artifact_store().path_for(metadata["dataset"]["sha256"])
    failed = evaluations(result)["ciphertext_authentic"]
    assert not failed.passed and "failed authentication" in reason(failed)
    assert set(metadata) == {"dataset"}  # dataset_profile was blocked in the same run


# -- secure-ml pipeline run ---------------------------------------------------------------------
def pipeline_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "pipeline", "run", "--select", "dataset", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


@pytest.mark.slow
def test_pipeline_run_json_end_to_end(settings: Settings) -> None:
    result = pipeline_run("--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert set(summary) >= {"run_id", "success", "selected", "assets", "checks", "failed_blocking_checks",
                            "step_failures"}
    assert summary["success"] is True and summary["selected"] == ["dataset"]
    assert summary["failed_blocking_checks"] == [] and summary["step_failures"] == []
    (asset,) = summary["assets"]
    assert asset["asset"] == "dataset" and asset["materialized"] is True and len(asset["sha256"]) == 64
    names = {c["check"] for c in summary["checks"]}
    assert set(CUSTODY_CHECKS) <= names
    for check in summary["checks"]:
        assert set(check) == {"asset", "check", "passed", "blocking", "reason"}
        assert check["passed"] is True and check["blocking"] is True and check["reason"]
    settings.artifact_store().verify(asset["sha256"])
    with dg.DagsterInstance.get() as instance:  # the run is on the instance under DAGSTER_HOME
        run = instance.get_run_by_id(summary["run_id"])
        assert run is not None and run.is_success
    assert_no_key_material(settings)


@pytest.mark.slow
def test_pipeline_run_exits_1_naming_the_failed_blocking_check(settings: Settings) -> None:
    flipper = ByteFlipper(settings)
    flipper.start()
    try:
        result = pipeline_run("--json")
    finally:
        flipper.stop.set()
        flipper.join()
    assert flipper.flipped is not None
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(   # then the check's one-line reason
        "secure-ml: blocking check failed: dataset:ciphertext_authentic: ")
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["success"] is False
    assert summary["failed_blocking_checks"] == ["dataset:ciphertext_authentic"]
    failed = next(c for c in summary["checks"] if c["check"] == "ciphertext_authentic")
    assert failed["passed"] is False and "failed authentication" in failed["reason"]
