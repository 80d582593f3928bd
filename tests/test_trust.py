"""Identities as keys, the signed trust policy and signed decisions (secure_ml.governance).

Touches: real Ed25519 keys on disk (cryptography), real DSSE envelopes signed and verified with
securesystemslib, the trust store's files as an attacker with write access to the home would edit
them (swap, rollback, self-signed replacement, garbled bytes).
Does not touch: the CLI (tests/test_trust_cli.py) or the release gates.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from secure_ml.custody.dsse import parse_envelope, verify_envelope
from secure_ml.errors import BadInput, ConfigurationError, VerificationError
from secure_ml.governance.decisions import Evidence, sign_decision, verify_decision
from secure_ml.governance.identity import load_identity, new_identity, public_key_file
from secure_ml.governance.trust import TrustStore, TrustPolicy, add_identity

ROLES = {"classifications": ["public", "internal"],
         "roles": {"approver": {"may": ["model.approve"], "clearance": "internal"},
                   "deployer": {"may": ["model.deploy"], "clearance": "public"},
                   "ml_engineer": {"may": ["model.train"], "clearance": "internal"}}}
RELEASE = {"promotion": {"required_approvals": 1, "approver_role": "approver", "deployer_role": "deployer"}}
DIGEST = "ab" * 32
OTHER = "cd" * 32


def ident(tmp_path: Path, name: str):  # type: ignore[no-untyped-def]
    key, _ = new_identity(name, tmp_path / "ids" / name)
    return load_identity(key)


@pytest.fixture()
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    owner, carol, bob, pipe = (ident(tmp_path, n) for n in ("owner", "carol", "bob", "pipeline"))
    store = TrustStore(tmp_path / "home" / "trust")
    store.init(TrustPolicy.new_document([owner.key], threshold=1, roles_config=ROLES, release_config=RELEASE),
               [owner.signer])
    store.update(lambda d: add_identity(d, "carol", roles=["approver"], key=carol.key, aliases=["carol@example.com"]),
                 [owner.signer])
    store.update(lambda d: add_identity(d, "bob", roles=["ml_engineer"], key=bob.key,
                                        aliases=["github:bob", "bob@example.com"]), [owner.signer])
    store.update(lambda d: add_identity(d, "pipeline", roles=["pipeline"], key=pipe.key, model_signer=True),
                 [owner.signer])
    return {"owner": owner, "carol": carol, "bob": bob, "pipeline": pipe, "store": store, "tmp": tmp_path}


def test_identity_keys_are_owner_only_and_refused_when_loose_or_in_the_home(tmp_path: Path) -> None:
    key, pub = new_identity("carol", tmp_path / "carol")
    assert oct(key.stat().st_mode & 0o777) == "0o600" and b"PUBLIC KEY" in pub.read_bytes()
    me = load_identity(key)
    assert me.keyid == public_key_file(pub).keyid
    with pytest.raises(BadInput, match="never overwritten"):
        new_identity("carol", tmp_path / "carol")
    with pytest.raises(BadInput, match="inside SECURE_ML_HOME"):
        new_identity("dave", tmp_path / "home" / "ids", home=tmp_path / "home")
    with pytest.raises(ConfigurationError, match="inside SECURE_ML_HOME"):
        load_identity(key, home=tmp_path)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigurationError, match="loose permissions 0644"):
        load_identity(key)
    with pytest.raises(BadInput, match="is a private key"):
        os.chmod(key, 0o600)
        public_key_file(key)
    with pytest.raises(BadInput, match="identity name"):
        new_identity("../x", tmp_path)


def test_policy_versions_advance_and_names_resolve(world) -> None:  # type: ignore[no-untyped-def]
    policy = world["store"].load()
    assert policy.version == 4
    assert policy.name_of_key(world["carol"].keyid) == "carol"
    assert policy.resolve("GitHub:Bob") == "bob" and policy.same_person("bob@example.com", "github:bob")
    assert not policy.same_person("carol", "bob")
    assert policy.roles_of("unauthenticated") == ()
    assert [k.keyid for k in policy.model_signer_keys()] == [world["pipeline"].keyid]
    with pytest.raises(BadInput, match="already belongs to carol"):
        world["store"].update(lambda d: add_identity(d, "mallory", roles=["approver"], key=world["carol"].key),
                              [world["owner"].signer])


def test_only_the_owner_changes_the_policy(world) -> None:  # type: ignore[no-untyped-def]
    store = world["store"]
    before = store.policy_path.read_bytes()
    with pytest.raises(VerificationError, match="not signed by enough trusted keys"):
        store.update(lambda d: add_identity(d, "carol", roles=["deployer"]), [world["carol"].signer])
    assert store.policy_path.read_bytes() == before and store.load().version == 4


def test_rollback_swap_self_signed_and_garbled_policies_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    store, tmp = world["store"], world["tmp"]
    old = (store.directory / "history" / "2.policy.json").read_bytes()
    with pytest.raises(VerificationError, match="older than version 4 already seen: a rollback"):
        store.load(old)
    # Same version, other content, signed by the owner: a swap (only the pin tells it apart).
    doc = json.loads(base64.b64decode(json.loads(store.policy_path.read_bytes())["payload"]))
    doc["promotion"]["required_approvals"] = 0
    from secure_ml.custody.dsse import canonical_json, sign_envelope
    from secure_ml.governance.trust import PAYLOAD_TYPE
    swapped = sign_envelope(canonical_json(doc), PAYLOAD_TYPE, [world["owner"].signer])
    with pytest.raises(VerificationError, match="swapped"):
        store.load(swapped)
    # A whole new policy with a new owner that lists itself: the pinned owner did not sign it.
    mallory = ident(tmp, "mallory")
    forged = TrustPolicy.new_document([mallory.key], threshold=1, roles_config=ROLES, release_config=RELEASE)
    forged["version"] = 99
    with pytest.raises(VerificationError, match="not signed by enough trusted keys"):
        store.load(sign_envelope(canonical_json(forged), PAYLOAD_TYPE, [mallory.signer]))
    for garbled in (store.policy_path.read_bytes()[:-40], b"{}", b"\x00\xff", b'{"payload": "!!", "payloadType": "x",'
                    b' "signatures": []}'):
        with pytest.raises(VerificationError, match="truncated or garbled"):
            store.load(garbled)
    assert store.load().version == 4


def test_k_of_n_owners(tmp_path: Path) -> None:
    a, b, c = (ident(tmp_path, n) for n in ("own-a", "own-b", "own-c"))
    store = TrustStore(tmp_path / "trust")
    doc = TrustPolicy.new_document([a.key, b.key, c.key], threshold=2, roles_config=ROLES, release_config=RELEASE)
    with pytest.raises(VerificationError, match="1 of 2 needed"):
        store.init(doc, [a.signer])
    assert not store.root_path.exists() and not store.policy_path.exists()
    store.init(doc, [a.signer, c.signer])
    with pytest.raises(VerificationError, match="1 of 2 needed"):
        store.update(lambda d: None, [b.signer])
    assert store.update(lambda d: None, [b.signer, c.signer]).version == 2


def test_decisions_verify_only_from_trusted_role_holders_about_the_same_model(world) -> None:  # type: ignore[no-untyped-def]
    policy = world["store"].load()
    approval = sign_decision("approval", DIGEST, {"version": "v1", "actor": "dave"}, world["carol"].signer)
    fact = verify_decision(approval, policy, model_digest=DIGEST)
    assert (fact.kind, fact.signer) == ("approval", "carol")  # the key's name, not the predicate's claim
    with pytest.raises(VerificationError, match="moved from another version"):
        verify_decision(approval, policy, model_digest=OTHER)
    with pytest.raises(VerificationError, match="signed by bob, who does not hold the approver role"):
        verify_decision(sign_decision("approval", DIGEST, {}, world["bob"].signer), policy)
    stranger = ident(world["tmp"], "stranger")
    with pytest.raises(VerificationError, match="not signed by a key the trust policy gives"):
        verify_decision(sign_decision("approval", DIGEST, {}, stranger.signer), policy)
    # Altered after signing: the payload now names another model.
    env = json.loads(approval)
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["subject"][0]["digest"]["sha256"] = OTHER
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(VerificationError, match="altered after signing"):
        verify_decision(json.dumps(env), policy, model_digest=OTHER)
    for garbled in (approval[: len(approval) // 2], b"not json", b"[]"):
        with pytest.raises(VerificationError, match="truncated or garbled"):
            verify_decision(garbled, policy)


def test_evidence_excludes_the_trainer_under_any_alias(world) -> None:  # type: ignore[no-untyped-def]
    policy = world["store"].load()
    training = sign_decision("training", DIGEST, {"trainer": "github:bob", "data_adders": ["alice@example.com"],
                                                  "code_authors": ["carol@example.com"]}, world["pipeline"].signer)
    approval = sign_decision("approval", DIGEST, {"version": "v1"}, world["carol"].signer)
    evidence = Evidence.build([training, approval], policy, model_digest=DIGEST)
    assert evidence.approvals == ["carol"]
    assert evidence.separation_violations(policy) == ["carol may not approve a model they are among the code authors of"]
    data = evidence.policy_input(policy, version="v1")
    assert data["approvals"] == [] and data["trainer"] == "bob"


def test_envelope_threshold_counts_distinct_trusted_keys(world) -> None:  # type: ignore[no-untyped-def]
    env = sign_decision("approval", DIGEST, {}, world["carol"].signer)
    parsed = parse_envelope(env)
    assert verify_envelope(parsed, [world["carol"].key]).keyids == (world["carol"].keyid,)
    with pytest.raises(VerificationError, match="0 of 1 needed"):
        verify_envelope(parsed, [world["bob"].key])


def test_the_ledger_stores_only_what_verifies_and_names_a_moved_statement(world) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from secure_ml.custody.audit import AuditLog
    from secure_ml.governance.ledger import Ledger

    policy = world["store"].load()
    audit = AuditLog(world["tmp"] / "audit.jsonl")
    ledger = Ledger(world["tmp"] / "statements", audit)
    ledger.sign_and_record("training", DIGEST, {"trainer": "bob"}, world["pipeline"].signer, policy)
    ledger.record(sign_decision("approval", DIGEST, {"version": "v1"}, world["carol"].signer), policy,
                  model_digest=DIGEST)
    with pytest.raises(VerificationError, match="who does not hold the approver role"):
        ledger.record(sign_decision("approval", DIGEST, {}, world["bob"].signer), policy, model_digest=DIGEST)
    assert len(ledger.envelopes(DIGEST)) == 2
    evidence = ledger.evidence(DIGEST, policy)
    assert evidence.approvals == ["carol"] and evidence.products["training"]["trainer"] == "bob"
    # carol's approval copied onto another model's folder: refused, named, audited.
    (ledger.directory / OTHER).mkdir()
    for path in (ledger.directory / DIGEST).glob("*.json"):
        shutil.copy(path, ledger.directory / OTHER / path.name)
    with pytest.raises(VerificationError, match="moved from another version"):
        ledger.evidence(OTHER, policy)
    assert [e["outcome"] for e in audit.entries() if e["action"] == "decision.verify"] == ["deny", "deny"]
