"""Who a pipeline run acts as, once a trust policy exists: the signer of its run request, never a name.

Touches: `secure-ml pipeline run --select dataset` in-process on a real home and Dagster instance,
real identity keys, the signed trust policy, the dataset asset's access check and its recorded
provenance. Does not touch: training (the same actor resolution serves every asset).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secure_ml.cli import main
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # runs the pipeline as identities


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ids(settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "identities"
    for name in ("owner", "bob", "mallory"):
        assert run(capsys, "identity", "new", name, "--out", str(root / name))[0] == 0
    owner = str(root / "owner" / "owner.key")
    assert run(capsys, "trust", "init", "--owner-key", owner)[0] == 0
    assert run(capsys, "trust", "add", "bob", "--role", "data_steward", "--role", "ml_engineer", "--public-key",
               str(root / "bob" / "bob.pub"), "--owner-key", owner)[0] == 0
    return root


def test_bob_lands_data_with_his_key_and_a_claimed_name_grants_nothing(
        ids: Path, settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECURE_ML_ACTOR", "alice")  # a claim: ignored once the trust policy exists
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_ACTOR", "bob")
    code, out, err = run(capsys, "pipeline", "run", "--select", "dataset", "--json")
    assert code == 1
    denied = [e for e in settings.audit_log().entries() if e["action"] == "access.deny"]
    assert denied and denied[-1]["actor"] == "unauthenticated"
    assert "unauthenticated (no roles) may not data.add" in denied[-1]["details"]["reason"]

    monkeypatch.setenv("SECURE_ML_IDENTITY", str(ids / "bob" / "bob.key"))
    code, out, err = run(capsys, "pipeline", "run", "--select", "dataset", "--json")
    assert code == 0, err
    allowed = [e for e in settings.audit_log().entries() if e["action"] == "access.allow"]
    assert allowed[-1]["actor"] == "bob" and allowed[-1]["details"]["permission"] == "data.add"

    monkeypatch.setenv("SECURE_ML_IDENTITY", str(ids / "mallory" / "mallory.key"))
    code, out, err = run(capsys, "pipeline", "run", "--select", "dataset", "--json")
    assert code == 1 and "belongs to nobody in the trust policy" in err


def test_unauthenticated_runs_train_only_if_the_policy_says_so(settings: Settings, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "identity", "new", "owner", "--out", str(tmp_path / "o"))[0] == 0
    assert run(capsys, "trust", "init", "--owner-key", str(tmp_path / "o" / "owner.key"),
               "--unauthenticated-may-train")[0] == 0
    code, out, err = run(capsys, "pipeline", "run", "--select", "dataset", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["success"] is True
    allowed = [e for e in settings.audit_log().entries() if e["action"] == "access.allow"]
    assert allowed[-1]["actor"] == "unauthenticated"


def test_a_ci_run_acts_as_its_verified_oidc_identity_and_nothing_else(
        settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from test_oidc import Issuer

    from secure_ml.errors import VerificationError
    from secure_ml.governance import authn

    issuer = Issuer()
    try:
        subject = "repo:org/secure-ml:ref:refs/heads/main"
        owner = tmp_path / "o" / "owner.key"
        assert run(capsys, "identity", "new", "owner", "--out", str(owner.parent))[0] == 0
        assert run(capsys, "trust", "init", "--owner-key", str(owner))[0] == 0  # no roles without an identity
        assert run(capsys, "trust", "add", "ci", "--role", "data_steward", "--role", "ml_engineer",
                   "--oidc-issuer", issuer.url, "--oidc-subject", subject, "--owner-key", str(owner))[0] == 0
        monkeypatch.setenv("SECURE_ML_OIDC_ISSUER", issuer.url)
        monkeypatch.setenv("SECURE_ML_OIDC_TOKEN", issuer.token(exp=int(__import__("time").time()) - 3600))
        code, _, err = run(capsys, "pipeline", "run", "--select", "dataset", "--json")
        assert code == 1 and len(err.strip().splitlines()) == 1 and "the OIDC token has expired" in err, err
        token = issuer.token()
        monkeypatch.setenv("SECURE_ML_OIDC_TOKEN", token)
        code, out, err = run(capsys, "pipeline", "run", "--select", "dataset", "--json")
        assert code == 0, err
        allowed = [e for e in settings.audit_log().entries() if e["action"] == "access.allow"]
        assert allowed[-1]["actor"] == "ci" and allowed[-1]["details"]["permission"] == "data.add"
        runs = __import__("dagster").DagsterInstance.get().get_runs(limit=1)
        tag = json.loads(runs[0].tags[authn.RUN_OIDC_TAG])
        assert tag["actor"] == "ci" and tag["subject"] == subject and token not in json.dumps(runs[0].tags)
        # The tag alone proves nothing: a process without that token is refused (audited).
        monkeypatch.setenv("SECURE_ML_OIDC_TOKEN", issuer.token(sub="repo:org/secure-ml:ref:refs/heads/evil"))
        with pytest.raises(VerificationError, match="the run claims the OIDC identity ci"):
            authn.run_actor(Settings.from_env(), runs[0].tags)
        assert [e for e in settings.audit_log().entries() if e["action"] == "identity.deny"]
    finally:
        issuer.server.shutdown()
