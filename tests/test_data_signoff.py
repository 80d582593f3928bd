"""A data steward's sign-off of an unguarded first drop, as a signed decision (issue 13 on issue 20's sign-off).

Touches: real identity keys and the signed trust policy (tests/_identities.py), the ledger of signed
statements on disk, DSSE/in-toto envelopes forged with a stranger's key, moved to another drop and
truncated, the audit log, and `secure-ml data sign-off` in-process for exit codes and its one line.
Does not touch: the Dagster run of validated_dataset (tests/test_validated_dataset.py runs the
audited, pre-trust sign-off there; the asset calls the same find_signed_sign_off once a trust
policy exists).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from _identities import trust_people

from secure_ml.cli import main
from secure_ml.data.poisoning_reference import find_signed_sign_off, sign_off, signed_sign_off
from secure_ml.errors import PolicyDenied
from secure_ml.governance import authn
from secure_ml.governance.access import AccessPolicy
from secure_ml.governance.decisions import sign_decision
from secure_ml.governance.identity import load_identity, new_identity
from secure_ml.governance.ledger import Ledger
from secure_ml.settings import Settings

DROP, OTHER = "a" * 64, "b" * 64


@pytest.fixture
def people(settings: Settings, tmp_path: Path) -> dict[str, Path]:
    return trust_people(settings, tmp_path / "ids")


def actor(settings: Settings, key: Path | None) -> authn.Actor:
    return authn.authenticate(settings, authn.verified_policy(settings), identity_file=key)


def audited(settings: Settings, action: str) -> list[dict[str, Any]]:
    return [e for e in settings.audit_log().entries() if e["action"] == action]


def test_the_steward_signs_the_drop_off_and_only_that_drop_counts(settings: Settings,
                                                                  people: dict[str, Path]) -> None:
    record = signed_sign_off(settings, actor(settings, people["alice"]), dataset="loans", drop_sha256=DROP,
                             reason="first export, checked against the source system")
    assert record["actor"] == "alice" and record["signed"] is True
    found = find_signed_sign_off(settings, dataset="loans", drop_sha256=f"sha256:{DROP}")
    assert found.valid and found.record["actor"] == "alice"  # type: ignore[index]
    envelope = json.loads(next((settings.home / "statements" / DROP).glob("*.json")).read_bytes())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["subject"] == [{"name": "drop", "digest": {"sha256": DROP}}]
    assert statement["predicateType"].endswith("/data_signoff/v1") and statement["predicate"]["dataset"] == "loans"
    assert audited(settings, "decision.data_signoff")[-1]["actor"] == "alice"
    # For that dataset and drop only.
    assert not find_signed_sign_off(settings, dataset="credit", drop_sha256=DROP).valid
    assert "no data steward has signed" in find_signed_sign_off(settings, dataset="loans", drop_sha256=OTHER).why


def test_no_key_the_wrong_role_or_an_old_style_record_signs_nothing_off(
        settings: Settings, people: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PolicyDenied, match="a data sign-off is a signed decision"):
        signed_sign_off(settings, actor(settings, None), dataset="loans", drop_sha256=DROP, reason="trust me")
    with pytest.raises(PolicyDenied, match="data.sign_off"):
        signed_sign_off(settings, actor(settings, people["bob"]), dataset="loans", drop_sha256=DROP, reason="x")
    assert not (settings.home / "statements").exists()
    assert audited(settings, "access.deny")[-1]["actor"] == "bob"
    # The pre-trust record (an audit entry and a file) no longer counts once decisions are signed.
    sign_off(settings.home, dataset="loans", drop_sha256=DROP, actor="alice",
             policy=AccessPolicy.from_settings(settings), audit=settings.audit_log(), reason="old style")
    assert not find_signed_sign_off(settings, dataset="loans", drop_sha256=DROP).valid
    # The CLI: a claimed name is one line and exit 1; the steward's key signs.
    monkeypatch.setenv("SECURE_ML_ACTOR", "alice")
    assert main(["data", "sign-off", "loans", "--drop", DROP, "--reason", "checked"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SECURE_ML_IDENTITY" in err[0], err
    assert main(["data", "sign-off", "loans", "--drop", DROP, "--reason", "checked",
                 "--identity", str(people["alice"])]) == 0
    assert find_signed_sign_off(settings, dataset="loans", drop_sha256=DROP).valid


def test_forged_moved_and_garbled_sign_offs_are_named_and_audited(settings: Settings, people: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    signed_sign_off(settings, actor(settings, people["alice"]), dataset="loans", drop_sha256=DROP, reason="ok")
    ledger = Ledger.from_settings(settings)
    # Moved: alice's statement about DROP copied under another drop.
    (ledger.directory / OTHER).mkdir()
    original = next((ledger.directory / DROP).glob("*.json"))
    shutil.copy(original, ledger.directory / OTHER / original.name)
    found = find_signed_sign_off(settings, dataset="loans", drop_sha256=OTHER)
    assert not found.valid and "moved from another" in found.why
    (ledger.directory / OTHER / original.name).unlink()
    # Forged: a stranger's key, and a key that is in the policy without the data steward role.
    stranger = load_identity(new_identity("stranger", tmp_path / "stranger")[0])
    forged = sign_decision("data_signoff", OTHER, {"dataset": "loans", "reason": "x"}, stranger.signer)
    (ledger.directory / OTHER / "forged.json").write_bytes(forged)
    found = find_signed_sign_off(settings, dataset="loans", drop_sha256=OTHER)
    assert not found.valid and "gives the data_steward role" in found.why
    bob = load_identity(people["bob"])
    (ledger.directory / OTHER / "forged.json").write_bytes(
        sign_decision("data_signoff", OTHER, {"dataset": "loans", "reason": "x"}, bob.signer))
    found = find_signed_sign_off(settings, dataset="loans", drop_sha256=OTHER)
    assert not found.valid and "signed by bob, who does not hold the data_steward role" in found.why
    # Garbled: a truncated envelope.
    (ledger.directory / OTHER / "forged.json").write_bytes(forged[: len(forged) // 2])
    found = find_signed_sign_off(settings, dataset="loans", drop_sha256=OTHER)
    assert not found.valid and "truncated or garbled" in found.why
    denials = [e for e in audited(settings, "decision.verify") if e["outcome"] == "deny"]
    assert len(denials) == 4 and {e["actor"] for e in denials} == {"validation"}
    assert len(found.why.splitlines()) == 1
