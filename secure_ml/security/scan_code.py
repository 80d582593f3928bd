"""Code scan: bandit over the pipeline code.

    findings = scan_code([repo / "secure_ml", repo / "assets"], root=repo)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from secure_ml.security.scan_findings import Finding

def scan_code(paths: Sequence[Path | str], *, root: Path | str | None = None) -> list[Finding]:
    """bandit over the pipeline code; bandit's own severity, confidence in details."""
    from bandit.core import config as b_config
    from bandit.core import manager as b_manager

    targets = [str(p) for p in paths if Path(p).exists()]
    if not targets:
        return []
    logging.getLogger("bandit").setLevel(logging.ERROR)
    manager = b_manager.BanditManager(b_config.BanditConfig(), "file", quiet=True)
    manager.discover_files(targets, recursive=True)
    manager.run_tests()
    base = Path(root) if root else None
    findings = []
    for issue in manager.get_issue_list():
        filename = Path(issue.fname)
        if base is not None:
            with contextlib.suppress(ValueError):
                filename = filename.absolute().relative_to(base.absolute())
        findings.append(Finding(
            "code", str(issue.severity).lower(), f"{filename}:{issue.lineno}", f"bandit:{issue.test_id}",
            f"{issue.test} ({issue.test_id}): {issue.text}",
            {"confidence": str(issue.confidence).lower(), "cwe": getattr(issue.cwe, "id", None)},
        ))
    for fname, reason in manager.skipped:
        findings.append(Finding("code", "medium", str(fname), "bandit:skipped", f"bandit could not scan it: {reason}"))
    return findings
