"""The scan cache (secure_ml.security.scan_cache): the dependency audit and bandit reused by digest.

Touches: a real encrypted artifact store under a fresh SECURE_ML_HOME, real pip-audit over lock
files written here and the shipped offline OSV file, real bandit over code written here.
Does not touch: Dagster (test_security_stage.py runs scan_report), the online OSV service.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from secure_ml.security import scanning
from secure_ml.security.scan_cache import ScanCache, code_scan_key, dependency_audit_key
from secure_ml.settings import Settings

REPO = Path(__file__).resolve().parents[1]
OSV_DB = REPO / "data" / "osv" / "pypi-advisories.json"
VULNERABLE = "pyyaml==5.3.1 \\\n    --hash=sha256:" + "0" * 64 + "\n"
FIXED = "pyyaml==6.0.2 \\\n    --hash=sha256:" + "0" * 64 + "\n"
SHELL = "import subprocess\n\ndef run(cmd):\n    return subprocess.call(cmd, shell=True)\n"


def _cache(settings: Settings) -> ScanCache:
    return ScanCache(settings.artifact_store(), settings.home / "cache" / "scans")


def _audit(cache: ScanCache, lock: Path, db: Path, calls: list[int]) -> list[scanning.Finding]:
    def run() -> list[scanning.Finding]:
        calls.append(1)
        return scanning.audit_dependencies(lock, scanning.vulnerability_service("offline", offline_db=db))

    return cache.findings(dependency_audit_key(lock, source="offline", offline_db=db, severity="high"), run)


def test_dependency_audit_is_reused_until_the_lock_or_the_advisories_change(settings: Settings, tmp_path: Path) -> None:
    lock, db = tmp_path / "requirements.lock", tmp_path / "advisories.json"
    lock.write_text(VULNERABLE)
    shutil.copyfile(OSV_DB, db)
    cache, calls = _cache(settings), []
    first = _audit(cache, lock, db, calls)
    assert [f.details["advisory"] for f in first] == ["PYSEC-2021-142"] and calls == [1]
    assert _audit(cache, lock, db, calls) == first and calls == [1]          # served from the cache
    assert _audit(_cache(settings), lock, db, calls) == first and calls == [1]  # and across processes
    lock.write_text(FIXED)                                                   # the lock changed: scanned again
    assert _audit(cache, lock, db, calls) == [] and len(calls) == 2
    lock.write_text(VULNERABLE)                                              # back: the old entry answers
    assert _audit(cache, lock, db, calls) == first and len(calls) == 2
    db.write_text('{"vulns": []}')                                           # the advisories changed
    assert _audit(cache, lock, db, calls) == [] and len(calls) == 3
    assert cache.summary() == {"hits": 2, "misses": 3}


def test_online_advisories_are_never_cached(settings: Settings, tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(FIXED)
    assert dependency_audit_key(lock, source="osv", offline_db=OSV_DB, severity="high") is None
    cache, calls = _cache(settings), []
    for _ in range(2):
        cache.findings(None, lambda: calls.append(1) or [])
    assert calls == [1, 1] and cache.misses == ["uncached", "uncached"]


def test_code_scan_is_reused_until_any_scanned_file_changes(settings: Settings, tmp_path: Path) -> None:
    code = tmp_path / "pkg"
    code.mkdir()
    (code / "ok.py").write_text("VALUE = 1\n")
    cache, calls = _cache(settings), []

    def scan() -> list[scanning.Finding]:
        calls.append(1)
        return scanning.scan_code([code], root=tmp_path)

    assert cache.findings(code_scan_key([code]), scan) == [] and len(calls) == 1
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "ok.cpython-311.pyc").write_bytes(b"bytecode")   # not code bandit reads
    assert cache.findings(code_scan_key([code]), scan) == [] and len(calls) == 1
    (code / "bad.py").write_text(SHELL)                                       # new code: scanned again
    found = cache.findings(code_scan_key([code]), scan)
    assert len(calls) == 2 and [f.where for f in found if f.rule == "bandit:B602"] == ["pkg/bad.py:4"]
    (code / "bad.py").write_text(SHELL.replace("shell=True", "shell=False"))  # an edit: scanned again
    assert not [f for f in cache.findings(code_scan_key([code]), scan) if f.rule == "bandit:B602"]
    assert len(calls) == 3


def test_an_index_pointing_at_another_artifact_is_a_miss(settings: Settings, tmp_path: Path) -> None:
    """Editing the index (not the sealed entry) cannot substitute a clean answer for a finding."""
    lock, calls = tmp_path / "requirements.lock", []
    lock.write_text(VULNERABLE)
    cache = _cache(settings)
    key = dependency_audit_key(lock, source="offline", offline_db=OSV_DB, severity="high")
    assert key is not None
    _audit(cache, lock, OSV_DB, calls)
    clean_key = "f" * 64
    cache.put(clean_key, [])
    (cache.index_dir / f"{key}.ref").write_text((cache.index_dir / f"{clean_key}.ref").read_text())
    assert cache.get(key) is None
    assert len(_audit(cache, lock, OSV_DB, calls)) == 1 and len(calls) == 2
    (cache.index_dir / f"{key}.ref").write_text("not a digest")
    assert cache.get(key) is None
    entry = settings.artifact_store().path_for((cache.index_dir / f"{clean_key}.ref").read_text())
    raw = bytearray(entry.read_bytes())
    raw[-5] ^= 1                                                              # a tampered entry
    entry.write_bytes(bytes(raw))
    assert cache.get(clean_key) is None


def test_release_scan_with_a_cache_reports_the_same(settings: Settings, tmp_path: Path) -> None:
    import yaml

    from tests.test_scanning import write_model

    config = yaml.safe_load((REPO / "secure_ml" / "config" / "security.yaml").read_text())
    config["scan"]["code"] = {"paths": ["secure_ml/security/scan_cache.py"]}
    model = write_model(tmp_path / "m")
    cache = _cache(settings)
    plain, _ = scanning.release_scan(model, config)
    first, _ = scanning.release_scan(model, config, cache=cache)
    again, _ = scanning.release_scan(model, config, cache=cache)
    assert plain["counts"] == first["counts"] == again["counts"] and not again["blocking"]
    assert cache.summary() == {"hits": 2, "misses": 2}
