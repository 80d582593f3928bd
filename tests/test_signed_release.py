"""Signed decisions through the release workflow: the gates believe statements, not registry rows.

Touches: a real model sealed in the encrypted store, real model-signing and DSSE attestation,
identity keys and the signed trust policy (tests/_identities.py), the Release workflow (register,
approve, promote, deploy, rollback, revoke) with its Rego policies, SQLite edited as an insider
would, statement files copied, forged and truncated, and the CLI in-process for exit codes.
Does not touch: the Dagster run (tests/test_end_to_end.py) or the health check's server (off here).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from _identities import trust_people
from _release_fixtures import Keys, make_model_dir, publish, release_for
from cryptography.hazmat.primitives import serialization

from secure_ml.cli import main
from secure_ml.errors import BadInput, PolicyDenied, VerificationError
from secure_ml.governance import authn
from secure_ml.governance.decisions import sign_decision
from secure_ml.governance.identity import load_identity, new_identity
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # signs and verifies release decisions end to end

ALIASES = {"bob": ["bob@example.com", "github:bob"], "erin": ["erin@example.com"], "carol": ["carol@example.com"]}


@pytest.fixture
def world(settings: Settings, tmp_path: Path) -> dict[str, Any]:
    people = trust_people(settings, tmp_path / "ids", aliases=ALIASES)
    # The pipeline's own key signs the models, as it does in a run (so the CLI's verifiers trust it too).
    private = settings.home / "keys" / "model-signing.pem"
    keys = Keys(private, private.with_suffix(".pub"),
                serialization.load_pem_private_key(private.read_bytes(), password=None))  # type: ignore[arg-type]
    policy = authn.verified_policy(settings)

    def actor(name: str) -> authn.Actor:
        return authn.authenticate(settings, policy, identity_file=people[name])

    def register(seed: int, **kw: Any) -> Any:
        published = publish(settings, make_model_dir(tmp_path / f"model{seed}", seed=seed), keys, tmp_path, **kw)
        release = release_for(settings, keys)
        return release, release.register(published.digest, published.evidence, actor="unauthenticated")[0]

    return {"people": people, "keys": keys, "actor": actor, "register": register, "tmp": tmp_path}


def audited(settings: Settings, action: str) -> list[dict[str, Any]]:
    return [e for e in settings.audit_log().entries() if e["action"] == action]


def test_approve_and_deploy_are_signed_and_the_gate_reads_statements(world: dict[str, Any], settings: Settings) -> None:
    release, v1 = world["register"](1)
    assert v1.stage == "staging" and v1.registered_by == "bob"
    with pytest.raises(PolicyDenied, match="SECURE_ML_IDENTITY"):
        release.approve("v1")
    version, decision = release.approve("v1", by=world["actor"]("carol"))
    assert decision.allowed and version.stage == "production" and [a["identity"] for a in version.approvals] == ["carol"]
    record = release.deploy("production", actor="dave", by=world["actor"]("dave"), health=False)
    assert record.version == "v1"
    kinds = sorted(f.kind for f in release.signed.evidence(version).facts)
    assert kinds == ["approval", "deployment", "evaluation", "promotion", "provenance", "scan", "training"]
    # A deployer may not promote; an approver may not deploy.
    with pytest.raises(PolicyDenied):
        release.deploy("production", actor="carol", by=world["actor"]("carol"), health=False)


def test_an_edited_registry_row_is_refused(world: dict[str, Any], settings: Settings) -> None:
    release, _ = world["register"](1)
    db = sqlite3.connect(release.registry.path)
    db.execute("INSERT INTO approvals VALUES ('v1', 'carol', '[\"approver\"]', '2026-01-01')")
    db.execute("UPDATE versions SET stage = 'production' WHERE version = 'v1'")
    db.commit()
    db.close()
    with pytest.raises(VerificationError, match="registry row of v1 was edited: .*no signed statement \\(carol\\)"):
        release.deploy("production", actor="dave", by=world["actor"]("dave"), health=False)
    assert audited(settings, "registry.verify")[-1]["outcome"] == "deny"


def test_moved_untrusted_and_garbled_statements_are_refused(world: dict[str, Any], settings: Settings) -> None:
    release, v1 = world["register"](1)
    release.approve("v1", by=world["actor"]("carol"))
    _, v2 = world["register"](2)
    ledger = release.signed.ledger
    approval = next(p for p in (ledger.directory / v1.model_digest).glob("*.json")
                    if b"approval" in __import__("base64").b64decode(__import__("json").loads(p.read_bytes())["payload"]))
    shutil.copy(approval, ledger.directory / v2.model_digest / approval.name)
    fresh = release_for(settings, world["keys"])
    with pytest.raises(VerificationError, match="moved from another version"):
        fresh.approve("v2", by=world["actor"]("erin"))
    (ledger.directory / v2.model_digest / approval.name).unlink()
    stranger = load_identity(new_identity("stranger", world["tmp"] / "stranger")[0])
    forged = sign_decision("approval", v2.model_digest, {"version": "v2"}, stranger.signer)
    (ledger.directory / v2.model_digest / "forged.json").write_bytes(forged)
    with pytest.raises(VerificationError, match="not signed by a key the trust policy gives the approver role"):
        release_for(settings, world["keys"]).registry.get("v2")
    (ledger.directory / v2.model_digest / "forged.json").write_bytes(forged[: len(forged) // 2])
    with pytest.raises(VerificationError, match="truncated or garbled"):
        release_for(settings, world["keys"]).registry.get("v2")
    assert len(audited(settings, "decision.verify")) >= 3


def test_separation_of_duties_holds_under_every_alias(world: dict[str, Any], settings: Settings) -> None:
    release, _ = world["register"](1, trainer="erin@example.com", data_actor="alice")
    with pytest.raises(PolicyDenied, match="erin trained v1"):
        release.approve("v1", by=world["actor"]("erin"))
    release, _ = world["register"](2, trainer="bob", code_author="carol@example.com")
    with pytest.raises(PolicyDenied, match="carol authored the pipeline code"):
        release.approve("v2", by=world["actor"]("carol"))


def test_revoked_versions_are_taken_down_never_redeployed_and_skipped_by_rollback(
        world: dict[str, Any], settings: Settings) -> None:
    release, _ = world["register"](1)
    release.approve("v1", by=world["actor"]("carol"))
    release.deploy("production", actor="dave", by=world["actor"]("dave"), health=False)
    release, _ = world["register"](2)
    release.approve("v2", by=world["actor"]("carol"))
    release.deploy("production", actor="dave", by=world["actor"]("dave"), health=False)
    with pytest.raises(PolicyDenied):
        release.revoke("v1", by=world["actor"]("dave"), reason="not an approver")
    release.revoke("v1", by=world["actor"]("carol"), reason="trained on withdrawn data")
    assert release.registry.get("v1").stage == "revoked"
    with pytest.raises(BadInput, match="no earlier verified deployment"):
        release.rollback(actor="dave", by=world["actor"]("dave"), target="local")
    with pytest.raises(PolicyDenied, match="v1 is revoked"):
        release.deploy("v1", actor="dave", by=world["actor"]("dave"), health=False)
    # Revoking what is live: erin (approver and deployer) rolls it back to the last good version.
    release, _ = world["register"](3)
    release.approve("v3", by=world["actor"]("carol"))
    release.deploy("production", actor="dave", by=world["actor"]("dave"), health=False)
    done = release.revoke("v3", by=world["actor"]("erin"), reason="bias found")
    assert done == ["local: rolled back to v2"]
    assert release.registry.current_deployment("local").version == "v2"


def test_cli_exit_codes_and_a_swapped_policy(world: dict[str, Any], settings: Settings,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    world["register"](1)
    with pytest.raises(SystemExit) as usage:
        main(["approve", "v1", "--as", "carol"])
    assert usage.value.code == 2
    capsys.readouterr()
    monkeypatch.setenv("SECURE_ML_ACTOR", "carol")  # a claimed name grants nothing
    assert main(["approve", "v1"]) == 1
    assert "set SECURE_ML_IDENTITY" in capsys.readouterr().err
    assert audited(settings, "access.deny")[-1]["actor"] == "unauthenticated:carol"
    owner = load_identity(world["people"]["owner"])
    authn.trust_store(settings).update(lambda doc: None, [owner.signer])  # version 2
    trust = settings.home / "trust"
    good = (trust / "policy.json").read_bytes()
    shutil.copy(trust / "history" / "1.policy.json", trust / "policy.json")
    monkeypatch.setenv("SECURE_ML_IDENTITY", str(world["people"]["carol"]))
    assert main(["approve", "v1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rollback is refused" in err[0]
    (trust / "policy.json").write_bytes(good)
    assert main(["approve", "v1"]) == 0
    assert main(["status", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"version": "v1"' in out and '"stage": "production"' in out
    with pytest.raises(SystemExit) as usage:
        main(["revoke", "v1"])
    assert usage.value.code == 2


def test_a_deleted_statement_and_an_unsigned_deployment_are_refused(
        world: dict[str, Any], settings: Settings, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    release, v1 = world["register"](1)
    release.approve("v1", by=world["actor"]("carol"))
    # Every deployment is a signed statement: a deployer's name without their key deploys nothing.
    with pytest.raises(PolicyDenied, match="a deployment is a signed decision"):
        release.deploy("production", actor="dave", health=False)
    assert release.registry.current_deployment("local") is None
    release.deploy("production", actor="dave", by=world["actor"]("dave"), health=False)
    release.revoke("v1", by=world["actor"]("carol"), reason="withdrawn data")
    history = release.registry.deployments("local")
    folder = release.signed.ledger.directory / v1.model_digest
    indexed = dict(release.registry.indexed_statements(v1.model_digest))
    revocation = next(sha for sha, kind in indexed.items() if kind == "revocation")
    (folder / f"{revocation}.json").unlink()  # un-revoke by deleting the statement
    monkeypatch.setenv("SECURE_ML_IDENTITY", str(world["people"]["dave"]))
    assert main(["deploy", "v1", "--no-health-check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "signed revocation statement" in err[0] and "file is gone" in err[0], err
    assert "deleted decision" in audited(settings, "decision.verify")[-1]["details"]["reason"]
    assert release.registry.deployments("local") == history  # nothing deployed, nothing recorded


def test_kubernetes_admission_admits_only_signed_deployments(world: dict[str, Any], settings: Settings,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    release, v1 = world["register"](1)
    release.approve("v1", by=world["actor"]("carol"))
    release.deploy("production", actor="dave", by=world["actor"]("dave"), target="kubernetes", health=False)
    assert release.signed.admitted_digests("kubernetes") == [v1.model_digest]
    assert release.signed.admitted_digests("local") == []
    release, v2 = world["register"](2)
    # A deployment row inserted into the registry admits nothing: admission reads statements.
    release.registry.record_deployment(actor="dave", target="kubernetes", version="v2", model_digest=v2.model_digest,
                                       status="deployed", location="/nowhere", reason="forged row")
    assert release.signed.admitted_digests("kubernetes") == [v1.model_digest]
    assert release.signed.require_signed_deployment(release.registry.get("v1"), "kubernetes").signer == "dave"
    with pytest.raises(VerificationError, match="no signed deployment or rollback statement says so"):
        release.signed.require_signed_deployment(release.registry.get("v2"), "kubernetes")
    image = "--image-digest=sha256:" + "1" * 64
    out = world["tmp"] / "rendered"
    assert main(["k8s", "render", str(out), image, "--model-digest", v2.model_digest]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"model sha256:{v2.model_digest} is not a signed, verified model" in err[0], err
    assert not out.exists()
    # A deployment statement signed by a key the policy does not trust stops admission (audited).
    stranger = load_identity(new_identity("stranger", world["tmp"] / "stranger")[0])
    forged = sign_decision("deployment", v2.model_digest, {"version": "v2", "target": "kubernetes"}, stranger.signer)
    (release.signed.ledger.directory / v2.model_digest / "forged.json").write_bytes(forged)
    with pytest.raises(VerificationError, match="not signed by a key the trust policy gives the deployer role"):
        release.signed.admitted_digests("kubernetes")
    assert audited(settings, "decision.verify")[-1]["actor"] == "admission"
    (release.signed.ledger.directory / v2.model_digest / "forged.json").unlink()
    release.revoke("v1", by=world["actor"]("carol"), reason="bias found")
    assert release.signed.admitted_digests("kubernetes") == []
