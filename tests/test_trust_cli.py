"""`secure-ml identity` and `secure-ml trust`: exit codes, one-line errors, audit entries.

Touches: the CLI in-process (secure_ml.cli.main) on a real home, real key files with real
permissions, the trust store's files edited as an insider with write access to the home would.
Does not touch: the release gates.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from secure_ml.cli import main
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # runs the CLI in subprocesses


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ids(settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "identities"
    for name in ("owner", "bob", "carol", "dave"):
        assert run(capsys, "identity", "new", name, "--out", str(root / name))[0] == 0
    assert run(capsys, "trust", "init", "--owner-key", str(root / "owner" / "owner.key"))[0] == 0
    return root


def test_owner_adds_people_and_keys_decide_who_is_who(ids: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    owner = str(ids / "owner" / "owner.key")
    code, out, _ = run(capsys, "trust", "add", "carol", "--role", "approver", "--public-key",
                       str(ids / "carol" / "carol.pub"), "--alias", "github:carol", "--owner-key", owner)
    assert code == 0 and "v2: carol has roles approver" in out
    monkeypatch.setenv("SECURE_ML_IDENTITY", str(ids / "carol" / "carol.key"))
    monkeypatch.setenv("SECURE_ML_ACTOR", "dave")
    code, out, _ = run(capsys, "identity", "whoami")
    assert code == 0 and out.startswith("carol (key ") and "approver" in out
    monkeypatch.setenv("SECURE_ML_IDENTITY", str(ids / "dave" / "dave.key"))
    code, _, err = run(capsys, "identity", "whoami")
    assert code == 1 and "belongs to nobody in the trust policy" in err and len(err.splitlines()) == 1
    code, out, _ = run(capsys, "trust", "verify")
    assert code == 0 and "trust policy OK" in out


def test_bad_input_and_forgeries(ids: Path, settings: Settings, capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    owner = ids / "owner" / "owner.key"
    carol_pub = str(ids / "carol" / "carol.pub")
    # Not an owner: refused, nothing changed.
    before = (settings.home / "trust" / "policy.json").read_bytes()
    code, _, err = run(capsys, "trust", "add", "carol", "--role", "approver", "--public-key", carol_pub,
                       "--owner-key", str(ids / "bob" / "bob.key"))
    assert code == 1 and "not signed by enough trusted keys" in err
    assert (settings.home / "trust" / "policy.json").read_bytes() == before
    # A key with loose permissions.
    os.chmod(owner, 0o640)
    code, _, err = run(capsys, "trust", "add", "carol", "--role", "approver", "--public-key", carol_pub,
                       "--owner-key", str(owner))
    assert code == 2 and "loose permissions 0640" in err
    os.chmod(owner, 0o600)
    # Unknown role, missing arguments, a private key where a public one belongs.
    assert run(capsys, "trust", "add", "carol", "--role", "wizard", "--public-key", carol_pub,
               "--owner-key", str(owner))[0] == 2
    assert run(capsys, "trust", "add", "carol", "--owner-key", str(owner))[0] == 2
    assert run(capsys, "trust", "add", "carol", "--public-key", str(ids / "carol" / "carol.key"),
               "--owner-key", str(owner))[0] == 2
    with pytest.raises(SystemExit) as usage:
        main(["trust", "add"])
    assert usage.value.code == 2
    assert run(capsys, "identity", "new", "x", "--out", str(settings.home / "ids"))[0] == 2
    # Rollback: an older signed version put back in place.
    assert run(capsys, "trust", "add", "carol", "--role", "approver", "--public-key", carol_pub,
               "--owner-key", str(owner))[0] == 0
    shutil.copyfile(settings.home / "trust" / "history" / "1.policy.json", settings.home / "trust" / "policy.json")
    code, _, err = run(capsys, "trust", "verify")
    assert code == 1 and "older than version 2 already seen: a rollback is refused" in err
    # Garbled.
    (settings.home / "trust" / "policy.json").write_bytes(before[:50])
    code, _, err = run(capsys, "trust", "show")
    assert code == 1 and "truncated or garbled" in err
    denials = [e for e in settings.audit_log().entries() if e["action"] == "trust.verify"]
    assert [e["outcome"] for e in denials] == ["deny", "deny"]


def test_a_config_dir_that_changes_the_gates_is_refused(ids: Path, settings: Settings, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    shutil.copytree(settings.config_dir, config)
    # A lower bar that the typed configuration accepts: only the signed policy may set it.
    text = (config / "release.yaml").read_text().replace("accuracy: 0.65", "accuracy: 0.10")
    assert "accuracy: 0.10" in text
    (config / "release.yaml").write_text(text)
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config))
    code, _, err = run(capsys, "trust", "verify")
    assert code == 1 and "changes what the gates decide (promotion.min_metrics)" in err
