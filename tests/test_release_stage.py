"""The release stage on a real Dagster instance: the issue 6 proof, end to end.

Touches: a real DagsterInstance (the ``home`` fixture's DAGSTER_HOME), the real data stage's
``dataset`` asset (the landed sample, added by alice), the real security stage (scan_report,
model_signature, attestation with their blocking checks), registered_model and deployment with
their checks, the encrypted store, the registry, the Rego policies, the audit log, and the CLI
(`secure-ml approve`, `deploy`, `rollback`, `status`, `audit verify`) in-process.
The training stage's ``trained_model`` and ``model_evaluation`` are stand-ins defined here (a
small torch MLP sealed as the contract says; an evaluation dict whose fairness can be set), so
this test does not depend on that stage; the real chain is covered by the pipeline's own tests.
Does not touch: Kubernetes (tests/test_k8s.py) or the HTTP server (tests/test_serving.py).
"""


import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from _identities import trust_people
from _release_fixtures import GOOD_EVALUATION, make_model_dir

import resources
from assets import data as data_assets
from assets import release as release_assets
from assets import security
from resources import CustodyResource
from secure_ml.cli import main as cli
from secure_ml.release.registry import Registry
from secure_ml.release.signed import SignedDecisions
from secure_ml.governance import authn
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # runs the release stage on a real instance

KEYS: dict[str, Path] = {}  # the people's identity keys (filled by the `stage` fixture)


class TrainingConfig(dg.Config):
    seed: int = 0
    smuggle_pickle: bool = False
    parity_gap: float = 0.08


@dg.asset(name="trained_model", group_name="training", deps=["dataset"])
def stand_in_trained_model(context: dg.AssetExecutionContext, config: TrainingConfig,
                           custody: CustodyResource) -> dg.Output[Any]:
    """A sealed model tree as the training stage produces it; its record names who trained it."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / "model", seed=config.seed)
        (model_dir / "training_record.json").write_text(json.dumps(
            {"actor": custody.actor(context), "seed": config.seed, "hyperparameters": {"epochs": 1}}))
        if config.smuggle_pickle:
            (model_dir / "preprocessing.json").write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")
        return custody.output(context, model_dir, metadata={"actor": custody.actor(context)})


@dg.asset(name="model_evaluation", group_name="training", deps=["trained_model"])
def stand_in_model_evaluation(context: dg.AssetExecutionContext, config: TrainingConfig,
                              custody: CustodyResource) -> dg.Output[Any]:
    evaluation = json.loads(json.dumps(GOOD_EVALUATION))
    evaluation["fairness"]["sex"]["demographic_parity_difference"] = config.parity_gap
    evaluation["passed"] = config.parity_gap <= 0.25
    return custody.output(context, evaluation)


UPSTREAM = [stand_in_trained_model, stand_in_model_evaluation, security.scan_report, security.model_signature,
            security.attestation, security.scan_report_clear, security.model_signature_verifies,
            security.attestation_verifies]
RELEASE = [release_assets.registered_model, release_assets.deployment,
           release_assets.registered_model_policy_allows, release_assets.registered_model_separation_of_duties,
           release_assets.deployment_matches_signed_digest, release_assets.deployment_healthy]
OWN_CODE = ["secure_ml/release/registry.py", "secure_ml/governance/policy.py", "secure_ml/release/deploy.py", "secure_ml/release/gate.py",
            "secure_ml/release/evidence.py", "secure_ml/release/deployed.py", "secure_ml/release/targets", "secure_ml/release/k8s_render.py",
            "secure_ml/release/serving.py", "assets/release.py", "resources/release.py"]


@pytest.fixture
def stage(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, landed_sample: str) -> Settings:
    """A home whose security scan covers this stage's code, with alice's dataset materialized."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for source in settings.config_dir.glob("*.yaml"):
        (config_dir / source.name).write_text(source.read_text())
    for sub in settings.config_dir.iterdir():
        if sub.is_dir():
            (config_dir / sub.name).symlink_to(sub)
    security_cfg = yaml.safe_load((config_dir / "security.yaml").read_text())
    security_cfg["scan"]["code"]["paths"] = OWN_CODE
    (config_dir / "security.yaml").write_text(yaml.safe_dump(security_cfg))
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config_dir))
    current = Settings.from_env()
    KEYS.clear()
    KEYS.update(trust_people(current, tmp_path / "identities", unauthenticated_may_train=False))
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([data_assets.dataset], instance=instance, tags=as_(current, "alice"),
                                resources=resources.build_resources(current), raise_on_error=False)
    assert result.success, [e.step_failure_data.error.message for e in result.get_step_failure_events()]
    return current


def as_(settings: Settings, who: str) -> dict[str, str]:
    """Run tags that prove who launched the run: a run request signed with their identity key."""
    actor = authn.authenticate(settings, authn.verified_policy(settings), identity_file=KEYS[who])
    return {authn.RUN_REQUEST_TAG: authn.sign_run_request(actor)}


def key(who: str) -> list[str]:
    return ["--identity", str(KEYS[who])]


def run(settings: Settings, *, actor: str, selection: Any = None, train: bool = True,
        **training: Any) -> dg.ExecuteInProcessResult:
    config = {"config": {"seed": 0, "smuggle_pickle": False, "parity_gap": 0.08, **training}}
    with dg.DagsterInstance.get() as instance:
        return dg.materialize(
            [*UPSTREAM, *RELEASE], instance=instance, resources=resources.build_resources(settings),
            raise_on_error=False, selection=selection, tags=as_(settings, actor),
            run_config={"ops": {"trained_model": config, "model_evaluation": config}} if train else None,
        )


def checks(result: dg.ExecuteInProcessResult) -> dict[str, tuple[bool, str]]:
    return {e.check_name: (e.passed, str(e.metadata["reason"].value)) for e in result.get_asset_check_evaluations()}


def materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    return {e.asset_key.to_user_string(): {k: getattr(v, "value", v) for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}


def step_errors(result: dg.ExecuteInProcessResult) -> str:
    return " ".join(e.step_failure_data.error.message for e in result.get_step_failure_events()
                    if e.step_failure_data.error)


def actions(settings: Settings) -> set[tuple[str, str, str]]:
    return {(e["actor"], e["action"], e["outcome"]) for e in settings.audit_log().entries()}


def test_the_release_proof(stage: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    settings = stage
    # 1. A model that passes everything is registered as a candidate and waits for a second identity.
    first = run(settings, actor="bob")
    assert first.success, step_errors(first)
    meta = materialized(first)
    registered = meta["registered_model"]
    assert registered["version"] == "v1" and registered["stage"] == "staging"
    assert "production needs 1 approval(s)" in registered["production_decision"]
    assert "secure-ml approve v1" in registered["next_step"]
    assert meta["deployment"]["status"] == "awaiting_approval"
    outcome = checks(first)
    assert outcome["registered_model_policy_allows"][0] and outcome["registered_model_separation_of_duties"][0]
    assert outcome["deployment_matches_signed_digest"] == (True, "nothing is deployed yet")

    # A self-approval is denied with a clear reason; a second identity's approval promotes it.
    assert cli(["approve", "v1", *key("bob")]) == 1
    assert "self-approval: bob trained v1" in capsys.readouterr().err
    assert cli(["approve", "v1", *key("alice")]) == 1
    assert "self-approval: alice added the training data of v1" in capsys.readouterr().err
    assert cli(["approve", "v1", *key("carol")]) == 0
    assert "v1 is now production" in capsys.readouterr().out

    # 2. The deployment asset deploys it through the gate, signed like `secure-ml deploy`: only with the
    #    launcher's own identity key at hand (no key, or someone else's key, deploys nothing).
    only_deployment = dg.AssetSelection.assets("deployment")
    unsigned = run(settings, actor="dave", selection=only_deployment, train=False)
    assert not unsigned.success and "a deployment is a signed decision" in step_errors(unsigned)
    monkeypatch.setenv("SECURE_ML_IDENTITY", str(KEYS["erin"]))
    borrowed = run(settings, actor="dave", selection=only_deployment, train=False)
    assert not borrowed.success and "launched by dave but the identity key here is erin's" in step_errors(borrowed)
    assert Registry.from_settings(settings).current_deployment("local") is None
    monkeypatch.setenv("SECURE_ML_IDENTITY", str(KEYS["dave"]))
    deployed = run(settings, actor="dave", selection=only_deployment, train=False)
    assert deployed.success, step_errors(deployed)
    assert materialized(deployed)["deployment"]["deployed_version"] == "v1"
    deployment_statements = [f for f in SignedDecisions.for_settings(settings).evidence(  # type: ignore[union-attr]
        Registry.from_settings(settings).get("v1")).facts if f.kind == "deployment"]
    assert [(f.signer, f.predicate["target"]) for f in deployment_statements] == [("dave", "local")]
    monkeypatch.delenv("SECURE_ML_IDENTITY")
    outcome = checks(deployed)
    assert outcome["deployment_matches_signed_digest"][0] and outcome["deployment_healthy"][0], outcome

    # 3. A second model: registered, approved by another approver, deployed from the CLI.
    second = run(settings, actor="bob", seed=1)
    assert second.success and materialized(second)["registered_model"]["version"] == "v2"
    assert cli(["approve", "v2", *key("erin")]) == 0
    monkeypatch.setenv("SECURE_ML_IDENTITY", str(KEYS["dave"]))
    assert cli(["deploy"]) == 0
    registry = Registry.from_settings(settings)
    assert registry.current_deployment("local").version == "v2"  # type: ignore[union-attr]

    # 4. Rollback restores the previous version, re-verified.
    assert cli(["rollback", "--reason", "proof"]) == 0
    assert registry.current_deployment("local").version == "v1"  # type: ignore[union-attr]
    assert registry.production().version == "v1"  # type: ignore[union-attr]
    assert ("dave", "deploy.rollback", "ok") in actions(settings)

    # 5. A model file tampered in the registry is refused at deploy; nothing is written.
    v2 = registry.get("v2")
    store = settings.artifact_store(actor="mallory")
    manifest = store.get_json(v2.evidence["store"]["model_tree"])
    manifest["files"]["config.json"] = store.put_bytes(b'{"architecture": "mlp", "threshold": 0.0}').sha256
    forged = store.put_bytes(json.dumps(manifest, sort_keys=True).encode(), kind="tree").sha256
    with sqlite3.connect(registry.path) as db:
        db.execute("UPDATE versions SET evidence = ? WHERE version = 'v2'",
                   (json.dumps({**v2.evidence, "store": {**v2.evidence["store"], "model_tree": forged}}),))
    registry.set_stage("v2", "production", actor="mallory")
    before = sorted((settings.home / "deployments" / "local").iterdir())
    assert cli(["deploy"]) == 1
    assert "the model does not match its signature: config.json changed after signing" in capsys.readouterr().err
    assert sorted((settings.home / "deployments" / "local").iterdir()) == before
    assert ("dave", "model.verify", "fail") in actions(settings)

    # 6. status shows versions, stages, approvals and what is deployed.
    assert cli(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in status["versions"]] == ["v1", "v2"]
    assert status["deployed"]["local"]["version"] == "v1"
    assert [a["identity"] for a in status["versions"][0]["approvals"]] == ["carol"]

    # 7. The audit log covers it all and verifies; any edit is detected.
    seen = {a for _, a, _ in actions(settings)}
    assert {"registry.register", "model.approve", "model.promote", "policy.promotion", "deploy", "model.verify",
            "deploy.rollback", "access.deny"} <= seen
    assert cli(["audit", "verify"]) == 0
    lines = settings.audit_path.read_text().splitlines(keepends=True)
    lines[5] = lines[5].replace('"outcome":"ok"', '"outcome":"deny"', 1) if '"outcome":"ok"' in lines[5] \
        else lines[5].replace('"actor":"', '"actor":"x', 1)
    settings.audit_path.write_text("".join(lines))
    assert cli(["audit", "verify"]) == 1


def test_a_fairness_breach_and_a_blocking_finding_each_stop_the_model(stage: Settings) -> None:
    settings = stage
    breach = run(settings, actor="bob", parity_gap=0.41)
    outcome = checks(breach)
    passed, reason = outcome["registered_model_policy_allows"]
    assert not passed and "fairness breach: demographic_parity_difference for sex is 0.41" in reason
    assert "deployment" not in materialized(breach)  # the blocking check stopped it
    assert Registry.from_settings(settings).get("v1").stage == "candidate"
    assert cli(["approve", "v1", *key("carol")]) == 1  # recorded, but the policy still says no
    assert Registry.from_settings(settings).get("v1").stage == "candidate"

    smuggled = run(settings, actor="bob", seed=2, smuggle_pickle=True)
    passed, reason = checks(smuggled)["scan_report_clear"]
    assert not passed and "pickle" in reason
    assert not {"model_signature", "registered_model", "deployment"} & set(materialized(smuggled))
    assert [v.version for v in Registry.from_settings(settings).versions()] == ["v1"]


def test_a_signature_for_another_model_is_refused_at_registration(stage: Settings) -> None:
    settings = stage
    assert run(settings, actor="bob").success
    # A new model appears, but signature and attestation still vouch for the old one.
    swapped = run(settings, actor="bob", seed=3, selection=dg.AssetSelection.assets("trained_model", "model_evaluation",
                                                                                   "registered_model"))
    assert not swapped.success
    assert "refusing to register: model_signature is for model tree" in step_errors(swapped)
    assert ("bob", "registry.register", "deny") in actions(settings)
    assert [v.version for v in Registry.from_settings(settings).versions()] == ["v1"]
