"""Signed checkpoints of the audit log's head (secure_ml.custody.anchor) and `secure-ml audit verify`.

Touches: a real audit log on disk, real Ed25519/ECDSA signatures (securesystemslib), a real Dagster
instance on disk that records a checkpoint with every sealed output (resources.custody), and the
CLI's `audit verify`/`audit checkpoint` in-process (its exit codes and one-line messages). Each
attack is made as the log's writer would make it: cutting the tail and rewriting the head beside it,
replacing the whole audit folder with a recomputed chain, deleting it.
Does not touch: PostgreSQL (tests/test_storage_postgres.py covers that storage itself).
"""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from securesystemslib.signer import CryptoSigner

from resources.custody import CustodyResource
from secure_ml.cli import main
from secure_ml.custody import anchor
from secure_ml.custody.audit import AuditLog
from secure_ml.errors import BadInput, VerificationError
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # runs Dagster to anchor the audit log


def write(path: Path, n: int, actor: str = "alice") -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.record(actor, f"action.{i}", details={"i": i})
    return log


def test_cut_tail_with_a_lagging_head_is_named(tmp_path: Path) -> None:
    signer = CryptoSigner.generate_ed25519()
    log = write(tmp_path / "audit.jsonl", 8)
    cp = anchor.verify_checkpoint(anchor.checkpoint(log, signer), [signer.public_key])
    assert (cp.seq, cp.length) == (8, log.path.stat().st_size)
    # The writer cuts two entries and writes a head that agrees: the log alone says OK.
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:6]))
    sixth = json.loads(lines[5])
    log.head_path.write_bytes(f"6 {sixth['hash']} {len(b''.join(lines[:6]))}".encode().ljust(128))
    assert AuditLog(log.path).verify().entries == 6
    with pytest.raises(VerificationError, match="records entry 8 .*its tail was cut"):
        AuditLog(log.path).verify(checkpoint=cp)


def test_a_recomputed_chain_or_replaced_file_is_named(tmp_path: Path) -> None:
    signer = CryptoSigner.generate_ed25519()
    log = write(tmp_path / "audit" / "audit.jsonl", 5)
    cp = anchor.verify_checkpoint(anchor.checkpoint(log, signer), [signer.public_key])
    expect = cp.hash
    forged_dir = tmp_path / "forged"
    write(forged_dir / "audit.jsonl", 7, actor="mallory")
    shutil.rmtree(log.path.parent)
    shutil.copytree(forged_dir, log.path.parent)
    fresh = AuditLog(log.path)
    assert fresh.verify().entries == 7  # internally consistent
    with pytest.raises(VerificationError, match="first 5 entries are not the ones signed .* chain recomputed"):
        fresh.verify(checkpoint=cp)
    with pytest.raises(VerificationError, match="not an entry of this log"):
        fresh.verify(expect=expect)
    shutil.rmtree(log.path.parent)
    with pytest.raises(VerificationError, match="is gone, but the signed checkpoint .* records 5 entries"):
        fresh.verify(checkpoint=cp)


def test_an_edit_inside_the_checkpointed_part_names_the_entry(tmp_path: Path) -> None:
    signer = CryptoSigner.generate_ed25519()
    log = write(tmp_path / "audit.jsonl", 5)
    cp = anchor.verify_checkpoint(anchor.checkpoint(log, signer), [signer.public_key])
    log.record("alice", "after")
    data = log.path.read_bytes().replace(b'"action.2"', b'"action.X"')
    log.path.write_bytes(data)
    with pytest.raises(VerificationError, match="entry 3 .* was modified .* no longer matches its signed checkpoint"):
        AuditLog(log.path).verify(checkpoint=cp)


def test_checkpoints_are_incremental_and_only_trusted_keys_count(tmp_path: Path) -> None:
    signer, other = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    log = write(tmp_path / "audit.jsonl", 3)
    first = anchor.verify_checkpoint(anchor.checkpoint(log, signer), [signer.public_key])
    log.record("bob", "more")
    second = anchor.verify_checkpoint(anchor.checkpoint(log, signer, previous=first), [signer.public_key])
    assert second.seq == 4 and anchor.newest([first, second]) == second
    assert log.verify(checkpoint=second, expect=first.hash).entries == 4
    with pytest.raises(VerificationError, match="not signed by enough trusted keys"):
        anchor.verify_checkpoint(anchor.checkpoint(log, other), [signer.public_key])
    with pytest.raises(VerificationError, match="truncated or garbled"):
        anchor.verify_checkpoint(b'{"payload":', [signer.public_key])
    with pytest.raises(BadInput, match="64 hex"):
        log.verify(expect="abc")


@dg.asset
def anchored_thing(context, custody: CustodyResource):  # type: ignore[no-untyped-def]
    return custody.output(context, {"hello": "world"})


def test_each_run_records_a_checkpoint_in_the_dagster_event_log(settings: Settings, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from secure_ml.security.signing import ensure_signing_key

    ensure_signing_key(settings.home / "keys" / "model-signing.pem")
    with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        result = dg.materialize([anchored_thing], instance=instance,
                                resources={"custody": CustodyResource(home=str(settings.home))})
    assert result.success
    assert main(["audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert "verified against checkpoint of" in out
    # The writer replaces the whole audit folder with a recomputed, internally consistent chain.
    audit_dir = settings.audit_path.parent
    shutil.rmtree(audit_dir)
    write(tmp_path / "forged" / "audit.jsonl", 40, actor="mallory")
    shutil.copytree(tmp_path / "forged", audit_dir)
    assert main(["audit", "verify"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chain recomputed" in err[0]
