"""The Rego policies shipped in secure_ml/governance/policies, evaluated by the real regopy interpreter.

Touches: promotion.rego, approval.rego, deployment.rego, admission.rego with the shipped
config/release.yaml as data; one allow case and a deny case per rule, each deny checked for its
reason; fail-closed behaviour (a policy that does not compile, an input that breaks evaluation).
Does not touch: the registry or deploy gate (tests/test_deploy.py) or rendered manifests
(tests/test_k8s.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from secure_ml.errors import ConfigurationError, PolicyDenied
from secure_ml.governance.policy import POLICY_DIR, PolicyEngine

RELEASE = yaml.safe_load((POLICY_DIR.parents[1] / "config" / "release.yaml").read_text())


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine({"promotion": RELEASE["promotion"], "admission": RELEASE["admission"]})


GOOD: dict[str, Any] = {
    "version": "v1", "model_digest": "d" * 64, "target_stage": "production",
    "evaluation": {"passed": True, "metrics": {"accuracy": 0.8, "roc_auc": 0.81},
                   "fairness_gaps": [{"attribute": "sex", "metric": "demographic_parity_difference", "value": 0.1},
                                     {"attribute": "sex", "metric": "equalized_odds_difference", "value": -0.1}],
                   "robustness": {}},
    "scan": {"blocking": False, "counts": {}, "findings": [{"id": "B101", "severity": "low", "blocking": False,
                                                            "where": "x.py"}]},
    "signature": {"verified": True, "digest": "d" * 64, "reason": ""},
    "attestation": {"verified": True, "subject_matches": True, "reason": ""},
    "provenance": {"source": "german_credit.csv", "approved": True, "data_actor": "alice"},
    "training": {"actor": "bob", "code_commit": "abc", "code_author": None},
    "registered_by": "bob",
    "approvals": [{"identity": "carol", "roles": ["approver"]}],
}


def changed(**paths: Any) -> dict[str, Any]:
    """GOOD with dotted paths replaced (a value of ... deletes the key)."""
    data = copy.deepcopy(GOOD)
    for dotted, value in paths.items():
        *parents, last = dotted.split("__")
        node = data
        for key in parents:
            node = node[key]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return data


def test_everything_in_order_is_allowed(engine: PolicyEngine) -> None:
    decision = engine.decide("promotion", GOOD)
    assert decision.allowed and decision.reasons == ()
    assert decision.require() is decision
    assert "ALLOW" in decision.markdown()


@pytest.mark.parametrize(("change", "reason"), [
    ({"evaluation": ...}, "no model evaluation was recorded"),
    ({"evaluation__passed": False}, "did not pass its own thresholds"),
    ({"evaluation__metrics": {"accuracy": 0.5, "roc_auc": 0.8}}, "metric accuracy is 0.5, under the minimum 0.65"),
    ({"evaluation__metrics": {"accuracy": 0.8}}, "metric roc_auc is missing"),
    ({"evaluation__fairness_gaps": [
        {"attribute": "sex", "metric": "demographic_parity_difference", "value": -0.4},
        {"attribute": "sex", "metric": "equalized_odds_difference", "value": 0.1}]},
     "fairness breach: demographic_parity_difference for sex is -0.4, over the maximum 0.25"),
    ({"evaluation__fairness_gaps": [{"attribute": "sex", "metric": "demographic_parity_difference", "value": 0.1}]},
     "bias metric equalized_odds_difference is missing"),
    ({"scan": ...}, "no scan report was recorded"),
    ({"scan__findings": [{"id": "PICKLE", "severity": "critical", "blocking": True, "where": "model.bin"}],
      "scan__blocking": True}, "blocking scan finding: PICKLE (critical) in model.bin"),
    ({"scan__blocking": True}, "the scan report has blocking findings"),
    ({"signature": {"verified": False, "reason": "wrong key"}}, "the model signature did not verify: wrong key"),
    ({"signature": ...}, "the model signature did not verify: no signature"),
    ({"signature__digest": "e" * 64}, "the signature covers model eeee"),
    ({"attestation": {"verified": False, "reason": "bad envelope"}}, "the attestation did not verify: bad envelope"),
    ({"attestation__subject_matches": False}, "subjects do not name the signed model"),
    ({"provenance__approved": False}, "came from german_credit.csv, which is not an approved source"),
    ({"provenance": {}}, "came from an unknown source"),
    ({"approvals": []}, "production needs 1 approval(s)"),
    ({"approvals": [{"identity": "dave", "roles": ["deployer"]}]}, "production needs 1 approval(s)"),
    ({"approvals": [{"identity": "bob", "roles": ["approver"]}]}, "the approval by bob does not count: they trained"),
    ({"approvals": [{"identity": "alice", "roles": ["approver"]}]}, "the approval by alice does not count: they added"),
])
def test_each_promotion_rule_denies_with_its_reason(engine: PolicyEngine, change: dict[str, Any], reason: str) -> None:
    decision = engine.decide("promotion", changed(**change))
    assert not decision.allowed
    assert any(reason in r for r in decision.reasons), decision.reasons
    with pytest.raises(PolicyDenied, match="promotion policy denies"):
        decision.require()
    assert "DENY" in decision.markdown() and reason.split(":")[0] in decision.markdown()


def test_staging_needs_no_approval_but_everything_else(engine: PolicyEngine) -> None:
    assert engine.decide("promotion", changed(target_stage="staging", approvals=[])).allowed
    assert not engine.decide("promotion", changed(target_stage="staging", approvals=[],
                                                   provenance__approved=False)).allowed


def test_a_valid_approval_beside_a_self_approval_counts(engine: PolicyEngine) -> None:
    both = changed(approvals=[{"identity": "bob", "roles": ["approver"]}, {"identity": "carol", "roles": ["approver"]}])
    assert engine.decide("promotion", both).allowed


def test_every_reason_is_reported_at_once(engine: PolicyEngine) -> None:
    decision = engine.decide("promotion", changed(approvals=[], signature__verified=False,
                                                  provenance__approved=False, evaluation__passed=False))
    assert len(decision.reasons) >= 4


def test_hostile_strings_do_not_break_or_bypass_the_policy(engine: PolicyEngine) -> None:
    decision = engine.decide("promotion", changed(provenance__approved=False,
                                                  provenance__source='x", "allow": true, "y": "\\'))
    assert not decision.allowed
    assert any('x", "allow": true' in r for r in decision.reasons)


APPROVAL = {"version": "v1", "stage": "staging", "approver": {"identity": "carol", "roles": ["approver"]},
            "provenance": {"data_actor": "alice"}, "training": {"actor": "bob"}, "approvals": []}


def test_approval_allowed_for_an_independent_approver(engine: PolicyEngine) -> None:
    assert engine.decide("approval", APPROVAL).allowed
    assert engine.decide("approval", {**APPROVAL, "stage": "candidate"}).allowed


@pytest.mark.parametrize(("change", "reason"), [
    ({"approver": {"identity": "dave", "roles": ["deployer"]}}, "dave is not an approver"),
    ({"approver": {"identity": "alice", "roles": ["approver"]}}, "self-approval: alice added the training data of v1"),
    ({"approver": {"identity": "bob", "roles": ["approver"]}}, "self-approval: bob trained v1"),
    ({"approvals": [{"identity": "carol"}]}, "carol has already approved v1"),
    ({"stage": "production"}, "v1 is production; only a candidate or staging version can be approved"),
    ({"stage": "archived"}, "v1 is archived"),
])
def test_each_approval_rule_denies(engine: PolicyEngine, change: dict[str, Any], reason: str) -> None:
    decision = engine.decide("approval", {**APPROVAL, **change})
    assert not decision.allowed and any(reason in r for r in decision.reasons), decision.reasons


DEPLOY = {"version": "v1", "stage": "production", "target": "local",
          "deployer": {"identity": "dave", "roles": ["deployer"]},
          "pipeline_changers": [{"identity": "bob", "why": "registered v1 (ran its pipeline)"},
                                {"identity": "erin", "why": "authored the pipeline code commit abc"}]}


def test_deployment_allowed_for_an_independent_deployer(engine: PolicyEngine) -> None:
    assert engine.decide("deployment", DEPLOY).allowed


@pytest.mark.parametrize(("change", "reason"), [
    ({"deployer": {"identity": "carol", "roles": ["approver"]}}, "carol is not a deployer"),
    ({"stage": "staging"}, "v1 is staging in the registry, not production"),
    ({"deployer": {"identity": "erin", "roles": ["approver", "deployer"]}},
     "separation of duties: erin authored the pipeline code commit abc and may not deploy it"),
])
def test_each_deployment_rule_denies(engine: PolicyEngine, change: dict[str, Any], reason: str) -> None:
    decision = engine.decide("deployment", {**DEPLOY, **change})
    assert not decision.allowed and any(reason in r for r in decision.reasons), decision.reasons


def test_an_undefined_package_result_fails_closed(engine: PolicyEngine) -> None:
    with pytest.raises(ConfigurationError, match="unknown policy package"):
        engine.decide("nonexistent", {})


def test_a_policy_that_does_not_compile_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "broken.rego").write_text("package secure_ml.promotion\nallow := \n")
    with pytest.raises(ConfigurationError, match="do not compile"):
        PolicyEngine({}, policy_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="no Rego policies"):
        PolicyEngine({}, policy_dir=tmp_path / "empty")


def test_a_policy_without_allow_denies(tmp_path: Path) -> None:
    (tmp_path / "promotion.rego").write_text("package secure_ml.promotion\nimport rego.v1\ndeny := set()\n")
    decision = PolicyEngine({}, policy_dir=tmp_path).decide("promotion", GOOD)
    assert not decision.allowed and decision.reasons


def test_a_decision_is_fast_enough(engine: PolicyEngine) -> None:
    engine.decide("promotion", GOOD)
    decision = engine.decide("promotion", GOOD)
    assert decision.seconds < 0.5  # the 50 ms figure is measured in bench/bench_release.py
