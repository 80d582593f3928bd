"""secure_ml.data.landing: which drops are complete and new, and the cursor that remembers them.

Touches: real files in a temporary landing directory (appends between scans, fresh mtimes,
symlinks, hidden/temporary names, empty files, renames, rewrites), the cursor's text form across
"restarts" (dumps/loads), and a malformed cursor. Scan times are passed as ``now=`` so no test
sleeps. Does not touch Dagster (tests/test_automation.py runs the sensor built on this).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from secure_ml.custody.integrity import sha256_file
from secure_ml.data import landing
from secure_ml.data.landing import LandingCursor, scan
from secure_ml.errors import BadInput

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "german_credit.csv"
OLD = time.time() - 3600


def put(directory: Path, name: str, data: bytes | None = None, *, mtime: float = OLD) -> Path:
    path = directory / name
    if data is None:
        shutil.copyfile(SAMPLE, path)
    else:
        path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def scan_twice(directory: Path, cursor: LandingCursor) -> list[landing.Drop]:
    """Two scans (a restart in between): what a settled drop needs to be taken."""
    assert scan(directory, cursor) == []
    restarted = LandingCursor.loads(cursor.dumps())
    ready = scan(directory, restarted)
    for drop in ready:
        restarted.mark_done(drop)
    cursor.pending, cursor.done = restarted.pending, restarted.done
    return ready


def test_a_settled_drop_is_taken_on_the_second_scan_with_its_digest(tmp_path: Path) -> None:
    put(tmp_path, "german_credit.csv")
    cursor = LandingCursor()
    assert scan(tmp_path, cursor) == []                      # first sight: pending
    assert list(cursor.pending) == ["german_credit.csv"]
    [drop] = scan(tmp_path, cursor)
    assert drop.name == "german_credit.csv" and drop.sha256 == sha256_file(SAMPLE)
    assert drop.run_key == f"drop-{drop.sha256}" and drop.size == SAMPLE.stat().st_size


def test_a_drop_being_written_is_never_taken(tmp_path: Path) -> None:
    cursor = LandingCursor()
    data = SAMPLE.read_bytes()
    path = put(tmp_path, "german_credit_1.csv", data[:1000])
    assert scan(tmp_path, cursor) == []
    with path.open("ab") as growing:                         # the writer appends between scans
        growing.write(data[1000:5000])
    os.utime(path, (OLD + 10, OLD + 10))
    assert scan(tmp_path, cursor) == []                      # size/mtime changed: still pending
    assert scan(tmp_path, cursor)[0].size == 5000            # unchanged for two scans: taken


def test_a_recently_modified_drop_waits_for_the_settle_time(tmp_path: Path) -> None:
    now = time.time()
    put(tmp_path, "german_credit.csv", mtime=now - 0.5)
    cursor = LandingCursor()
    assert scan(tmp_path, cursor, settle_seconds=2, now=now) == []
    assert scan(tmp_path, cursor, settle_seconds=2, now=now + 1) == []     # stable but not settled
    assert len(scan(tmp_path, cursor, settle_seconds=2, now=now + 3)) == 1


def test_nothing_is_processed_twice_across_restarts(tmp_path: Path) -> None:
    put(tmp_path, "german_credit.csv")
    cursor = LandingCursor()
    assert len(scan_twice(tmp_path, cursor)) == 1
    restarted = LandingCursor.loads(cursor.dumps())
    assert scan(tmp_path, restarted) == [] and scan(tmp_path, restarted) == []


def test_the_same_bytes_under_a_new_name_are_not_a_new_version(tmp_path: Path) -> None:
    put(tmp_path, "german_credit.csv")
    cursor = LandingCursor()
    scan_twice(tmp_path, cursor)
    put(tmp_path, "german_credit_copy.csv")
    assert scan_twice(tmp_path, cursor) == []
    assert "german_credit_copy.csv" in cursor.done                # remembered, not re-hashed each scan


def test_a_rewritten_drop_is_a_new_version(tmp_path: Path) -> None:
    path = put(tmp_path, "german_credit.csv")
    cursor = LandingCursor()
    [first] = scan_twice(tmp_path, cursor)
    path.write_bytes(SAMPLE.read_bytes().replace(b"\n", b"\r\n", 1))
    os.utime(path, (OLD + 60, OLD + 60))
    [second] = scan_twice(tmp_path, cursor)
    assert second.sha256 != first.sha256 and second.name == first.name


def test_nothing_is_missed_when_many_drops_land_between_scans(tmp_path: Path) -> None:
    data = SAMPLE.read_bytes()
    for i in range(12):
        put(tmp_path, f"german_credit_{i:02d}.csv", data + b"\n" * i, mtime=OLD + i)
    cursor = LandingCursor()
    ready = scan_twice(tmp_path, cursor)
    assert [d.name for d in ready] == [f"german_credit_{i:02d}.csv" for i in range(12)]  # oldest first
    assert len({d.run_key for d in ready}) == 12


@pytest.mark.parametrize("name", [".hidden.csv", "german_credit.csv.part", "german_credit.csv.tmp",
                                  "german_credit.csv~", "notes.txt", "german_credit.json"])
def test_hidden_temporary_and_foreign_files_are_ignored(tmp_path: Path, name: str) -> None:
    put(tmp_path, name)
    cursor = LandingCursor()
    assert scan_twice(tmp_path, cursor) == [] and cursor.pending == {}


def test_symlinks_directories_and_empty_files_are_ignored(tmp_path: Path) -> None:
    outside = put(tmp_path.parent, "outside-secret.csv") if tmp_path.parent.is_dir() else None
    landing_dir = tmp_path / "landing"
    landing_dir.mkdir()
    assert outside is not None
    (landing_dir / "german_credit_link.csv").symlink_to(outside)
    (landing_dir / "german_credit_dir.csv").mkdir()
    put(landing_dir, "german_credit_empty.csv", b"")
    cursor = LandingCursor()
    assert scan_twice(landing_dir, cursor) == []


def test_a_missing_landing_area_is_empty_not_an_error(tmp_path: Path) -> None:
    assert scan(tmp_path / "absent", LandingCursor()) == []


@pytest.mark.parametrize("text", ["{", "[]", '{"format": "other/1", "pending": {}, "done": {}}',
                                  '{"format": "secure-ml-landing-cursor/1"}', "null"])
def test_a_malformed_cursor_is_refused_not_reset(text: str) -> None:
    with pytest.raises(BadInput, match="cursor"):
        LandingCursor.loads(text)


def test_the_cursor_stays_bounded_and_forgets_the_oldest_first() -> None:
    cursor = LandingCursor()
    for i in range(landing.MAX_REMEMBERED + 10):
        cursor.mark_done(landing.Drop(name=f"d{i}.csv", size=1, mtime_ns=i, sha256=f"{i:064x}"))
    restored = LandingCursor.loads(cursor.dumps())
    assert len(restored.done) == landing.MAX_REMEMBERED
    assert "d0.csv" not in restored.done and f"d{landing.MAX_REMEMBERED + 9}.csv" in restored.done
