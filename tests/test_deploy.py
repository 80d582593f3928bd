"""The release core: registration, approvals with separation of duties, the deploy gate, rollback.

Touches: secure_ml/release/deploy.py end to end on a real home (encrypted store, audit log, SQLite
registry, Rego policies, roles.yaml), with real models (torch -> safetensors), real model-signing
bundles and DSSE attestations made and verified by secure_ml.signing / secure_ml.attestation,
the real health check (serving's loader predicting a row), and the CLI in a subprocess.
Does not touch: Dagster (tests/test_release_stage.py) or the HTTP server (tests/test_serving.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _release_fixtures import (
    CLEAN_SCAN,
    GOOD_EVALUATION,
    Keys,
    Published,
    attest,
    make_keys,
    make_model_dir,
    publish,
    release_for,
    sign,
)

from secure_ml.errors import BadInput, IntegrityError, PolicyDenied, VerificationError
from secure_ml.release import targets
from secure_ml.release.deploy import Release
from secure_ml.release.deployed import HealthResult
from secure_ml.release.evidence import model_digest
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # runs the release workflow on signed models

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def release(settings: Settings, keys: Keys) -> Release:
    return release_for(settings, keys)


def new_model(settings: Settings, keys: Keys, tmp_path: Path, name: str, **kwargs: Any) -> Published:
    seed = kwargs.pop("seed", sum(name.encode()))
    nan = kwargs.pop("poison_nan", False)
    return publish(settings, make_model_dir(tmp_path / name, seed=seed, poison_nan=nan), keys, tmp_path, **kwargs)


def production(release: Release, published: Published, approver: str = "carol") -> str:
    version, staging, _ = release.register(published.digest, published.evidence, actor="bob")
    assert staging.allowed, staging.reasons
    version, decision = release.approve(version.version, identity=approver)
    assert decision.allowed and version.stage == "production", decision.reasons
    return version.version


def audit_actions(settings: Settings) -> list[tuple[str, str, str]]:
    return [(e["actor"], e["action"], e["outcome"]) for e in settings.audit_log().entries()]


def local_files(settings: Settings) -> list[str]:
    root = settings.home / "deployments" / "local"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# -- the happy path and separation of duties -------------------------------------------------------
def test_a_good_model_reaches_production_only_after_a_second_identity_approves(
        settings: Settings, release: Release, keys: Keys, tmp_path: Path) -> None:
    published = new_model(settings, keys, tmp_path, "m1")
    version, staging, prod = release.register(published.digest, published.evidence, actor="bob")
    assert version.version == "v1" and version.stage == "staging" and staging.allowed
    assert not prod.allowed and prod.reasons == (
        "production needs 1 approval(s) by an approver who neither added the data nor trained the model; it has 0",)
    with pytest.raises(PolicyDenied, match="no model version is in production|is staging in the registry"):
        release.deploy("v1", actor="dave")
    assert local_files(settings) == []

    with pytest.raises(PolicyDenied, match="self-approval: bob trained v1"):
        release.approve("v1", identity="bob")
    with pytest.raises(PolicyDenied, match="self-approval: alice added the training data of v1"):
        release.approve("v1", identity="alice")
    with pytest.raises(PolicyDenied, match="dave .deployer. may not model.approve"):
        release.approve("v1", identity="dave")
    assert release.registry.get("v1").stage == "staging" and release.registry.get("v1").approvals == ()

    version, decision = release.approve("v1", identity="carol")
    assert decision.allowed and version.stage == "production"
    with pytest.raises(PolicyDenied, match="carol has already approved v1|only a candidate or staging"):
        release.approve("v1", identity="carol")

    with pytest.raises(PolicyDenied, match="bob .ml_engineer. may not model.deploy"):
        release.deploy(actor="bob")
    with pytest.raises(PolicyDenied, match="carol .approver. may not model.deploy"):
        release.deploy(actor="carol")
    assert local_files(settings) == []

    record = release.deploy(actor="dave")
    assert (record.version, record.status, record.target) == ("v1", "deployed", "local")
    location = Path(record.location)
    assert model_digest(location / "model") == published.digest
    assert json.loads((settings.home / "deployments" / "local" / "current.json").read_text())["version"] == "v1"
    actions = audit_actions(settings)
    for expected in [("bob", "registry.register", "ok"), ("bob", "model.approve", "deny"),
                     ("alice", "model.approve", "deny"), ("carol", "model.approve", "allow"),
                     ("carol", "model.promote", "allow"), ("bob", "access.deny", "deny"),
                     ("dave", "model.verify", "ok"), ("dave", "deploy.gate", "allow"), ("dave", "deploy", "ok")]:
        assert expected in actions, expected
    history = [e["action"] for e in release.registry.history("v1")]
    assert history[0] == "register" and {"promote", "approve", "approve.denied", "deploy.deployed"} <= set(history)
    settings.audit_log().verify()


def test_an_approver_who_trained_the_model_is_denied(settings: Settings, release: Release, keys: Keys,
                                                     tmp_path: Path) -> None:
    published = new_model(settings, keys, tmp_path, "m1", trainer="erin", data_actor="erin")
    release.register(published.digest, published.evidence, actor="bob")
    with pytest.raises(PolicyDenied) as denied:
        release.approve("v1", identity="erin")
    message = str(denied.value)
    assert "self-approval: erin added the training data of v1" in message and "erin trained v1" in message


def test_whoever_changed_the_pipeline_may_not_deploy(settings: Settings, release: Release, keys: Keys,
                                                     tmp_path: Path) -> None:
    published = new_model(settings, keys, tmp_path, "m1", code_author="erin")
    production(release, published, approver="carol")
    with pytest.raises(PolicyDenied, match="separation of duties: erin authored the pipeline code commit"):
        release.deploy(actor="erin")
    assert local_files(settings) == []
    assert release.deploy(actor="dave").status == "deployed"


# -- what stops a model ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "reason"), [
    ({"evaluation": {**GOOD_EVALUATION, "fairness": {"sex": {"demographic_parity_difference": 0.41,
                                                             "equalized_odds_difference": 0.1}}}},
     "fairness breach: demographic_parity_difference for sex is 0.41"),
    ({"scan": {**CLEAN_SCAN, "blocking": True, "findings": [
        {"id": "pickle-in-model", "severity": "critical", "blocking": True, "where": "weights.bin"}]}},
     "blocking scan finding: pickle-in-model (critical) in weights.bin"),
    ({"approved": False}, "not an approved source"),
])
def test_a_policy_breach_stops_promotion_with_its_reason(settings: Settings, release: Release, keys: Keys,
                                                         tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    published = new_model(settings, keys, tmp_path, "m1", **change)
    version, staging, _ = release.register(published.digest, published.evidence, actor="bob")
    assert version.stage == "candidate" and any(reason in r for r in staging.reasons), staging.reasons
    version, decision = release.approve("v1", identity="carol")  # the approval is recorded...
    assert version.stage == "candidate" and not decision.allowed  # ...but the policy still says no
    assert any(reason in r for r in decision.reasons)
    with pytest.raises(PolicyDenied):
        release.deploy("v1", actor="dave")
    denials = [e for e in settings.audit_log().entries() if e["action"] == "model.promote" and e["outcome"] == "deny"]
    assert any(reason in " ".join(e["details"]["reasons"]) for e in denials)


def test_an_unsigned_model_is_stopped(settings: Settings, release: Release, keys: Keys, tmp_path: Path) -> None:
    published = new_model(settings, keys, tmp_path, "m1", bundle=b"")
    _, staging, _ = release.register(published.digest, published.evidence, actor="bob")
    assert not staging.allowed
    assert any("the model signature did not verify" in r for r in staging.reasons), staging.reasons


def test_a_model_signed_by_an_untrusted_key_is_stopped(settings: Settings, release: Release, keys: Keys,
                                                       tmp_path: Path) -> None:
    stranger = make_keys(tmp_path / "stranger", "stranger")
    model_dir = make_model_dir(tmp_path / "m1")
    bundle = sign(model_dir, stranger, tmp_path)
    published = publish(settings, model_dir, keys, tmp_path, bundle=bundle, envelope=attest(model_dir, bundle, stranger))
    _, staging, _ = release.register(published.digest, published.evidence, actor="bob")
    assert any("not trusted" in r for r in staging.reasons), staging.reasons


def test_a_tampered_model_is_stopped_before_registration_succeeds(settings: Settings, release: Release,
                                                                   keys: Keys, tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "m1")
    bundle = sign(model_dir, keys, tmp_path)
    envelope = attest(model_dir, bundle, keys)
    (model_dir / "config.json").write_text(json.dumps({"architecture": "mlp", "threshold": 0.01}))  # after signing
    published = publish(settings, model_dir, keys, tmp_path, bundle=bundle, envelope=envelope)
    _, staging, _ = release.register(published.digest, published.evidence, actor="bob")
    assert any("the model signature did not verify" in r for r in staging.reasons), staging.reasons


def test_an_attestation_for_other_files_is_stopped(settings: Settings, release: Release, keys: Keys,
                                                   tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "m1")
    bundle = sign(model_dir, keys, tmp_path)
    envelope = attest(model_dir, bundle, keys, files={"model.safetensors": "0" * 64})
    published = publish(settings, model_dir, keys, tmp_path, bundle=bundle, envelope=envelope)
    _, staging, _ = release.register(published.digest, published.evidence, actor="bob")
    assert any("the attestation did not verify" in r and "subjects do not match" in r for r in staging.reasons)
    assert not any("signature did not verify" in r for r in staging.reasons)


# -- the deploy gate re-verifies from the bytes ------------------------------------------------------------
def _swap_stored_file(settings: Settings, published: Published, name: str, data: bytes) -> None:
    """Replace one file of the stored model tree with other (authentic) bytes: a registry-side swap."""
    store = settings.artifact_store(actor="mallory")
    manifest = store.get_json(published.evidence["store"]["model_tree"])
    manifest["files"][name] = store.put_bytes(data).sha256
    forged = store.put_bytes(json.dumps(manifest, sort_keys=True).encode(), kind="tree")
    # The attacker rewrites the registry row to point at the forged tree (the digest stays).
    import sqlite3

    evidence = dict(published.evidence)
    evidence["store"] = {**evidence["store"], "model_tree": forged.sha256}
    with sqlite3.connect(settings.home / "registry" / "registry.db") as db:
        db.execute("UPDATE versions SET evidence = ? WHERE model_digest = ?",
                   (json.dumps(evidence, sort_keys=True), published.digest))


def test_a_model_tampered_in_the_registry_is_refused_at_deploy(settings: Settings, release: Release, keys: Keys,
                                                               tmp_path: Path) -> None:
    published = new_model(settings, keys, tmp_path, "m1")
    production(release, published)
    _swap_stored_file(settings, published, "config.json", b'{"architecture": "mlp", "threshold": 0.0}')
    with pytest.raises(VerificationError, match="the model does not match its signature: config.json changed after"):
        release.deploy(actor="dave")
    assert local_files(settings) == []
    assert not list((settings.home / "deployments" / ".staging").iterdir())  # scratch removed too
    assert ("dave", "model.verify", "fail") in audit_actions(settings)


def test_ciphertext_tampered_in_the_store_is_refused_at_deploy(settings: Settings, release: Release, keys: Keys,
                                                               tmp_path: Path) -> None:
    published = new_model(settings, keys, tmp_path, "m1")
    production(release, published)
    store = settings.artifact_store(actor="mallory")
    manifest = store.get_json(published.evidence["store"]["model_tree"])
    path = store.path_for(manifest["files"]["model.safetensors"])
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        release.deploy(actor="dave")
    assert local_files(settings) == []


def test_kubernetes_target_writes_validated_manifests(settings: Settings, release: Release, keys: Keys,
                                                      tmp_path: Path) -> None:
    import yaml

    published = new_model(settings, keys, tmp_path, "m1")
    production(release, published)
    record = release.deploy(actor="dave", target="kubernetes")
    location = Path(record.location)
    manifests = list(yaml.safe_load_all((location / "manifests.yaml").read_text()))
    deployment = manifests[0]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["secure-ml.dev/model-digest"] == \
        f"sha256:{published.digest}"
    assert model_digest(location / "model") == published.digest and (location / "model.sig").read_bytes() == published.bundle
    with pytest.raises(BadInput, match="unknown deploy target"):
        release.deploy(actor="dave", target="ftp")


def test_a_new_target_is_one_class_and_its_registration(settings: Settings, release: Release, keys: Keys,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workflow calls a target only through the protocol: register one and it is deployable."""
    calls: list[tuple[str, str]] = []

    class Shelf:
        name = "shelf"

        def write(self, staging: Path, *, version: str, model_digest: str, config: Any) -> dict[str, str]:
            (staging / "SHELF").write_text(f"{version} {model_digest}")
            return {"shelf": "SHELF"}

        def activate(self, root: Path, location: Path, *, version: str, model_digest: str) -> None:
            calls.append(("activate", location.name))

        def health(self, location: Path, *, trust: Any) -> HealthResult | None:
            calls.append(("health", location.name))
            return HealthResult(True, "on the shelf")

        def clear(self, root: Path) -> None:
            calls.append(("clear", root.name))

    monkeypatch.setitem(targets.TARGETS, "shelf", Shelf())
    published = new_model(settings, keys, tmp_path, "m1")
    production(release, published)
    location = Path(release.deploy(actor="dave", target="shelf").location)
    assert (location / "SHELF").read_text() == f"v1 {published.digest}"
    assert json.loads((location / "DEPLOYMENT.json").read_text())["shelf"] == "SHELF"
    assert model_digest(location / "model") == published.digest
    assert calls == [("activate", location.name), ("health", location.name)]
    from secure_ml.cli import build_parser

    deploy = build_parser()._subparsers._group_actions[0].choices["deploy"]  # type: ignore[union-attr]
    assert next(a for a in deploy._actions if a.dest == "target").choices == sorted(targets.TARGETS)


# -- rollback -------------------------------------------------------------------------------------------------
def test_rollback_restores_the_previous_version_reverified(settings: Settings, release: Release, keys: Keys,
                                                           tmp_path: Path) -> None:
    production(release, new_model(settings, keys, tmp_path, "m1"))
    release.deploy(actor="dave")
    production(release, new_model(settings, keys, tmp_path, "m2"))
    release.deploy(actor="dave")
    assert {v.version: v.stage for v in release.registry.versions()} == {"v1": "archived", "v2": "production"}
    with pytest.raises(PolicyDenied, match="carol .approver. may not model.rollback"):
        release.rollback(actor="carol")
    verifications = sum(1 for e in settings.audit_log().entries() if e["action"] == "model.verify")
    record = release.rollback(actor="dave", reason="latency regression")
    assert (record.version, record.status) == ("v1", "rollback")
    assert {v.version: v.stage for v in release.registry.versions()} == {"v1": "production", "v2": "archived"}
    assert json.loads((settings.home / "deployments" / "local" / "current.json").read_text())["version"] == "v1"
    assert sum(1 for e in settings.audit_log().entries() if e["action"] == "model.verify") == verifications + 1
    rollbacks = [e for e in settings.audit_log().entries() if e["action"] == "deploy.rollback"]
    assert rollbacks[-1]["details"]["reason"] == "latency regression"
    with pytest.raises(BadInput, match="no earlier verified deployment"):
        release.rollback(actor="dave")
    settings.audit_log().verify()


def test_rollback_to_a_tampered_version_is_refused_and_changes_nothing(settings: Settings, release: Release,
                                                                       keys: Keys, tmp_path: Path) -> None:
    first = new_model(settings, keys, tmp_path, "m1")
    production(release, first)
    release.deploy(actor="dave")
    production(release, new_model(settings, keys, tmp_path, "m2"))
    release.deploy(actor="dave")
    _swap_stored_file(settings, first, "MODEL_CARD.md", b"# a different card\n")
    with pytest.raises(VerificationError):
        release.rollback(actor="dave")
    assert json.loads((settings.home / "deployments" / "local" / "current.json").read_text())["version"] == "v2"
    assert release.registry.production().version == "v2"  # type: ignore[union-attr]
    assert ("dave", "deploy.rollback", "fail") in audit_actions(settings)


def test_a_failing_health_check_rolls_back_by_itself(settings: Settings, release: Release, keys: Keys,
                                                     tmp_path: Path) -> None:
    production(release, new_model(settings, keys, tmp_path, "m1"))
    release.deploy(actor="dave")
    production(release, new_model(settings, keys, tmp_path, "m2", poison_nan=True))  # passes every gate, answers NaN
    with pytest.raises(VerificationError, match="health check failed after deploying v2.*rolled back to v1"):
        release.deploy(actor="dave")
    assert json.loads((settings.home / "deployments" / "local" / "current.json").read_text())["version"] == "v1"
    assert release.registry.production().version == "v1"  # type: ignore[union-attr]
    statuses = [(d.version, d.status) for d in release.registry.deployments("local")]
    assert statuses == [("v1", "deployed"), ("v2", "deployed"), ("v2", "rolled_back"), ("v1", "rollback")]
    rolled = release.registry.deployments("local")[2]
    assert "not one probability in [0, 1]" in rolled.reason
    assert ("dave", "deploy.health", "fail") in audit_actions(settings)


def test_a_failing_first_deploy_leaves_nothing_live(settings: Settings, release: Release, keys: Keys,
                                                    tmp_path: Path) -> None:
    production(release, new_model(settings, keys, tmp_path, "m1", poison_nan=True))
    with pytest.raises(VerificationError, match="nothing is live"):
        release.deploy(actor="dave")
    assert not (settings.home / "deployments" / "local" / "current.json").exists()


# -- the CLI ------------------------------------------------------------------------------------------------
def _cli(settings: Settings, *args: str, identity: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SECURE_ML_HOME": str(settings.home), "SECURE_ML_ACTOR": "carol"}  # a claim: ignored
    env.pop("SECURE_ML_IDENTITY", None)
    if identity is not None:
        env["SECURE_ML_IDENTITY"] = str(identity)
    return subprocess.run([sys.executable, "-m", "secure_ml", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, check=False)


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
def test_cli_approve_and_status(settings: Settings, keys: Keys, tmp_path: Path) -> None:
    from _identities import trust_people

    people = trust_people(settings, tmp_path / "ids")
    # The CLI trusts the security configuration's keys: make the test key the trusted one.
    trusted = settings.home / "keys" / "model-signing.pub"
    trusted.write_bytes(keys.public.read_bytes())
    release = release_for(settings, keys)
    published = new_model(settings, keys, tmp_path, "m1")
    release.register(published.digest, published.evidence, actor="bob")
    assert _cli(settings, "approve", "v1").returncode == 1  # no key: a claimed name grants nothing
    denied = _cli(settings, "approve", "v1", identity=people["bob"])
    assert denied.returncode == 1 and "self-approval: bob trained v1" in denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1
    approved = _cli(settings, "approve", "v1", identity=people["carol"])
    assert approved.returncode == 0, approved.stderr
    assert "v1 is now production" in approved.stdout
    deployed = _cli(settings, "deploy", identity=people["dave"])
    assert deployed.returncode == 0, deployed.stderr
    status = json.loads(_cli(settings, "status", "--json").stdout)
    assert status["versions"][0]["stage"] == "production"
    assert [a["identity"] for a in status["versions"][0]["approvals"]] == ["carol"]
    assert status["deployed"]["local"]["version"] == "v1"
    text = _cli(settings, "status").stdout
    assert "v1" in text and "production" in text and "carol" in text and "deployed to local: v1" in text
    settings.audit_log().verify()
