"""The security stage on a real Dagster instance: scan_report -> model_signature -> attestation.

Touches: a real DagsterInstance (the ``home`` fixture's DAGSTER_HOME), the encrypted store, the
audit log, real model-signing, bandit, pip-audit (offline OSV file), CycloneDX validation. Most
tests use a stand-in ``trained_model`` defined here that seals a small torch model the way the stage
contract says (a tree of safetensors + JSON), so bad models can be made on purpose; one test runs
the real chain from the sample data (dataset, validated_dataset, trained_model with epochs cut).
Does not touch: Sigstore keyless signing (needs the network), model_evaluation, registry, deployment.
"""


import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

import resources
from assets import security
from resources import CustodyResource
from secure_ml.cli import main as cli
from secure_ml.settings import Settings
from tests.conftest import SAMPLE_CSV, land_file

pytestmark = pytest.mark.slow  # runs the real chain from sample data


class StandInConfig(dg.Config):
    smuggle_pickle: bool = False
    seed: int = 0


def write_model(directory: Path, *, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    directory.mkdir(parents=True)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"tensors": {k: list(v.shape) for k, v in state.items()}}))
    (directory / "preprocessing.json").write_text(json.dumps({"features": ["a", "b"]}))
    (directory / "training_record.json").write_text(json.dumps({"hyperparameters": {"lr": 0.01, "epochs": 3}}))
    (directory / "MODEL_CARD.md").write_text("# model card\n")
    return directory


@dg.asset(name="trained_model", group_name="training")
def stand_in_trained_model(context: dg.AssetExecutionContext, config: StandInConfig,
                           custody: CustodyResource) -> dg.Output[Any]:
    """A sealed model tree as the training stage would produce it (optionally with a smuggled pickle)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "model", seed=config.seed)
        if config.smuggle_pickle:
            (model_dir / "preprocessing.json").write_bytes(pickle.dumps({"scaler": [1.0, 2.0]}, protocol=4))
        return custody.output(context, model_dir)


STAGE = [stand_in_trained_model, security.scan_report, security.model_signature, security.attestation,
         security.scan_report_clear, security.model_signature_verifies, security.attestation_verifies]


def run_stage(settings: Settings, *, smuggle: bool = False, seed: int = 0,
              selection: Any = None) -> dg.ExecuteInProcessResult:
    with dg.DagsterInstance.get() as instance:
        return dg.materialize(
            STAGE, instance=instance, resources=resources.build_resources(settings), raise_on_error=False,
            run_config={"ops": {"trained_model": {"config": {"smuggle_pickle": smuggle, "seed": seed}}}}
            if selection is None or "trained_model" in str(selection) else None,
            selection=selection,
        )


def checks(result: dg.ExecuteInProcessResult) -> dict[str, tuple[bool, str]]:
    return {e.check_name: (e.passed, str(e.metadata["reason"].value)) for e in result.get_asset_check_evaluations()}


def materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def audit_actions(settings: Settings) -> list[dict[str, Any]]:
    return list(settings.audit_log().entries())


OWN_CODE = ["secure_ml/security/scanning.py", "secure_ml/security/signing.py", "secure_ml/security/attestation.py", "secure_ml/security/sbom.py",
            "secure_ml/security/verification.py", "assets/security.py", "resources/security.py"]


def security_config(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **signing: Any) -> Path:
    """A config dir whose security.yaml scans this stage's own code (others' code is theirs to fix)."""
    config_dir = tmp_path / "config"
    shutil.copytree(settings.config_dir, config_dir)
    cfg = yaml.safe_load((config_dir / "security.yaml").read_text())
    cfg["scan"]["code"]["paths"] = OWN_CODE
    cfg["signing"].update(signing)
    (config_dir / "security.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config_dir))
    return config_dir


def test_clean_model_is_scanned_signed_and_attested(settings: Settings, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    security_config(settings, tmp_path, monkeypatch)
    result = run_stage(Settings.from_env())
    outcome = checks(result)
    assert outcome["scan_report_clear"][0], outcome
    assert materialized(result) >= {"scan_report", "model_signature", "attestation"}
    assert outcome["model_signature_verifies"][0], outcome
    assert outcome["attestation_verifies"][0], outcome
    store = settings.artifact_store()
    with dg.DagsterInstance.get() as instance:
        meta = CustodyResource(home=str(settings.home)).recorded(instance, dg.AssetKey("scan_report"))
    assert "| severity | count |" in meta["summary"]
    report = store.get_json(meta["sha256"])
    assert report["blocking"] is False and report["sbom_valid"] is True
    assert json.loads(store.get_bytes(meta["sbom_sha256"]))["bomFormat"] == "CycloneDX"
    assert meta["scan_cache"] == {"hits": 0, "misses": 2}  # pip-audit and bandit ran, and were cached
    with dg.DagsterInstance.get() as instance:
        envelope_meta = CustodyResource(home=str(settings.home)).recorded(instance, dg.AssetKey("attestation"))
    envelope = json.loads(store.get_bytes(envelope_meta["sha256"]))
    statement = json.loads(base64.b64decode(envelope["payload"]))
    run = statement["predicate"]["runDetails"]
    assert run["metadata"]["invocationId"] == result.run_id
    assert {b["name"] for b in run["byproducts"]} == {"scan_report", "sbom.cdx.json"}
    assert statement["predicate"]["buildDefinition"]["externalParameters"]["hyperparameters"] == {"lr": 0.01, "epochs": 3}
    actions = {(e["action"], e["outcome"]) for e in audit_actions(settings)}
    assert ("sign.model", "ok") in actions and ("check.attestation_verifies", "pass") in actions

    # Export: decrypted, verified, with bundle, attestation and public key; upstream CLI agrees.
    export = tmp_path / "export"
    assert cli(["model", "export", str(export)]) == 0
    assert sorted(p.name for p in export.iterdir()) == ["attestation.dsse.json", "model", "model.sig", "signing-key.pub"]
    upstream = subprocess.run([str(Path(sys.executable).parent / "model_signing"), "verify", "key", str(export / "model"),
                               "--signature", str(export / "model.sig"), "--public_key", str(export / "signing-key.pub")],
                              capture_output=True, text=True, timeout=120)
    assert upstream.returncode == 0, upstream.stderr
    assert cli(["verify-attestation", str(export / "attestation.dsse.json"), "--model", str(export / "model"),
                "--signature", str(export / "model.sig"), "--public-key", str(export / "signing-key.pub")]) == 0
    assert cli(["model", "export", str(export)]) == 2  # never over an existing directory

    # Substitution: a new trained_model appears; the old signature and attestation no longer vouch for it.
    with dg.DagsterInstance.get() as instance:
        dg.materialize([stand_in_trained_model], instance=instance, resources=resources.build_resources(settings),
                       run_config={"ops": {"trained_model": {"config": {"seed": 1}}}})
    result = run_stage(Settings.from_env(), selection=dg.AssetSelection.checks(
        security.model_signature_verifies, security.attestation_verifies))
    outcome = checks(result)
    assert not outcome["model_signature_verifies"][0] and "changed after signing" in outcome["model_signature_verifies"][1]
    # One chain: the attestation check refuses for the same reason the signature check does.
    assert not outcome["attestation_verifies"][0]
    assert outcome["attestation_verifies"][1] == outcome["model_signature_verifies"][1]
    failed = [e for e in audit_actions(settings) if e["action"] == "check.attestation_verifies"]
    assert failed[-1]["outcome"] == "fail" and "changed after signing" in failed[-1]["details"]["reason"]
    assert cli(["model", "export", str(tmp_path / "export2")]) == 1  # export verifies first, and refuses
    assert not (tmp_path / "export2").exists()

    # The next scan (of the new model) takes pip-audit and bandit from the cache: nothing they read changed.
    rescanned = run_stage(Settings.from_env(), selection=dg.AssetSelection.assets(security.scan_report))
    assert rescanned.success
    with dg.DagsterInstance.get() as instance:
        again = CustodyResource(home=str(settings.home)).recorded(instance, dg.AssetKey("scan_report"))
    assert again["scan_cache"] == {"hits": 2, "misses": 0} and again["counts"] == meta["counts"]


def test_smuggled_pickle_blocks_signing_with_reason_in_ui_and_audit(settings: Settings, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    security_config(settings, tmp_path, monkeypatch)
    result = run_stage(Settings.from_env(), smuggle=True)
    outcome = checks(result)
    passed, reason = outcome["scan_report_clear"]
    assert not passed and "preprocessing.json is a pickle" in reason
    assert "model_signature" not in materialized(result) and "attestation" not in materialized(result)
    denied = [e for e in audit_actions(settings) if e["action"] == "check.scan_report_clear"]
    assert denied and denied[-1]["outcome"] == "fail" and "pickle" in denied[-1]["details"]["reason"]


def test_signature_by_untrusted_key_fails_the_blocking_check(settings: Settings, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_ml.security.signing import ensure_signing_key

    other_public = ensure_signing_key(tmp_path / "other" / "key.pem")
    # Our key signs; only another key is trusted.
    security_cfg = security_config(settings, tmp_path, monkeypatch, trusted_public_keys=[str(other_public)])
    del security_cfg
    result = run_stage(Settings.from_env())
    outcome = checks(result)
    assert outcome["scan_report_clear"][0], outcome
    passed, reason = outcome["model_signature_verifies"]
    assert not passed and "not trusted" in reason
    assert "attestation" not in materialized(result)
    entries = [e for e in audit_actions(settings) if e["action"] == "check.model_signature_verifies"]
    assert entries[-1]["outcome"] == "fail"
    assert not any("BEGIN" in json.dumps(e) for e in audit_actions(settings))  # no key material in the log
    assert os.stat(settings.keys_dir / "model-signing.pem").st_mode & 0o077 == 0


@pytest.mark.timeout(400)
def test_real_chain_sample_data_to_attestation(settings: Settings, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """dataset -> validated_dataset -> trained_model (the real stages, epochs cut) -> this stage."""
    from assets import data as data_stage
    from assets import training as training_stage
    from assets import validation as validation_stage

    config_dir = security_config(settings, tmp_path, monkeypatch)
    training_cfg = yaml.safe_load((config_dir / "training.yaml").read_text())
    training_cfg["training"].update({"epochs": 4, "checkpoint_every": 2})
    (config_dir / "training.yaml").write_text(yaml.safe_dump(training_cfg))
    settings = Settings.from_env()
    drop = land_file(settings, SAMPLE_CSV)
    modules = [data_stage, validation_stage, training_stage, security]
    wanted = dg.AssetSelection.assets("dataset", "validated_dataset", "trained_model", "scan_report",
                                      "model_signature", "attestation")
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [*dg.load_assets_from_modules(modules), *dg.load_asset_checks_from_modules(modules)],
            instance=instance, resources=resources.build_resources(settings), raise_on_error=False,
            selection=wanted,
            run_config={"ops": {"dataset": {"config": {"drop": drop}}},
                        "loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
    outcome = checks(result)
    assert {"scan_report", "model_signature", "attestation"} <= materialized(result), outcome
    for name in ("scan_report_clear", "model_signature_verifies", "attestation_verifies"):
        assert outcome[name][0], (name, outcome[name])
    store = settings.artifact_store()
    with dg.DagsterInstance.get() as instance:
        custody = CustodyResource(home=str(settings.home))
        envelope_meta = custody.recorded(instance, dg.AssetKey("attestation"))
        validated_meta = custody.recorded(instance, dg.AssetKey("validated_dataset"))
    statement = json.loads(base64.b64decode(json.loads(store.get_bytes(envelope_meta["sha256"]))["payload"]))
    resolved = {d["name"]: d for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert resolved["validated_dataset"]["digest"]["sha256"] == validated_meta["sha256"]
    assert resolved["dataset"]["annotations"]["dvc_version"]
    assert {s["name"] for s in statement["subject"]} >= {"model/model.safetensors", "model/config.json",
                                                        "model/training_record.json", "model.sig"}
    assert statement["predicate"]["buildDefinition"]["externalParameters"]["hyperparameters"]
