"""The `dataset` asset on a real Dagster instance: approved sources, access control, DVC, duplicates.

Touches: the real asset and its four blocking checks (assets/data.py) materialised with
dg.materialize on a DagsterInstance under a fresh DAGSTER_HOME, the real encrypted store, the
real audit log, a real DVC repository and remote under SECURE_ML_HOME, the default sources.yaml
and roles.yaml, and the encrypted IO manager's data.read check (through a small downstream asset
defined here). Does not touch validated_dataset or anything after it (their own tests do), the
landing sensor, or the CLI (the dvc CLI is exercised in test_versioning.py).
"""

import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

import assets.data as data_stage
import resources
from secure_ml.cli.cmd_pipeline import land
from secure_ml.settings import ACTOR_TAG, Settings
from secure_ml.versioning import DatasetVersions
from tests.conftest import SAMPLE_CSV, land_file

DATASET_CHECKS = {"dataset_ciphertext_authentic", "dataset_digest_matches_provenance", "source_approved",
                  "access_policy_allows"}


def materialize(settings: Settings, drop: str, *, actor: str | None = None,
                extra: list[Any] | None = None) -> dg.ExecuteInProcessResult:
    with dg.DagsterInstance.get() as instance:
        return dg.materialize(
            [data_stage.dataset, *data_stage_checks(), *(extra or [])],
            instance=instance,
            resources=resources.build_resources(settings),
            run_config={"ops": {"dataset": {"config": {"drop": drop}}}},
            tags={ACTOR_TAG: actor} if actor else {},
            raise_on_error=False,
        )


def data_stage_checks() -> list[Any]:
    return [data_stage.dataset_ciphertext_authentic, data_stage.dataset_digest_matches_provenance,
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


def test_parquet_drop_is_its_own_version(settings: Settings, tmp_path: Path) -> None:
    csv_result = materialize(settings, land_file(settings, SAMPLE_CSV))
    frame = pd.read_csv(SAMPLE_CSV).iloc[:400]
    frame.to_parquet(tmp_path / "german_credit_q3.parquet", index=False)
    result = materialize(settings, land_file(settings, tmp_path / "german_credit_q3.parquet"))
    assert result.success, failure(result)
    meta = metadata(result)
    assert meta["rows"] == 400 and meta["sha256"] != metadata(csv_result)["sha256"]
    assert meta["dvc_version"] != metadata(csv_result)["dvc_version"]
    assert len(list((settings.home / "dvc" / "drops").glob("*.dvc"))) == 2


def test_same_bytes_dropped_twice_are_not_processed_again(settings: Settings) -> None:
    first = metadata(materialize(settings, land_file(settings, SAMPLE_CSV)))
    stored = objects(settings)
    again = materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit_again.csv"), actor="alice")
    assert again.success
    meta = metadata(again)
    event = again.get_asset_materialization_events()[0].materialization
    assert meta["sha256"] == first["sha256"] and event.tags["dagster/data_version"] == first["sha256"]
    assert meta["dvc_version"] == first["dvc_version"] and meta["provenance_sha256"] == first["provenance_sha256"]
    assert meta["duplicate_of"].startswith("german_credit.csv (ingested") and meta["actor"] == "alice"
    assert objects(settings) == stored  # nothing new encrypted, nothing new versioned
    assert len(list((settings.home / "dvc" / "drops").glob("*.dvc"))) == 1
    assert [e["details"]["source"] for e in audit(settings, "ingest.duplicate")] == ["german_credit_again.csv"]
    assert all(e.passed for e in checks(again).values())


def test_duplicate_restores_a_lost_store_object_from_dvc(settings: Settings) -> None:
    first = metadata(materialize(settings, land_file(settings, SAMPLE_CSV)))
    settings.artifact_store().path_for(first["sha256"]).unlink()
    shutil.rmtree(settings.home / "dvc" / ".dvc" / "cache")  # so the bytes come from the remote
    again = materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-copy.csv"))
    assert again.success and metadata(again)["sha256"] == first["sha256"]
    assert checks(again)["dataset_ciphertext_authentic"].passed


def test_unapproved_source_is_rejected_and_audited(settings: Settings) -> None:
    drop = land_file(settings, SAMPLE_CSV, "partner_x_export.csv")
    result = materialize(settings, drop)
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
    result = materialize(settings, land_file(settings, SAMPLE_CSV), actor=actor)
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
    result = materialize(settings, land_file(settings, SAMPLE_CSV), actor="frank")
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
    assert materialize(settings, drop).success
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


def test_source_approved_check_fails_when_the_classification_changed(settings: Settings, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert materialize(settings, land_file(settings, SAMPLE_CSV)).success
    config = copy_config(tmp_path, monkeypatch)
    sources = (config / "sources.yaml").read_text()
    (config / "sources.yaml").write_text(sources.replace("classification: confidential", "classification: restricted"))
    result = run_checks(settings)
    evaluation = checks(result)["source_approved"]
    assert not evaluation.passed
    assert "now german_credit (restricted" in evaluation.metadata["reason"].value


def test_source_approved_check_fails_when_the_source_is_withdrawn(settings: Settings, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert materialize(settings, land_file(settings, SAMPLE_CSV)).success
    config = copy_config(tmp_path, monkeypatch)
    (config / "sources.yaml").write_text("sources: []\n")
    evaluations = checks(run_checks(settings))
    assert not evaluations["source_approved"].passed
    assert evaluations["source_approved"].metadata["reason"].value == (
        "german_credit.csv matches no approved source in the sources configuration")


def test_access_policy_check_fails_when_the_actor_lost_the_role(settings: Settings, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert materialize(settings, land_file(settings, SAMPLE_CSV), actor="alice").success
    config = copy_config(tmp_path, monkeypatch)
    roles = (config / "roles.yaml").read_text()
    (config / "roles.yaml").write_text(roles.replace("  alice: [data_steward]", "  alice: [auditor]"))
    evaluation = checks(run_checks(settings))["access_policy_allows"]
    assert not evaluation.passed
    assert evaluation.metadata["reason"].value == "alice (auditor) may not data.add"
    assert [e["outcome"] for e in audit(settings, "check.access_policy_allows")] == ["pass", "fail"]


def run_checks(settings: Settings) -> dg.ExecuteInProcessResult:
    """Only the dataset's checks, against its latest materialization."""
    with dg.DagsterInstance.get() as instance:
        return dg.materialize([data_stage.dataset, *data_stage_checks()], instance=instance,
                              resources=resources.build_resources(settings),
                              selection=dg.AssetSelection.checks_for_assets(data_stage.dataset),
                              raise_on_error=False)


def copy_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped configuration directory, made the active one (SECURE_ML_CONFIG)."""
    config = tmp_path / "config"
    shutil.copytree(Path(data_stage.__file__).parents[1] / "secure_ml" / "config", config)
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config))
    return config


@pytest.fixture
def config_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return copy_config(tmp_path, monkeypatch)
