"""Scan results cached by the digests of what the scan reads: a scan runs again only when they change.

    cache = ScanCache(store, home / "cache" / "scans")
    key = dependency_audit_key(lock, source="offline", offline_db=db, severity="high")
    findings = cache.findings(key, lambda: audit_dependencies(lock, service))
    findings = cache.findings(code_scan_key(paths), lambda: scan_code(paths, root=repo))
    cache.hits, cache.misses                       # what this cache answered, for metadata

A key is the SHA-256 of a JSON object naming the scan and the digest of each of its inputs. For
the dependency audit: the lock file, the offline advisory database, the severity, pip-audit's and
packaging's versions and this package's scanner source. For the code scan: every file under the
scanned paths (relative path and digest; bandit reads a subset of them), bandit's and Python's
versions and the scanner's source. Change any of them and the key changes, so nothing is ever
invalidated by hand. The online advisory source (``osv``) changes without telling us: its audit is
never cached (``dependency_audit_key`` returns None and the scan always runs).

An entry is the findings as JSON sealed in the artifact store (authenticated encryption: forging one
needs the key-encryption key), found through an index file ``<key>.ref`` holding its digest. The
entry names its own key and is refused unless that matches, so an index edited to point at another
artifact is a miss, never a wrong answer. Any miss or unreadable entry runs the scan.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import SHA256_HEX, atomic_write_bytes, sha256_file
from secure_ml.custody.store import ArtifactStore
from secure_ml.errors import Error
from secure_ml.security.scan_findings import Finding

FORMAT = "secure-ml-scan-cache/1"
_HERE = Path(__file__).resolve().parent
#: Folders no scanner reads (bytecode, VCS metadata, tool caches).
_SKIP_DIRS = frozenset({"__pycache__", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache"})


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def _key(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def dependency_audit_key(lock: Path, *, source: str, offline_db: Path | None, severity: str) -> str | None:
    """The dependency audit's cache key, or None where the advisory data is online (never cached)."""
    if source != "offline" or offline_db is None or not lock.is_file() or not offline_db.is_file():
        return None  # nothing cached: the audit itself reports the missing file or the online source
    return _key({"scan": "dependencies", "lock": sha256_file(lock), "advisories": sha256_file(offline_db),
                 "severity": severity, "pip-audit": _version("pip-audit"), "packaging": _version("packaging"),
                 "scanner": sha256_file(_HERE / "scan_deps.py")})


def _files(paths: Iterable[Path]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for top in paths:
        if top.is_file():
            found.append((str(top.absolute()), sha256_file(top)))
            continue
        for path in sorted(top.rglob("*")):
            if _SKIP_DIRS.intersection(path.relative_to(top).parts) or not path.is_file():
                continue
            found.append((str(path.absolute()), sha256_file(path)))
    return found


def code_scan_key(paths: Sequence[Path]) -> str:
    """The code scan's cache key: every file under ``paths`` by absolute path and digest (findings
    name files, so the place is part of the key), and the scanner's versions."""
    return _key({"scan": "code", "files": _files(p for p in paths if p.exists()),
                 "bandit": _version("bandit"), "python": sys.version.split()[0],
                 "scanner": sha256_file(_HERE / "scan_code.py")})


class ScanCache:
    """Findings by key, sealed in ``store``; the index of keys lives in ``index_dir``."""

    def __init__(self, store: ArtifactStore, index_dir: Path | str) -> None:
        self.store = store
        self.index_dir = Path(index_dir)
        self.hits: list[str] = []
        self.misses: list[str] = []

    def _index(self, key: str) -> Path:
        return self.index_dir / f"{key}.ref"

    def get(self, key: str) -> list[Finding] | None:
        """The cached findings for ``key``, or None (absent, unreadable, or not this key's entry)."""
        try:
            digest = self._index(key).read_text().strip()
        except OSError:
            return None
        if not SHA256_HEX.match(digest):
            return None
        try:
            entry = self.store.get_json(digest)
        except Error:
            return None  # missing, tampered or unreadable: scan again
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
            return None
        try:
            return [Finding(**row) for row in entry["findings"]]
        except (KeyError, TypeError):
            return None

    def put(self, key: str, findings: Sequence[Finding]) -> None:
        ref = self.store.put_json({"format": FORMAT, "key": key, "findings": [f.to_dict() for f in findings]},
                                  details={"role": "scan-cache"})
        self.index_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self._index(key), ref.sha256.encode())

    def findings(self, key: str | None, scan: Callable[[], list[Finding]]) -> list[Finding]:
        """Cached findings for ``key``, else ``scan()`` (stored under ``key`` unless it is None)."""
        label = "uncached" if key is None else key[:12]
        cached = None if key is None else self.get(key)
        if cached is not None:
            self.hits.append(label)
            return cached
        self.misses.append(label)
        found = scan()
        if key is not None:
            self.put(key, found)
        return found

    def summary(self) -> dict[str, Any]:
        return {"hits": len(self.hits), "misses": len(self.misses)}
