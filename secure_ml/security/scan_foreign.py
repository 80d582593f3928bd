"""Model files from elsewhere, scanned without loading them.

    findings = scan_foreign(path)          # a file or a directory
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import zipfile
from pathlib import Path

from secure_ml.custody.integrity import list_tree
from secure_ml.errors import BadInput
from secure_ml.security.scan_findings import SEVERITIES, Finding, dedupe
from secure_ml.security.scan_safetensors import check_safetensors
from secure_ml.security.scan_sniff import looks_like_pickle, sniff

_FICKLING_SEVERITY = {
    "LIKELY_SAFE": None, "POSSIBLY_UNSAFE": "low", "SUSPICIOUS": "medium", "LIKELY_UNSAFE": "high",
    "LIKELY_OVERTLY_MALICIOUS": "critical", "OVERTLY_MALICIOUS": "critical",
}


def _fickling_findings(data: bytes, where: str) -> list[Finding]:
    """fickling's ML allow-list plus its structural analyses over one pickle stream (parsed, never run).

    fickling's generic "non-standard import" and "eval" analyses flag every torch checkpoint; the
    ML allow-list is the precise test (only known tensor-rebuilding callables may be imported).
    """
    from fickling import analysis as fa
    from fickling.fickle import StackedPickle
    from fickling.ml import MLAllowlist

    analyzer = fa.Analyzer([
        MLAllowlist(), fa.UnsafeImports(), fa.BadCalls(), fa.InvalidOpcode(), fa.ExpansionAttackAnalysis(),
        fa.DuplicateProtoAnalysis(), fa.MisplacedProtoAnalysis(), fa.ResourceExhaustionAnalysis(),
        fa.ScannerDeactivation(),
    ])
    check_safety = fa.check_safety
    findings: list[Finding] = []
    try:
        stacked = StackedPickle.load(io.BytesIO(data), fail_on_decode_error=True)
    except Exception as exc:  # noqa: BLE001 - an unparseable pickle is itself suspicious
        return [Finding("model", "high", where, "fickling-parse", f"pickle cannot be parsed safely: {exc}")]
    for pickled in stacked:
        results = check_safety(pickled, analyzer=analyzer)
        for result in results.results:
            severity = _FICKLING_SEVERITY.get(result.severity.name)
            if severity:
                findings.append(Finding("model", severity, where, f"fickling:{result.analysis_name}",
                                        str(result), {"trigger": result.trigger or ""}))
    return findings


def _modelscan_findings(path: Path, where: str, suffix: str) -> list[Finding]:
    """modelscan picks scanners by extension: give it a name that matches the content."""
    from modelscan.modelscan import ModelScan
    from modelscan.settings import DEFAULT_SETTINGS

    with tempfile.TemporaryDirectory(prefix="secure-ml-modelscan-") as tmp:
        alias = Path(tmp) / f"model{suffix}"
        os.symlink(path.absolute(), alias)
        logging.getLogger("modelscan").setLevel(logging.CRITICAL)
        report = ModelScan(settings=DEFAULT_SETTINGS).scan(alias)
    findings = []
    for issue in report.get("issues", []):
        severity = str(issue.get("severity", "HIGH")).lower()
        operator = f"{issue.get('module', '')}.{issue.get('operator', '')}".strip(".")
        findings.append(Finding("model", severity if severity in SEVERITIES else "high", where, "modelscan:unsafe-operator",
                                f"loading it would call {operator} ({issue.get('description', 'unsafe operator')})",
                                {"operator": operator, "scanner": issue.get("scanner", "")}))
    for error in report.get("errors", []):
        findings.append(Finding("model", "medium", where, "modelscan:error",
                                f"modelscan could not scan it: {error.get('description', error)}"))
    return findings


def scan_foreign_file(path: Path, where: str | None = None) -> list[Finding]:
    """Scan one file from elsewhere without loading it: pickles with modelscan and fickling."""
    where = where or path.name
    info = sniff(path)
    findings: list[Finding] = []
    if "pickle" in info["kinds"]:
        findings += _modelscan_findings(path, where, ".pkl")
        findings += _fickling_findings(path.read_bytes(), where)
    if "zip" in info["kinds"]:
        findings += _modelscan_findings(path, where, ".pt")
        with contextlib.suppress(zipfile.BadZipFile, OSError, RuntimeError), zipfile.ZipFile(path) as archive:
            for member in info["zip_members"]:
                if member.endswith("/") or archive.getinfo(member).file_size > 512 * 1024 * 1024:
                    continue
                data = archive.read(member)
                if looks_like_pickle(data[:4096] if len(data) > 4096 else data):
                    findings += _fickling_findings(data, f"{where}:{member}")
    if "npy" in info["kinds"]:
        findings += _modelscan_findings(path, where, ".npy")
    return dedupe(findings)


def scan_foreign(path: Path | str) -> list[Finding]:
    """Scan a foreign model file or directory (modelscan + fickling; safetensors headers validated)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"not found: {path}")
    files = [(path, path.name)] if path.is_file() else [(path / n, n) for n in list_tree(path)]
    findings: list[Finding] = []
    for file, where in files:
        if file.suffix == ".safetensors":
            findings += check_safetensors(file, where)
        findings += scan_foreign_file(file, where)
    return findings
