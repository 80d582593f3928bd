"""validated_dataset on a real Dagster instance: the proof that bad data never reaches training.

Touches: a real SQLite Dagster instance under a fresh DAGSTER_HOME, the real `dataset` and
`validated_dataset` assets with every resource from ``resources.build_resources``, the encrypted
store, the audit log, real Great Expectations, scikit-learn and DVC (through `dataset`). Drops are
landed as files in the landing area. A small consumer asset downstream of validated_dataset stands
in for training in the clean runs; the blocked 10%-flip run also carries the real trained_model
(assets/training.py), so "nothing downstream runs" is observed, not assumed.

Does not touch: training itself (trained_model is only shown to stay unrun), the UI, automation sensors (the run is started with
dg.materialize, as `secure-ml pipeline run` does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

import resources
from assets import data as data_stage
from assets import validation as validation_stage
from secure_ml.data.poisoning import bootstrap, flip_labels
from secure_ml.settings import Settings
from tests.conftest import SAMPLE_CSV, land_file

pytestmark = pytest.mark.slow  # materialises the data stage on real drops

CHECKS = ("expectations_pass", "poisoning_below_limit", "no_unhandled_pii")


@dg.asset(ins={"validated_dataset": dg.AssetIn()}, group_name="test")
def training_stand_in(validated_dataset: dict[str, Any]) -> None:
    """Stands in for trained_model: it only runs when every blocking check upstream passed."""
    assert validated_dataset["format"] == "secure-ml-validated/1"


def _materialize(settings: Settings, drop: str, *, with_training: bool = False) -> dg.ExecuteInProcessResult:
    modules = [data_stage, validation_stage]
    if with_training:  # the real training stage downstream (it must not run on a blocked drop)
        from assets import training as training_stage

        modules.append(training_stage)
    with dg.DagsterInstance.get() as instance:
        return dg.materialize(
            [*dg.load_assets_from_modules(modules), *dg.load_asset_checks_from_modules(modules), training_stand_in],
            instance=instance,
            resources=resources.build_resources(settings),
            run_config={"ops": {"dataset": {"config": {"drop": drop}}},
                        "loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            raise_on_error=False,
        )


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    """The run's verdicts on validated_dataset as the instance stored them: from the check steps, or,
    for a rejected drop, reported by the asset step itself (which then fails)."""
    with dg.DagsterInstance.get() as instance:
        records = instance.get_records_for_run(
            result.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]
    return {e.check_name: e for e in evaluations if e.asset_key == dg.AssetKey("validated_dataset")}


def _rejection(result: dg.ExecuteInProcessResult) -> tuple[str, dict[str, Any]]:
    """(the step's one-line reason, the rejection observation's metadata) of a rejected drop's run."""
    failure = next(e for e in result.get_step_failure_events() if e.step_key == "validated_dataset")
    with dg.DagsterInstance.get() as instance:
        records = instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION).records
    observation = next(r.event_log_entry.asset_observation for r in records)
    assert observation is not None and observation.asset_key == dg.AssetKey("validated_dataset")
    user = failure.step_failure_data.user_failure_data
    assert user is not None
    return str(user.description), {k: getattr(v, "value", v) for k, v in observation.metadata.items()}


def _reason(evaluation: dg.AssetCheckEvaluation) -> str:
    return str(evaluation.metadata["reason"].value)


def _materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def _record(settings: Settings, result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    """The validated record the run materialised, or the sealed evidence of its rejection."""
    event = next((e for e in result.get_asset_materialization_events()
                  if e.asset_key == dg.AssetKey("validated_dataset")), None)
    digest = event.materialization.metadata["sha256"].value if event else _rejection(result)[1]["rejected_record_sha256"]
    return settings.artifact_store(actor="test").get_json(str(digest))


def _land_frame(settings: Settings, frame: pd.DataFrame, name: str, tmp_path: Path) -> str:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return land_file(settings, path, name)


def test_clean_drop_passes_then_flipped_labels_are_blocked_and_nothing_downstream_runs(
        settings: Settings, tmp_path: Path) -> None:
    clean = _materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-v1.csv"))
    checks = _checks(clean)
    assert set(checks) == set(CHECKS)
    assert all(c.passed for c in checks.values()), {k: _reason(c) for k, c in checks.items()}
    assert "training_stand_in" in _materialized(clean)
    record = _record(settings, clean)
    first_version = record["dataset_sha256"]
    assert record["format"] == "secure-ml-validated/1" and record["accepted"] is True
    assert record["label"] == "risk" and record["protected"] == ["sex", "age"]
    assert set(record["numeric"]) | set(record["categorical"]) == set(record["features"])
    store = settings.artifact_store(actor="test")
    train, test = store.get_dataframe(record["train_sha256"]), store.get_dataframe(record["test_sha256"])
    assert len(train) + len(test) == 1000 and len(test) == 200
    assert train["risk"].mean() == pytest.approx(0.7) and test["risk"].mean() == pytest.approx(0.7)
    assert "bundled trusted sample" in record["poisoning"]["reference"]

    sample = pd.read_csv(SAMPLE_CSV)
    flipped, mask = flip_labels(sample, "risk", 0.10, seed=3)
    blocked = _materialize(settings, _land_frame(settings, flipped, "german_credit-v2.csv", tmp_path),
                           with_training=True)
    checks = _checks(blocked)
    poisoning = checks["poisoning_below_limit"]
    assert not poisoning.passed
    reason = _reason(poisoning)
    assert "over the threshold" in reason and "label_neighbours" in reason
    assert "last accepted version" in str(poisoning.metadata["reference"].value)
    assert checks["expectations_pass"].passed and checks["no_unhandled_pii"].passed
    # A rejected drop is never materialised: nothing can take it as input, v1 stays the latest.
    assert "validated_dataset" not in _materialized(blocked) and "dataset" in _materialized(blocked)
    assert "training_stand_in" not in _materialized(blocked)
    assert "trained_model" not in _materialized(blocked)
    assert [e.step_key for e in blocked.get_step_failure_events()] == ["validated_dataset"]
    line, observed = _rejection(blocked)
    assert line == f"drop rejected: poisoning_below_limit: {reason}" and "\n" not in line
    assert observed["accepted"] is False and observed["rejected_because"].startswith("poisoning_below_limit")
    record = settings.artifact_store(actor="test").get_json(str(observed["rejected_record_sha256"]))
    assert record["accepted"] is False
    flagged = record["poisoning"]["detectors"]["label_neighbours"]["indices"]
    assert len(flagged) == 50 and set(flagged) <= set(np.flatnonzero(mask).tolist())
    audit = settings.audit_path.read_text()
    assert "check.poisoning_below_limit" in audit and "validation.reject" in audit

    # The three checks run alone (the UI's "Execute") judge the latest materialization: still v1.
    with dg.DagsterInstance.get() as instance:
        alone = dg.materialize(
            [*dg.load_assets_from_modules([data_stage, validation_stage]),
             *dg.load_asset_checks_from_modules([data_stage, validation_stage])],
            instance=instance, resources=resources.build_resources(settings), raise_on_error=False,
            selection=dg.AssetSelection.checks_for_assets(validation_stage.validated_dataset))
    again = _checks(alone)
    assert set(again) == set(CHECKS) and not alone.get_asset_materialization_events()
    assert all(c.passed for c in again.values()), {k: _reason(c) for k, c in again.items()}
    assert {str(c.metadata["subject"].value) for c in again.values()} == {f"sha256:{first_version}"}
    assert alone.success

    # the rejected drop did not become the reference: the next clean drop is judged against v1
    fresh = _materialize(settings, _land_frame(settings, bootstrap(sample, 4), "german_credit-v3.csv", tmp_path))
    checks = _checks(fresh)
    assert all(c.passed for c in checks.values()), {k: _reason(c) for k, c in checks.items()}
    assert first_version[:16] in str(checks["poisoning_below_limit"].metadata["reference"].value)


def test_schema_drift_is_blocked_with_the_column_named(settings: Settings, tmp_path: Path) -> None:
    drifted = pd.read_csv(SAMPLE_CSV).rename(columns={"credit_amount": "amount"})
    drifted["duration"] = drifted["duration"].astype(float) * 30.5  # months became days, as floats
    result = _materialize(settings, _land_frame(settings, drifted, "german_credit-drift.csv", tmp_path))
    checks = _checks(result)
    expectations = checks["expectations_pass"]
    assert not expectations.passed
    reason = _reason(expectations)
    assert "credit_amount" in reason or "amount" in reason
    table = str(expectations.metadata["table"].value)
    assert "duration" in table and "float64" in table and "**FAIL**" in table
    assert not checks["poisoning_below_limit"].passed  # fails closed: it could not screen
    assert "not screened" in _reason(checks["poisoning_below_limit"])
    assert "training_stand_in" not in _materialized(result)


def test_injected_email_column_is_blocked_until_a_rule_hashes_it(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = pd.read_csv(SAMPLE_CSV)
    frame.insert(1, "contact", [f"applicant{i}@example.org" for i in range(len(frame))])
    name = _land_frame(settings, frame, "german_credit-contacts.csv", tmp_path)
    blocked = _materialize(settings, name)
    pii_check = _checks(blocked)["no_unhandled_pii"]
    assert not pii_check.passed
    assert "'contact'" in _reason(pii_check) and "email" in _reason(pii_check)
    assert "training_stand_in" not in _materialized(blocked)

    config = tmp_path / "config"
    shutil.copytree(Path(validation_stage.__file__).parents[1] / "secure_ml" / "config", config)
    validation = yaml.safe_load((config / "validation.yaml").read_text())
    validation["pii"]["rules"] = [{"column": "contact", "kind": "email", "action": "hash"}]
    (config / "validation.yaml").write_text(yaml.safe_dump(validation))
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config))
    settings = Settings.from_env()
    passed = _materialize(settings, name)
    checks = _checks(passed)
    assert all(c.passed for c in checks.values()), {k: _reason(c) for k, c in checks.items()}
    assert "contact (email) hash" in _reason(checks["no_unhandled_pii"])
    assert "training_stand_in" in _materialized(passed)
    record = _record(settings, passed)
    train = settings.artifact_store(actor="test").get_dataframe(record["train_sha256"])
    assert "contact" in train.columns and "contact" not in record["features"]
    assert not train["contact"].str.contains("@").any() and train["contact"].str.len().eq(32).all()
    assert record["pii"]["hmac_key_id"].startswith("psk-")  # the pseudonym key, not the KEK
    # no address reached the event log, the record or the audit log
    events = json.dumps([str(e.event_specific_data) for e in passed.all_events])
    assert "@example.org" not in events and "@example.org" not in json.dumps(record)
    assert "@example.org" not in settings.audit_path.read_text()


def test_broken_validation_config_fails_the_asset_with_one_reason(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    shutil.copytree(Path(validation_stage.__file__).parents[1] / "secure_ml" / "config", config)
    (config / "validation.yaml").write_text("schemas: {default: schemas/missing.yaml}\n")
    spec = config / "models" / "german_credit.yaml"    # the model's own spec names its schema too
    spec.write_text(spec.read_text().replace("schema: schemas/german_credit.yaml", "schema: schemas/missing.yaml"))
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config))
    settings = Settings.from_env()
    result = _materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-v1.csv"))
    # The model spec is checked (schema included) before any step acts: nothing is materialised, and
    # the first failure names the file and the missing schema in one line.
    assert not {"dataset", "validated_dataset"} & _materialized(result)
    failure = result.get_step_failure_events()[0]
    message = str(failure.step_failure_data.error.message)
    assert "models/german_credit.yaml: schema: schemas/missing.yaml not found" in message


# -- the trusted reference: no unguarded first version, bounded drift (issue 20) -----------------------
def _config_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, reference: bool = True,
                 bounds: dict[str, Any] | None = None) -> Path:
    config = tmp_path / "config"
    shutil.copytree(Path(validation_stage.__file__).parents[1] / "secure_ml" / "config", config)
    schema_path = config / "schemas" / "german_credit.yaml"
    if not reference:
        schema = yaml.safe_load(schema_path.read_text())
        del schema["reference"]
        schema_path.write_text(yaml.safe_dump(schema, sort_keys=False))
    if bounds:
        validation = yaml.safe_load((config / "validation.yaml").read_text())
        validation["reference"].update(bounds)
        (config / "validation.yaml").write_text(yaml.safe_dump(validation, sort_keys=False))
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config))
    return config


def test_first_version_without_a_reference_needs_a_data_stewards_audited_sign_off(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_ml.cli import main

    _config_copy(tmp_path, monkeypatch, reference=False)
    settings = Settings.from_env()
    first = _materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-v1.csv"))
    poisoning = _checks(first)["poisoning_below_limit"]
    assert not poisoning.passed
    record = _record(settings, first)
    digest = record["dataset_sha256"]
    reason = _reason(poisoning)
    assert "no trusted reference" in reason and f"secure-ml data sign-off german_credit --drop {digest}" in reason
    assert record["accepted"] is False and "training_stand_in" not in _materialized(first)

    # an ML engineer may not sign data off; the denial is audited
    monkeypatch.setenv("SECURE_ML_ACTOR", "bob")
    assert main(["data", "sign-off", "german_credit", "--drop", digest, "--reason", "looked fine"]) == 1
    assert not (home / "signoffs").exists()
    monkeypatch.setenv("SECURE_ML_ACTOR", "alice")
    assert main(["data", "sign-off", "german_credit", "--drop", f"sha256:{digest}",
                 "--reason", "first export, row counts and labels checked against the source system"]) == 0
    entries = list(settings.audit_log().entries())
    assert any(e["action"] == "access.deny" and e["actor"] == "bob" and e["details"]["permission"] == "data.sign_off"
               for e in entries)
    signed = [e for e in entries if e["action"] == "data.sign_off"]
    assert len(signed) == 1 and signed[0]["actor"] == "alice" and signed[0]["subject"] == f"sha256:{digest}"

    # the same bytes again (a re-run): accepted on the sign-off, which the check names
    again = _materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-v1-again.csv"))
    checks = _checks(again)
    assert all(c.passed for c in checks.values()), {k: _reason(c) for k, c in checks.items()}
    assert "sign-off of alice" in str(checks["poisoning_below_limit"].metadata["reference"].value)
    assert "training_stand_in" in _materialized(again)

    # the sign-off is for that drop only: another first drop is still refused
    other = _land_frame(settings, bootstrap(pd.read_csv(SAMPLE_CSV), 9), "german_credit-other.csv", tmp_path)
    # (now a version is accepted, so this one is screened against it, not unguarded)
    assert "last accepted version" in str(
        _checks(_materialize(settings, other))["poisoning_below_limit"].metadata["reference"].value)


def test_with_a_trust_policy_only_the_stewards_signed_sign_off_accepts_a_first_version(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from _identities import trust_people

    from secure_ml.cli import main
    from secure_ml.governance.decisions import sign_decision
    from secure_ml.governance.identity import load_identity

    _config_copy(tmp_path, monkeypatch, reference=False)
    settings = Settings.from_env()
    keys = trust_people(settings, tmp_path / "ids")
    first = _materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-v1.csv"))
    assert not _checks(first)["poisoning_below_limit"].passed
    digest = _record(settings, first)["dataset_sha256"]
    # An ML engineer's key signing a data_signoff statement straight into the ledger is not a sign-off.
    forged = sign_decision("data_signoff", digest, {"dataset": "german_credit", "reason": "x"},
                           load_identity(keys["bob"]).signer)
    (settings.home / "statements" / digest).mkdir(parents=True)
    (settings.home / "statements" / digest / "forged.json").write_bytes(forged)
    again = _materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-v1-b.csv"))
    reason = _reason(_checks(again)["poisoning_below_limit"])
    assert "signed by bob, who does not hold the data_steward role" in reason and "training_stand_in" not in \
        _materialized(again)
    (settings.home / "statements" / digest / "forged.json").unlink()
    # alice's key signs it off; the same bytes are then accepted, on the signed statement.
    assert main(["data", "sign-off", "german_credit", "--drop", digest, "--reason", "checked against the source",
                 "--identity", str(keys["alice"])]) == 0
    accepted = _materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-v1-c.csv"))
    checks = _checks(accepted)
    assert all(c.passed for c in checks.values()), {k: _reason(c) for k, c in checks.items()}
    assert "sign-off of alice (signed statement" in str(
        checks["poisoning_below_limit"].metadata["reference"].value)


def test_a_sign_off_record_without_its_audit_entry_does_not_count(settings: Settings) -> None:
    from secure_ml.governance.access import AccessPolicy
    from secure_ml.data.poisoning_reference import find_sign_off, sign_off, sign_off_path

    policy = AccessPolicy.from_settings(settings)
    log = settings.audit_log()
    record = sign_off(settings.home, dataset="loans", drop_sha256="a" * 64, actor="alice", policy=policy,
                      audit=log, reason="checked")
    assert find_sign_off(settings.home, dataset="loans", drop_sha256="a" * 64, policy=policy, audit=log).valid
    forged = sign_off_path(settings.home, "loans", "b" * 64)
    forged.write_text(json.dumps({**record, "drop_sha256": "b" * 64}))
    found = find_sign_off(settings.home, dataset="loans", drop_sha256="b" * 64, policy=policy, audit=log)
    assert not found.valid and "no matching data.sign_off entry" in found.why
    assert not find_sign_off(settings.home, dataset="loans", drop_sha256="c" * 64, policy=policy, audit=log).valid


def test_a_tampered_pinned_reference_is_refused(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config_copy(tmp_path, monkeypatch)
    reference = config / "schemas" / "german_credit.reference.csv"
    sample = pd.read_csv(reference)
    flip_labels(sample, "risk", 0.2, seed=1)[0].to_csv(reference, index=False)   # poisoned yardstick
    settings = Settings.from_env()
    result = _materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-v1.csv"))
    poisoning = _checks(result)["poisoning_below_limit"]
    assert not poisoning.passed
    assert "not screened" in _reason(poisoning) and "german_credit.reference.csv hashes to" in _reason(poisoning)


def test_an_accepted_version_that_drifted_from_the_pinned_sample_is_not_the_reference(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config_copy(tmp_path, monkeypatch, bounds={"max_label_shift": 0.02})
    settings = Settings.from_env()
    sample = pd.read_csv(SAMPLE_CSV)
    fewer_bad = sample.drop(index=sample.index[sample["risk"] == 0][:60]).reset_index(drop=True)  # 70% -> 74.5% good
    first = _materialize(settings, _land_frame(settings, fewer_bad, "german_credit-v1.csv", tmp_path))
    assert all(c.passed for c in _checks(first).values())
    second = _materialize(settings, land_file(settings, SAMPLE_CSV, "german_credit-v2.csv"))
    checks = _checks(second)
    note = str(checks["poisoning_below_limit"].metadata["reference"].value)
    assert note.startswith("bundled trusted sample german_credit.reference.csv")
    assert "drifted from the pinned sample" in note and "label share of risk moved" in note
    assert all(c.passed for c in checks.values())
