"""Scan findings and the verdict over them: what blocks a release, and the summary people read.

    finding = Finding("model", "critical", "evil.pt", "pickle-import", "loading it would call os.system")
    report = ScanPolicy.from_config(security_cfg).report(findings)   # counts, blocking, rows
    print(summary_markdown(report))

Severities are ``critical``, ``high``, ``medium``, ``low``, ``info``; everything at or over the
blocking severity (``code_blocking_severity`` for bandit findings) blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from secure_ml.errors import ConfigurationError

SEVERITIES = ("critical", "high", "medium", "low", "info")
_RANK = {name: len(SEVERITIES) - i for i, name in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class Finding:
    """One thing a scan found: what (rule), where, why, how severe."""

    category: str      # model | dependency | code | sbom
    severity: str      # critical | high | medium | low | info
    where: str
    rule: str
    why: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank(severity: str) -> int:
    try:
        return _RANK[severity.lower()]
    except KeyError:
        raise ConfigurationError(f"unknown severity {severity!r}: use one of {', '.join(SEVERITIES)}") from None



def dedupe(findings: Iterable[Finding]) -> list[Finding]:
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for finding in findings:
        key = (finding.where, finding.rule, finding.why)
        if key not in seen:
            seen.add(key)
            unique.append(finding)
    return unique



@dataclass(frozen=True)
class ScanPolicy:
    blocking_severity: str = "high"
    code_blocking_severity: str = "medium"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScanPolicy:
        scan = config.get("scan", config)
        policy = cls(str(scan.get("blocking_severity", "high")),
                     str(scan.get("code", {}).get("blocking_severity", "medium")))
        rank(policy.blocking_severity), rank(policy.code_blocking_severity)
        return policy

    def blocks(self, finding: Finding) -> bool:
        threshold = self.code_blocking_severity if finding.category == "code" else self.blocking_severity
        return rank(finding.severity) >= rank(threshold)

    def report(self, findings: Sequence[Finding], **extra: Any) -> dict[str, Any]:
        ordered = sorted(findings, key=lambda f: (-rank(f.severity), f.category, f.where, f.rule))
        rows = [{**f.to_dict(), "blocking": self.blocks(f)} for f in ordered]
        counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
        blocking = [r for r in rows if r["blocking"]]
        return {
            "format": "secure-ml-scan/1",
            "blocking": bool(blocking),
            "blocking_count": len(blocking),
            "blocking_severity": self.blocking_severity,
            "code_blocking_severity": self.code_blocking_severity,
            "counts": counts,
            "counts_by_category": {c: sum(1 for f in findings if f.category == c)
                                   for c in ("model", "dependency", "code", "sbom")},
            "findings": rows,
            **extra,
        }


def summary_markdown(report: dict[str, Any], *, limit: int = 40) -> str:
    """The readable summary for the UI: counts by severity, then each finding with where and why."""
    counts = report.get("counts", {})
    verdict = ("**BLOCKED**: " + f"{report.get('blocking_count', 0)} finding(s) at or over the blocking severity"
               if report.get("blocking") else "**clear**: nothing at or over the blocking severity")
    lines = [verdict, "", "| severity | count |", "| --- | --- |"]
    lines += [f"| {s} | {counts.get(s, 0)} |" for s in SEVERITIES]
    findings = report.get("findings", [])
    if findings:
        lines += ["", "| | severity | category | where | why |", "| --- | --- | --- | --- | --- |"]
        for row in findings[:limit]:
            why = str(row["why"]).replace("|", "\\|").replace("\n", " ")[:240]
            where = str(row["where"]).replace("|", "\\|")
            lines.append(f"| {'⛔' if row.get('blocking') else ''} | {row['severity']} | {row['category']} "
                         f"| `{where}` | {why} |")
        if len(findings) > limit:
            lines.append(f"\n… and {len(findings) - limit} more in the full report (stored JSON).")
    return "\n".join(lines)


def iter_blocking(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from (row for row in report.get("findings", []) if row.get("blocking"))
