"""What the release policies read: evidence recorded at registration, normalised, and the policy inputs.

    evidence = {"evaluation": evaluation_evidence(model_evaluation), "scan": scan_evidence(scan_report), ...}
    digest = model_digest(model_dir)                      # how the registry addresses a version
    decision = engine.decide("promotion", promotion_input(version, target_stage="production",
                                                          signature=..., attestation=..., access=access))
    pipeline_changers(version)                            # who may not deploy it (separation of duties)

"Changed the pipeline" (separation of duties, docs/ARCHITECTURE.md) is concrete here: the identity
that registered the version (ran the pipeline run that produced it), the identity that trained
it, and the git author of the code commit in its training record. None of them may deploy it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import sha256_tree, tree_digest
from secure_ml.errors import BadInput
from secure_ml.governance.access import AccessPolicy
from secure_ml.release.registry import ModelVersion


def model_digest(model_dir: Path) -> str:
    """The digest the registry addresses a version by: over every file's SHA-256 and path."""
    return tree_digest(sha256_tree(model_dir))


def _numbers(mapping: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested mapping, keyed by their last name (and dotted path)."""
    out: dict[str, float] = {}
    if not isinstance(mapping, Mapping):
        return out
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            number = _float(value)
            if number is None:
                continue
            out[str(key)] = number
            out[name] = number
        elif isinstance(value, Mapping):
            for sub_key, sub_value in _numbers(value, f"{name}.").items():
                out.setdefault(sub_key, sub_value)
    return out


def _float(value: int | float) -> float | None:
    """A float, or None for an integer too large for one (found by tests/test_fuzz_parsers.py); the
    policy then sees the metric as missing, which fails closed."""
    try:
        return float(value)
    except OverflowError:
        return None


def _fairness_gaps(fairness: Any) -> list[dict[str, Any]]:
    """Every numeric bias metric as {attribute, metric, value}, whatever nesting evaluation used."""
    gaps: list[dict[str, Any]] = []

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, Mapping):
            if "value" in node and isinstance(node["value"], int | float) and not isinstance(node["value"], bool):
                value = _float(node["value"])
                if value is not None:
                    gaps.append({"attribute": ".".join(path[:-1]) or "*", "metric": path[-1] if path else "value",
                                 "value": value})
                return
            for key, value in node.items():
                walk(value, [*path, str(key)])
        elif isinstance(node, int | float) and not isinstance(node, bool) and path and _float(node) is not None:
            gaps.append({"attribute": ".".join(path[:-1]) or "*", "metric": path[-1], "value": float(node)})

    walk(fairness, [])
    return gaps


def evaluation_evidence(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The part of model_evaluation the policy reads, normalised."""
    return {
        "passed": evaluation.get("passed") is True,
        "metrics": _numbers(evaluation.get("metrics")),
        "fairness_gaps": _fairness_gaps(evaluation.get("fairness")),
        "robustness": _numbers(evaluation.get("robustness")),
    }


def scan_evidence(scan: Mapping[str, Any]) -> dict[str, Any]:
    # A report of the wrong shape is one clear error, not a TypeError (tests/test_fuzz_parsers.py).
    if not isinstance(scan.get("findings") or [], list):
        raise BadInput("scan report: findings must be a list")
    if not isinstance(scan.get("counts") or {}, Mapping):
        raise BadInput("scan report: counts must be an object")
    findings = []
    for item in scan.get("findings") or []:
        if not isinstance(item, Mapping):
            continue
        findings.append({
            "id": str(item.get("id") or item.get("rule") or item.get("advisory") or item.get("test_id") or "finding"),
            "severity": str(item.get("severity") or "unknown"),
            "blocking": item.get("blocking") is True,
            "where": str(item.get("where") or item.get("path") or item.get("package") or item.get("file") or "?"),
        })
    return {"blocking": bool(scan.get("blocking")), "counts": dict(scan.get("counts") or {}), "findings": findings}


def pipeline_changers(version: ModelVersion) -> list[dict[str, str]]:
    training = version.evidence.get("training") or {}
    changers = [{"identity": version.registered_by, "why": f"registered {version.version} (ran its pipeline)"}]
    if training.get("actor"):
        changers.append({"identity": str(training["actor"]), "why": f"trained {version.version}"})
    for key in ("code_author", "code_author_name"):
        if not training.get(key):
            continue
        commit = str(training.get("code_commit") or "")[:12]
        changers.append({"identity": str(training[key]),
                         "why": f"authored the pipeline code commit {commit} that produced {version.version}"})
    return changers


def promotion_input(version: ModelVersion, *, target_stage: str, signature: Mapping[str, Any],
                    attestation: Mapping[str, Any], access: AccessPolicy) -> dict[str, Any]:
    """The promotion policy's input: recorded evidence plus verification done just now."""
    evidence = version.evidence
    return {
        "version": version.version,
        "model_digest": version.model_digest,
        "target_stage": target_stage,
        "evaluation": evidence.get("evaluation"),
        "scan": evidence.get("scan"),
        "signature": dict(signature),
        "attestation": dict(attestation),
        "provenance": evidence.get("provenance") or {},
        "training": evidence.get("training") or {},
        "registered_by": version.registered_by,
        # Roles are looked up now, not when the approval was given: a revoked approver stops counting.
        "approvals": [{"identity": a["identity"], "roles": list(access.roles_of(a["identity"]))}
                      for a in version.approvals],
    }
