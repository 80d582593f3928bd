"""Security scans for a model release: model files, dependencies, pipeline code, SBOM.

    report, sbom_json = release_scan(model_dir, security_cfg)   # everything, for a release
    report, sbom_json = release_scan(model_dir, security_cfg, cache=ScanCache(store, index_dir))
                          # the dependency audit and the code scan reused while their inputs are unchanged

The controls live in one module each, and are importable from here too:

    findings = scan_model_dir(model_dir)                         # scan_model: our own model
    findings = scan_foreign(path)                                # scan_foreign: a checkpoint from elsewhere
    findings = audit_dependencies(lock, OfflineOsvDatabase(db))  # scan_deps: pip-audit over the lock file
    findings = scan_code([repo / "secure_ml"])                   # scan_code: bandit
    report = ScanPolicy.from_config(cfg).report(findings)        # scan_findings: the verdict
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secure_ml.security.scan_cache import ScanCache, code_scan_key, dependency_audit_key
from secure_ml.security.scan_code import scan_code
from secure_ml.security.scan_deps import (
    OfflineOsvDatabase,
    audit_dependencies,
    read_lock,
    vulnerability_service,
)
from secure_ml.security.scan_findings import (
    SEVERITIES,
    Finding,
    ScanPolicy,
    iter_blocking,
    rank,
    summary_markdown,
)
from secure_ml.security.scan_foreign import scan_foreign, scan_foreign_file
from secure_ml.security.scan_model import scan_model_dir
from secure_ml.security.scan_safetensors import SafetensorsLimits, check_safetensors, read_safetensors_header
from secure_ml.security.scan_sniff import looks_like_pickle, sniff

__all__ = [
    "SEVERITIES", "Finding", "OfflineOsvDatabase", "SafetensorsLimits", "ScanCache", "ScanPolicy", "audit_dependencies",
    "check_safetensors", "iter_blocking", "looks_like_pickle", "rank", "read_lock", "read_safetensors_header",
    "release_scan", "scan_code", "scan_foreign", "scan_foreign_file", "scan_model_dir", "sniff",
    "summary_markdown", "vulnerability_service",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _repo_path(value: str | Path, repo_root: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else repo_root / path


def release_scan(model_dir: Path | str, config: dict[str, Any], *, repo_root: Path = REPO_ROOT,
                 datasets: Sequence[Any] = (), model_name: str = "secure-ml-model",
                 code: bool = True, cache: ScanCache | None = None,
                 model_scan: Any = None) -> tuple[dict[str, Any], str]:
    """Model files, dependency audit, code scan and SBOM: (report, CycloneDX JSON).

    ``config`` is the parsed security.yaml. The SBOM's validation failure is itself a finding.
    With ``cache``, the dependency audit and the code scan are taken from it while the lock file,
    the offline advisory database and the scanned code are unchanged (the model is always scanned).
    ``model_scan(model_dir, allowed_types=..., limits=...)`` replaces :func:`scan_model_dir` in this
    process: the scan step passes one that runs it in the sandbox (the model files are untrusted input).
    """
    from secure_ml.security import sbom

    scan = config.get("scan", {})
    policy = ScanPolicy.from_config(config)
    limits_cfg = scan.get("safetensors", {})
    limits = SafetensorsLimits(
        max_header_bytes=int(limits_cfg.get("max_header_bytes", SafetensorsLimits.max_header_bytes)),
        max_tensors=int(limits_cfg.get("max_tensors", SafetensorsLimits.max_tensors)),
        allowed_dtypes=frozenset(limits_cfg.get("allowed_dtypes", SafetensorsLimits().allowed_dtypes)),
    )
    findings = (model_scan or scan_model_dir)(
        model_dir, allowed_types=tuple(scan.get("model_file_types", (".safetensors", ".json", ".md"))), limits=limits)
    deps = scan.get("dependencies", {})
    lock = _repo_path(deps.get("lock_file", "requirements.lock"), repo_root)
    source = str(deps.get("source", "offline"))
    offline_db = _repo_path(deps.get("offline_db", "data/osv/pypi-advisories.json"), repo_root)
    severity = str(deps.get("severity", "high"))

    def audit() -> list[Finding]:
        return audit_dependencies(lock, vulnerability_service(source, offline_db=offline_db), severity=severity)

    if cache is None:
        findings += audit()
    else:
        findings += cache.findings(dependency_audit_key(lock, source=source, offline_db=offline_db,
                                                        severity=severity), audit)
    if code:
        paths = [_repo_path(p, repo_root) for p in scan.get("code", {}).get("paths", ["secure_ml", "assets", "resources", "sensors"])]
        findings += (scan_code(paths, root=repo_root) if cache is None
                     else cache.findings(code_scan_key(paths), lambda: scan_code(paths, root=repo_root)))
    document = sbom.model_sbom(model_dir, lock, model_name=model_name, datasets=datasets)
    try:
        sbom.validate(document)
        sbom_valid = True
    except Exception as exc:  # noqa: BLE001 - any validation failure is reported as a finding
        findings.append(Finding("sbom", "high", "sbom.cdx.json", "cyclonedx-schema", str(exc)[:300]))
        sbom_valid = False
    from secure_ml.custody.integrity import sha256_bytes

    report = policy.report(findings, sbom_sha256=sha256_bytes(document.encode()), sbom_valid=sbom_valid,
                           vulnerability_source=source, lock_file=lock.name)
    return report, document
