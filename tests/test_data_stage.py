"""The `dataset` asset on a real Dagster instance: approved sources, access control, DVC, duplicates.

Touches: the real asset and its four blocking checks (assets/data.py) materialised with
dg.materialize on a DagsterInstance under a fresh DAGSTER_HOME, the real encrypted store, the
real audit log, a real DVC repository and remote under SECURE_ML_HOME, the default sources.yaml
and roles.yaml, and the encrypted IO manager's data.read check (through a small downstream asset
defined here), and `dvc status --cloud` on the repository the asset wrote. Does not touch
validated_dataset or anything after it (their own tests do), the landing sensor, or the
secure-ml CLI (`dvc pull` and restoring into the store are in test_versioning.py).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

import assets.data as data_stage
import resources
from secure_ml.cli.cmd_pipeline import land
from secure_ml.data.versioning import DatasetVersions
from secure_ml.settings import ACTOR_TAG, Settings
from tests.conftest import SAMPLE_CSV, land_file

pytestmark = pytest.mark.slow  # materialises the data stage with DVC

DATASET_CHECKS = {"ciphertext_authentic", "provenance_matches", "source_approved",
                  "access_policy_allows"}


def materialize(settings: Settings, drop: str, *, actor: str | None = None, checks: bool = True,
                persistent: bool = True) -> dg.ExecuteInProcessResult:
    """The dataset asset (and, unless checks=False, its four checks) on the instance under DAGSTER_HOME
    (or, for a run that must fail and leave nothing, Dagster's in-memory instance: same execution,
    a tenth of the time on this shared machine)."""
    with (dg.DagsterInstance.get() if persistent else dg.DagsterInstance.ephemeral()) as instance:
        return dg.materialize(
            [data_stage.dataset, *(data_stage_checks() if checks else [])],
            instance=instance,
            resources=resources.build_resources(settings),
            run_config={"ops": {"dataset": {"config": {"drop": drop}}},
                        "loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            tags={ACTOR_TAG: actor} if actor else {},
            raise_on_error=False,
        )


def data_stage_checks() -> list[Any]:
    return [data_stage.ciphertext_authentic, data_stage.provenance_matches,
            data_stage.source_approved, data_stage.access_policy_allows]


def failure(result: dg.ExecuteInProcessResult) -> str:
    events = result.get_step_failure_events()
    assert events, "expected the step to fail"
    error = events[0].step_failure_data.error
    return str(getattr(events[0].step_failure_data.user_failure_data, "description", "") or error.message)


def metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    events = result.get_asset_materialization_events()
    assert len(events) == 1
    return {k: getattr(v, "value", v) for k, v in events[0].materialization.metadata.items()}


def checks(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def audit(settings: Settings, action: str) -> list[dict[str, Any]]:
    return [e for e in settings.audit_log().entries() if e["action"] == action]


def objects(settings: Settings) -> list[Path]:
    return sorted((settings.artifacts_dir / "objects").glob("*/*.smle"))


def test_sample_as_landed_by_the_cli_is_ingested_versioned_and_checked(settings: Settings) -> None:
    drop = land(settings, SAMPLE_CSV)  # german_credit-<12 hex>.csv, as `secure-ml pipeline run` lands it
    result = materialize(settings, drop)
    assert result.success
    meta = metadata(result)
    assert meta["source"] == drop and meta["approved_source"] == "german_credit"
    assert meta["owner"] == "team:data-stewards" and meta["classification"] == "confidential"
    assert meta["rows"] == 1000 and meta["actor"] == "test-engineer"
    assert meta["dvc_version"].startswith("md5:")
    evaluations = checks(result)
    assert set(evaluations) == DATASET_CHECKS
    assert all(e.passed for e in evaluations.values()), {k: e.metadata for k, e in evaluations.items()}
    assert "approved source german_credit" in evaluations["source_approved"].metadata["reason"].value
    assert "may data.add (confidential)" in evaluations["access_policy_allows"].metadata["reason"].value

    # The provenance record (encrypted) names everything the issue asks for.
    store = settings.artifact_store()
    record = store.get_json(meta["provenance_sha256"])
    assert record["source"]["name"] == drop and record["source"]["size"] == SAMPLE_CSV.stat().st_size
    assert record["rows"] == 1000 and record["actor"] == "test-engineer" and record["ingested_at"]
    assert record["approved_source"] == {"name": "german_credit", "owner": "team:data-stewards",
                                         "classification": "confidential"}
    assert record["dvc_version"] == meta["dvc_version"] and record["artifact_sha256"] == meta["sha256"]

    # DVC holds the store's ciphertext, byte for byte, never the plaintext.
    versions = DatasetVersions.from_settings(settings)
    version = versions.find(record["source"]["sha256"])
    assert version is not None and version.version == meta["dvc_version"]
    tracked = versions.root / version.path
    assert tracked.read_bytes() == store.path_for(meta["sha256"]).read_bytes()
    assert b"radio/TV" not in tracked.read_bytes()
    assert store.get_dataframe(meta["sha256"]).equals(pd.read_csv(SAMPLE_CSV))
    assert [e["outcome"] for e in audit(settings, "access.allow")] == ["allow"]
    # The repository the asset wrote is an ordinary DVC repository for the dvc command line.
    cloud = subprocess.run([str(Path(sys.executable).with_name("dvc")), "status", "--cloud"], cwd=versions.root,
                           env={**os.environ, "DVC_NO_ANALYTICS": "1"}, capture_output=True, text=True,
                           timeout=120, check=False)
    assert cloud.returncode == 0 and "in sync" in cloud.stdout, cloud.stdout + cloud.stderr


def test_each_drop_is_a_version_and_the_same_bytes_are_not_processed_again(settings: Settings,
                                                                             tmp_path: Path) -> None:
    first = metadata(materialize(settings, land_file(settings, SAMPLE_CSV)))

    # A Parquet drop is a version of its own.
    pd.read_csv(SAMPLE_CSV).iloc[:400].to_parquet(tmp_path / "german_credit_q3.parquet", index=False)
    parquet = materialize(settings, land_file(settings, tmp_path / "german_credit_q3.parquet"), checks=False)
    assert parquet.success, failure(parquet)
    assert metadata(parquet)["rows"] == 400 and metadata(parquet)["sha256"] != first["sha256"]
    assert metadata(parquet)["dvc_version"] != first["dvc_version"]
    stored = objects(settings)

    # The first drop's bytes again, under another name, by another steward: the same version.
    again = materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit_again.csv"), actor="alice")
    assert again.success
    meta = metadata(again)
    event = again.get_asset_materialization_events()[0].materialization
    assert meta["sha256"] == first["sha256"] and event.tags["dagster/data_version"] == first["sha256"]
    assert meta["dvc_version"] == first["dvc_version"] and meta["provenance_sha256"] == first["provenance_sha256"]
    assert meta["duplicate_of"].startswith("german_credit.csv (ingested") and meta["actor"] == "alice"
    assert objects(settings) == stored  # nothing new encrypted, nothing new versioned
    assert len(list((settings.home / "dvc" / "drops").glob("*.dvc"))) == 2
    assert [e["details"]["source"] for e in audit(settings, "ingest.duplicate")] == ["german_credit_again.csv"]
    assert all(e.passed for e in checks(again).values())

    # A duplicate whose store object was lost: DVC brings it back (from the remote) and it verifies.
    settings.artifact_store().path_for(first["sha256"]).unlink()
    shutil.rmtree(settings.home / "dvc" / ".dvc" / "cache")
    restored = materialize(settings, "german_credit_again.csv", checks=False)
    assert restored.success and metadata(restored)["sha256"] == first["sha256"]
    assert settings.artifact_store().verify(first["sha256"]) == metadata(restored)["size_bytes"]


def test_unapproved_source_is_rejected_and_audited(settings: Settings) -> None:
    drop = land_file(settings, SAMPLE_CSV, "partner_x_export.csv")
    result = materialize(settings, drop, checks=False, persistent=False)
    assert not result.success
    assert "is not from an approved source" in failure(result)
    assert objects(settings) == [] and not (settings.home / "dvc" / "drops").exists()
    [entry] = audit(settings, "ingest.reject")
    assert entry["subject"] == f"drop:{drop}" and "not from an approved source" in entry["details"]["reason"]
    assert audit(settings, "access.allow") == []  # refused before any access decision or read


@pytest.mark.parametrize("actor, reason", [
    ("dave", "dave (deployer) may not data.add"),
    ("bob", "bob (ml_engineer) may not data.add"),
])
def test_actor_without_data_add_is_denied_before_the_drop_is_read(settings: Settings, actor: str,
                                                                   reason: str) -> None:
    result = materialize(settings, land_file(settings, SAMPLE_CSV), actor=actor, checks=False, persistent=False)
    assert not result.success and reason in failure(result)
    assert objects(settings) == []
    [deny] = audit(settings, "access.deny")
    assert deny["actor"] == actor and deny["details"]["classification"] == "confidential"
    [reject] = audit(settings, "ingest.reject")
    assert reject["actor"] == actor and reason in reject["details"]["reason"]
    assert audit(settings, "store.write") == []


def test_clearance_below_the_classification_is_denied(settings: Settings, config_copy: Path) -> None:
    roles = (config_copy / "roles.yaml").read_text()
    roles = roles.replace("  auditor:\n", "  intern:\n    may: [data.add, data.read]\n    clearance: internal\n"
                                          "  auditor:\n")
    (config_copy / "roles.yaml").write_text(roles.replace("  dave: [deployer]\n", "  dave: [deployer]\n  frank: [intern]\n"))
    result = materialize(settings, land_file(settings, SAMPLE_CSV), actor="frank", checks=False, persistent=False)
    assert not result.success
    assert "frank is cleared for internal data, not confidential" in failure(result)
    assert objects(settings) == []
    [deny] = audit(settings, "access.deny")
    assert deny["details"]["permission"] == "data.add"


@dg.asset(ins={"dataset": dg.AssetIn()})
def reader_of_dataset(dataset: pd.DataFrame) -> dg.Output[Any]:
    """Stands in for validated_dataset: anything that reads the dataset through the IO manager."""
    return dg.Output(None, metadata={"rows": len(dataset)})


def test_reading_the_dataset_back_needs_data_read_with_clearance(settings: Settings) -> None:
    drop = land_file(settings, SAMPLE_CSV)
    assert materialize(settings, drop, checks=False).success
    everything = [data_stage.dataset, reader_of_dataset]
    with dg.DagsterInstance.get() as instance:
        def read_as(actor: str) -> dg.ExecuteInProcessResult:
            return dg.materialize(everything, instance=instance, resources=resources.build_resources(settings),
                                  selection=[reader_of_dataset.key], tags={ACTOR_TAG: actor},
                                  raise_on_error=False)

        denied = read_as("carol")  # approver: data.read, but cleared for internal only
        allowed = read_as("bob")   # ml_engineer: data.read, cleared for confidential
    assert not denied.success
    assert "carol is cleared for internal data, not confidential" in failure(denied)
    assert allowed.success
    assert [e["actor"] for e in audit(settings, "access.deny")] == ["carol"]
    assert "bob" in [e["actor"] for e in audit(settings, "access.allow")]


def test_checks_fail_when_the_configuration_no_longer_allows_the_version(settings: Settings, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocking checks re-decide against today's sources.yaml and roles.yaml, not the metadata."""
    assert materialize(settings, land_file(settings, SAMPLE_CSV), actor="alice", checks=False).success
    config = copy_config(tmp_path, monkeypatch)
    shipped_sources, shipped_roles = (config / "sources.yaml").read_text(), (config / "roles.yaml").read_text()

    (config / "sources.yaml").write_text(shipped_sources.replace("classification: confidential",
                                                                 "classification: restricted"))
    evaluation = run_checks(settings, data_stage.source_approved)
    assert not evaluation.passed
    assert "but its approved source is now german_credit (restricted" in evaluation.metadata["reason"].value

    # The source still exists (the model spec names it) but no longer approves this file name.
    (config / "sources.yaml").write_text(shipped_sources.replace(
        '["german_credit.csv", "german_credit.parquet", "german_credit-*", "german_credit_*"]', '["credit-*.csv"]'))
    evaluation = run_checks(settings, data_stage.source_approved)
    assert not evaluation.passed
    assert evaluation.metadata["reason"].value == (
        "german_credit.csv matches no approved source in the sources configuration")

    (config / "sources.yaml").write_text(shipped_sources)
    (config / "roles.yaml").write_text(shipped_roles.replace("  alice: [data_steward]", "  alice: [auditor]"))
    evaluation = run_checks(settings, data_stage.access_policy_allows)
    assert not evaluation.passed
    assert evaluation.metadata["reason"].value == "alice (auditor) may not data.add"
    assert [e["outcome"] for e in audit(settings, "check.access_policy_allows")] == ["fail"]
    assert [e["outcome"] for e in audit(settings, "check.source_approved")] == ["fail", "fail"]


def run_checks(settings: Settings, check: Any) -> dg.AssetCheckEvaluation:
    """One of the dataset's checks alone, against its latest materialization."""
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([data_stage.dataset, check], instance=instance,
                                resources=resources.build_resources(settings),
                                selection=dg.AssetSelection.checks(check), raise_on_error=False)
    [evaluation] = result.get_asset_check_evaluations()
    return evaluation


def copy_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped configuration directory, made the active one (SECURE_ML_CONFIG)."""
    config = tmp_path / "config"
    shutil.copytree(Path(data_stage.__file__).parents[1] / "secure_ml" / "config", config)
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config))
    return config


@pytest.fixture
def config_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return copy_config(tmp_path, monkeypatch)
