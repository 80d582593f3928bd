"""Roles and clearances (secure_ml/governance/access.py) and their audit trail.

Touches: the shipped config/roles.yaml through Settings, AccessPolicy built from mappings, and a
real hash-chained AuditLog. Does not touch Dagster: test_data_stage.py proves the decisions are
made before a drop is read and before a dataset is decrypted for a reader.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_ml.custody.audit import AuditLog
from secure_ml.errors import ConfigurationError, PolicyDenied
from secure_ml.governance.access import AccessPolicy
from secure_ml.settings import Settings


@pytest.fixture
def policy(settings: Settings) -> AccessPolicy:
    return AccessPolicy.from_settings(settings)


@pytest.mark.parametrize("identity, permission, classification, allowed, reason", [
    ("alice", "data.add", "restricted", True, "alice may data.add (restricted) as data_steward"),
    ("bob", "data.read", "confidential", True, "bob may data.read (confidential) as ml_engineer"),
    ("bob", "data.read", "restricted", False, "bob is cleared for confidential data, not restricted"),
    ("bob", "data.add", "public", False, "bob (ml_engineer) may not data.add"),
    ("carol", "data.read", "internal", True, "carol may data.read (internal) as approver"),
    ("carol", "data.read", "confidential", False, "carol is cleared for internal data, not confidential"),
    ("dave", "data.read", None, False, "dave (deployer) may not data.read"),
    ("erin", "model.deploy", None, True, "erin may model.deploy as deployer"),
    ("someone-new", "data.add", "confidential", True, "someone-new may data.add (confidential) as data_steward"),
])
def test_decisions_follow_roles_and_clearances(policy: AccessPolicy, identity: str, permission: str,
                                               classification: str | None, allowed: bool, reason: str) -> None:
    decision = policy.decide(identity, permission, classification=classification)
    assert (decision.allowed, decision.reason) == (allowed, reason)


def test_unlisted_identities_get_no_roles_when_defaults_are_empty() -> None:
    policy = AccessPolicy({"roles": {"steward": {"may": ["data.add"], "clearance": "restricted"}},
                           "identities": {"alice": ["steward"]}, "default_roles": []})
    assert policy.decide("mallory", "data.add").reason == "mallory (no roles) may not data.add"
    assert not policy.is_listed("mallory") and policy.is_listed("alice")


def test_require_audits_every_allow_and_deny(policy: AccessPolicy, tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    policy.require("bob", "data.read", classification="confidential", audit=log, subject="sha256:aa")
    with pytest.raises(PolicyDenied) as caught:
        policy.require("carol", "data.read", classification="confidential", audit=log, subject="sha256:aa")
    assert caught.value.explain() == "denied: carol is cleared for internal data, not confidential"
    assert caught.value.exit_code == 1
    allow, deny = list(log.entries())
    assert (allow["action"], allow["outcome"], allow["actor"]) == ("access.allow", "allow", "bob")
    assert (deny["action"], deny["outcome"], deny["actor"]) == ("access.deny", "deny", "carol")
    assert deny["details"] == {"permission": "data.read", "classification": "confidential",
                               "roles": ["approver"], "reason": "carol is cleared for internal data, not confidential"}
    assert log.verify().entries == 2


def test_a_single_role_may_be_written_without_brackets() -> None:
    policy = AccessPolicy({"roles": {"data_steward": {"may": ["data.add"], "clearance": "internal"}},
                           "identities": {"alice": "data_steward"}, "default_roles": "data_steward"})
    assert policy.roles_of("alice") == ("data_steward",) and policy.roles_of("anyone") == ("data_steward",)


def test_an_unknown_classification_is_a_configuration_error(policy: AccessPolicy) -> None:
    with pytest.raises(ConfigurationError, match="unknown data classification 'secret'"):
        policy.decide("alice", "data.read", classification="secret")


@pytest.mark.parametrize("config, message", [
    ({"roles": {"r": {"may": ["x"], "clearance": "top-secret"}}}, "unknown clearance 'top-secret'"),
    ({"roles": {}, "identities": {"alice": ["ghost"]}}, "names unknown roles: ghost"),
    ({"roles": {}, "default_roles": ["ghost"]}, "names unknown roles: ghost"),
    ({"roles": ["not", "a", "mapping"]}, "roles configuration is malformed"),
])
def test_malformed_roles_are_refused(config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        AccessPolicy(config)
