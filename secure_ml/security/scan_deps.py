"""Dependency audit: pip-audit over the hashed lock file, offline (an OSV file) or online.

    service = vulnerability_service("offline", offline_db=Path("data/osv/pypi-advisories.json"))
    findings = audit_dependencies("requirements.lock", service)
    pins = read_lock("requirements.lock")     # [(name, version), ...]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secure_ml.errors import BadInput, ConfigurationError
from secure_ml.security.scan_findings import Finding

def _pip_audit_service_base() -> type:
    from pip_audit._service.interface import VulnerabilityService

    return VulnerabilityService


class OfflineOsvDatabase:
    """pip-audit's VulnerabilityService over an OSV-format file: a JSON list of OSV records
    (or ``{"vulns": [...]}``), matched by PyPI name and ECOSYSTEM ranges or explicit versions."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"offline vulnerability database not found: {self.path}") from None
        except ValueError:
            raise ConfigurationError(f"offline vulnerability database {self.path} is not JSON") from None
        records = raw.get("vulns") if isinstance(raw, dict) else raw
        if not isinstance(records, list):
            raise ConfigurationError(f"offline vulnerability database {self.path} holds no list of OSV records")
        from packaging.utils import canonicalize_name

        self.by_package: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            if not isinstance(record, dict) or "id" not in record:
                raise ConfigurationError(f"offline vulnerability database {self.path}: a record has no id")
            for affected in record.get("affected", []):
                package = affected.get("package", {})
                if package.get("ecosystem") == "PyPI" and package.get("name"):
                    self.by_package.setdefault(canonicalize_name(package["name"]), []).append(record)

    def service(self) -> Any:
        """The pip-audit VulnerabilityService view of this database."""
        return _make_offline_service(self)


def _affected(record: dict[str, Any], name: str, version: Any) -> tuple[bool, list[str]]:
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    hit, fixes = False, []
    plain = Version(version.public)  # a local label (+cpu) does not change which release it is
    for affected in record.get("affected", []):
        package = affected.get("package", {})
        if package.get("ecosystem") != "PyPI" or canonicalize_name(package.get("name", "")) != name:
            continue
        if str(plain) in {str(v) for v in affected.get("versions", [])} or str(version) in affected.get("versions", []):
            hit = True
        for rng in affected.get("ranges", []):
            if rng.get("type") != "ECOSYSTEM":
                continue
            introduced: Version | None = None
            for event in rng.get("events", []):
                try:
                    if "introduced" in event:
                        introduced = Version("0") if event["introduced"] == "0" else Version(event["introduced"])
                    elif "fixed" in event and introduced is not None:
                        fixed = Version(event["fixed"])
                        fixes.append(str(fixed))
                        hit = hit or introduced <= plain < fixed
                        introduced = None
                    elif "last_affected" in event and introduced is not None:
                        hit = hit or introduced <= plain <= Version(event["last_affected"])
                        introduced = None
                except InvalidVersion:
                    continue
            if introduced is not None and introduced <= plain:
                hit = True  # introduced and never fixed
    return hit, fixes


def _make_offline_service(database: OfflineOsvDatabase) -> Any:
    from packaging.version import Version
    from pip_audit._service.interface import ResolvedDependency, VulnerabilityResult, VulnerabilityService

    class _OfflineOsvService(VulnerabilityService):  # type: ignore[misc]
        def query(self, spec: Any) -> tuple[Any, list[Any]]:
            if spec.is_skipped():
                return spec, []
            if not isinstance(spec, ResolvedDependency):
                return spec, []
            results = []
            for record in database.by_package.get(spec.canonical_name, []):
                if record.get("withdrawn"):
                    continue
                hit, fixes = _affected(record, spec.canonical_name, spec.version)
                if hit:
                    description = (record.get("summary") or record.get("details") or "N/A").replace("\n", " ")
                    results.append(VulnerabilityResult.create(
                        ids=[record["id"], *record.get("aliases", [])], description=description,
                        fix_versions=sorted(Version(f) for f in fixes), published=None))
            return spec, results

    return _OfflineOsvService()


def vulnerability_service(source: str, *, offline_db: Path | None = None, timeout: int = 15) -> Any:
    """``offline`` (an OSV-format file) or ``osv`` (pip-audit's online OSV service)."""
    if source == "offline":
        if offline_db is None:
            raise ConfigurationError("dependency audit source 'offline' needs scan.dependencies.offline_db")
        return OfflineOsvDatabase(offline_db).service()
    if source == "osv":
        from pip_audit._service.osv import OsvService

        return OsvService(timeout=timeout)
    raise ConfigurationError(f"dependency audit source must be 'offline' or 'osv', not {source!r}")


def read_lock(lock: Path | str) -> list[tuple[str, str]]:
    """(name, version) of every pinned requirement, parsed by pip-audit (no pip, no network)."""
    from pip_audit._dependency_source import RequirementSource
    from pip_audit._dependency_source.interface import DependencySourceError

    source = RequirementSource([Path(lock)], disable_pip=True, no_deps=True)
    try:
        return [(d.name, str(d.version)) for d in source.collect() if not d.is_skipped()]
    except DependencySourceError as exc:
        raise BadInput(f"lock file {lock}: {exc}") from None


def audit_dependencies(lock: Path | str, service: Any, *, severity: str = "high") -> list[Finding]:
    """pip-audit of a hashed, pinned lock file; one finding per (package, advisory)."""
    from pip_audit._audit import Auditor
    from pip_audit._dependency_source import RequirementSource
    from pip_audit._dependency_source.interface import DependencySourceError
    from pip_audit._service.interface import ServiceError

    lock = Path(lock)
    if not lock.is_file():
        raise BadInput(f"lock file not found: {lock}")
    source = RequirementSource([lock], disable_pip=True, no_deps=True)
    findings: list[Finding] = []
    try:
        for dependency, vulns in Auditor(service).audit(source):
            if dependency.is_skipped():
                findings.append(Finding("dependency", "low", dependency.name, "not-audited",
                                        f"not audited: {dependency.skip_reason}"))
                continue
            for vuln in vulns:
                fixed = ", ".join(str(v) for v in vuln.fix_versions) or "none yet"
                findings.append(Finding(
                    "dependency", severity, f"{dependency.name}=={dependency.version}", str(vuln.id),
                    f"{vuln.id}: {vuln.description[:300]} (fixed in {fixed})",
                    {"package": dependency.name, "version": str(dependency.version), "advisory": str(vuln.id),
                     "aliases": sorted(vuln.aliases), "fixed_versions": [str(v) for v in vuln.fix_versions]},
                ))
    except DependencySourceError as exc:
        raise BadInput(f"lock file {lock}: {exc}") from None
    except (ServiceError, ConnectionError) as exc:
        raise ConfigurationError(f"vulnerability service unavailable: {exc}") from None
    return findings
