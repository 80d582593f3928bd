"""The hash-chained audit log (secure_ml.audit) and `secure-ml audit verify`.

Touches: AuditLog on a real file with real flock; real processes appending at once (fork, so a
log object opened before the fork is shared too); the installed `secure-ml` CLI in a subprocess
for the exit codes and one-line messages. Each kind of tampering (edit, deletion, reordering,
truncation in the middle, at the end, mid-entry, everything, the head) is made on the file
itself, as an attacker with write access to the log would.
Does not touch: shipping the head hash off the machine (the documented limit: whoever can
rewrite both the log and its head can forge a history).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from secure_ml.custody.audit import GENESIS, AuditLog, entry_hash
from secure_ml.errors import BadInput, VerificationError

CLI = str(Path(sys.executable).parent / "secure-ml")


def secure_ml(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SECURE_ML_HOME": str(home), "SECURE_ML_ACTOR": "auditor"}
    env.pop("SECURE_ML_KEK", None)
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=60)


def write_log(path: Path, n: int = 6) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.record("alice", f"action.{i}", subject=f"sha256:{i:064x}", details={"i": i})
    return log


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_entries_chain_and_verify(tmp_path: Path) -> None:
    log = write_log(tmp_path / "audit.jsonl")
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    assert all(e["hash"] == entry_hash(e) for e in entries)
    assert {"seq", "time", "actor", "action", "subject", "outcome", "details", "prev", "hash"} <= set(entries[0])
    report = log.verify()
    assert report.entries == 6 and report.last_hash == entries[-1]["hash"]
    assert oct(os.stat(log.path).st_mode & 0o777) == "0o600"


def test_secret_looking_fields_are_redacted_and_odd_values_recorded(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    entry = log.record("alice", "keys.init", details={
        "key_material": "c2VjcmV0", "nested": {"api_key": "k", "password": "p", "ok": 1},
        "tokens": ["t"], "where": tmp_path,
    })
    assert entry["details"]["key_material"] == "[redacted]"
    assert entry["details"]["nested"] == {"api_key": "[redacted]", "password": "[redacted]", "ok": 1}
    assert entry["details"]["tokens"] == "[redacted]"
    text = log.path.read_text()
    assert "c2VjcmV0" not in text and str(tmp_path) in text
    log.verify()


def test_an_entry_needs_actor_and_action(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(BadInput):
        log.record("", "x")
    with pytest.raises(BadInput):
        log.record("alice", "")
    assert not log.path.exists() or log.path.read_bytes() == b""


def _edit_field(raw: bytes, **changes: object) -> bytes:
    entry = json.loads(raw)
    entry.update(changes)
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _rehash(raw: bytes, **changes: object) -> bytes:
    entry = json.loads(raw)
    entry.update(changes)
    entry["hash"] = entry_hash(entry)
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _tamper(kind: str, rows: list[bytes]) -> list[bytes]:
    if kind == "edit":                       # change the actor of entry 3
        rows[2] = _edit_field(rows[2], actor="mallory")
    elif kind == "edit-rehashed":            # and recompute its hash: entry 4 no longer chains
        rows[2] = _rehash(rows[2], actor="mallory")
    elif kind == "delete-middle":
        del rows[2]
    elif kind == "delete-range":             # truncation of the middle
        del rows[1:4]
    elif kind == "reorder":
        rows[2], rows[3] = rows[3], rows[2]
    elif kind == "duplicate":
        rows.insert(3, rows[2])
    elif kind == "truncate-end":
        del rows[-2:]
    elif kind == "truncate-mid-entry":
        rows[-1] = rows[-1][: len(rows[-1]) // 2]
    elif kind == "truncate-all":
        rows.clear()
    elif kind == "rewrite-last":             # replace the last entry with a validly chained forgery
        rows[-1] = _rehash(rows[-1], outcome="pass")
    elif kind == "garbage-line":
        rows.insert(2, b"not json\n")
    return rows


EXPECTED = {
    "edit": ("entry 3 (line 3)", "modified after it was written"),
    "edit-rehashed": ("entry 4 (line 4)", "does not chain"),
    "delete-middle": ("entry 3 (line 3)", "expected 3"),
    "delete-range": ("entry 2 (line 2)", "expected 2"),
    "reorder": ("entry 3 (line 3)", "expected 3"),
    "duplicate": ("entry 4 (line 4)", "expected 4"),
    "truncate-end": ("ends at entry 4", "removed from the end"),
    "truncate-mid-entry": ("entry 6 (line 6)", "truncated mid-entry"),
    "truncate-all": ("empty", "every entry was removed"),
    "rewrite-last": ("entry 6", "end was rewritten"),
    "garbage-line": ("entry 3 (line 3)", "not valid JSON"),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_tampering_is_detected_and_the_first_bad_entry_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    path.write_bytes(b"".join(_tamper(kind, lines(path))))
    with pytest.raises(VerificationError) as caught:
        AuditLog(path).verify()
    message = caught.value.explain()
    assert "\n" not in message
    for part in EXPECTED[kind]:
        assert part in message, message


def test_a_missing_or_edited_head_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = write_log(path)
    head = log.head_path.read_bytes()
    log.head_path.unlink()
    with pytest.raises(VerificationError, match="head .* is missing"):
        AuditLog(path).verify()
    log.head_path.write_bytes(b"six entries, trust me")
    with pytest.raises(VerificationError, match="malformed"):
        AuditLog(path).verify()
    log.head_path.write_bytes(head)
    AuditLog(path).verify()


def test_a_writer_that_died_between_log_and_head_is_recovered(tmp_path: Path) -> None:
    """The head lags the log by one entry (crash between the two writes): appends continue the
    chain from the log's last line and verify passes."""
    path = tmp_path / "audit.jsonl"
    log = write_log(path, 3)
    stale_head = log.head_path.read_bytes()
    log.record("alice", "action.3")
    log.head_path.write_bytes(stale_head)
    AuditLog(path).verify()
    AuditLog(path).record("bob", "action.4")
    assert AuditLog(path).verify().entries == 5


@pytest.mark.slow
def test_audit_verify_cli(home: Path) -> None:
    ok = secure_ml(home, "audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("audit log OK: 1 entries")
    log = AuditLog(home / "audit" / "audit.jsonl")
    for i in range(4):
        log.record("alice", f"action.{i}")
    tail = secure_ml(home, "audit", "tail", "-n", "2", "--json")
    assert [json.loads(x)["action"] for x in tail.stdout.splitlines()] == ["action.2", "action.3"]
    rows = lines(log.path)
    rows[1], rows[2] = rows[2], rows[1]
    log.path.write_bytes(b"".join(rows))
    bad = secure_ml(home, "audit", "verify")
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("secure-ml: verification failed: audit log entry 2 (line 2)")


def test_audit_verify_cli_on_a_missing_log(tmp_path: Path) -> None:
    result = secure_ml(tmp_path / "nowhere", "audit", "verify")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr


# -- concurrency ----------------------------------------------------------------------------------
WRITERS = 4
APPENDS = 250


def _append_many(path: str, shared: AuditLog | None, writer: int) -> None:
    log = shared if shared is not None else AuditLog(path)
    for i in range(APPENDS):
        log.record(f"writer-{writer}", "append", subject=f"{writer}:{i}")


@pytest.mark.parametrize("share", [False, True], ids=["own-log-object", "log-object-opened-before-fork"])
def test_processes_appending_at_once_never_corrupt_the_chain(tmp_path: Path, share: bool) -> None:
    path = tmp_path / "audit.jsonl"
    shared = AuditLog(path)
    shared.record("parent", "start")  # opens the descriptors before the fork
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), shared if share else None, w))
               for w in range(WRITERS)]
    for worker in workers:
        worker.start()
    threads = [threading.Thread(target=_append_many, args=(str(path), shared, 100 + t)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    report = AuditLog(path).verify()
    total = 1 + (WRITERS + 2) * APPENDS
    assert report.entries == total
    subjects = [e["subject"] for e in AuditLog(path).entries() if e["action"] == "append"]
    assert len(subjects) == len(set(subjects)) == total - 1
