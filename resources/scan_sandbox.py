"""The scan step's model-file scanners, run in the training sandbox: the model files are untrusted input.

    scan = sandboxed_model_scan(IsolationPolicy.from_mapping(training_yaml["isolation"]),
                                must_not_reach=[keyring, signing_key, keys_dir, f"/proc/{os.getpid()}/environ"])
    report, sbom = scanning.release_scan(model_dir, config, model_scan=scan)
    scan.seen                      # what the scanners' process saw: uid, environment names, each path's reach

A parser bug in a scanner fed a hostile model file would otherwise run with the step's KEK in memory
and the keys, store and audit log on disk within reach. In the sandbox (secure_ml.training.sandbox,
the same code path training uses) it has no network, no secret in its environment, no access to the
parent's /proc, and ``SECURE_ML_HOME`` with the keys hidden; the scanners' process itself tries each
``must_not_reach`` path and the verdict is refused (fail closed) if it could read or list one. The files go over as blobs (the sandbox
has its own /tmp); the findings come back as JSON. The core cannot compose the two (security and
training are sibling stages), so this lives in the Dagster layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import list_tree
from secure_ml.security.scan_findings import Finding
from secure_ml.security.scan_model import SANDBOX_ENTRY
from secure_ml.security.scan_safetensors import SafetensorsLimits
from secure_ml.training.sandbox import IsolationPolicy, SandboxError, run_isolated


class sandboxed_model_scan:  # noqa: N801 - used as a function: scanning.release_scan(model_scan=...)
    """A drop-in for secure_ml.security.scan_model.scan_model_dir that runs it in the sandbox."""

    def __init__(self, policy: IsolationPolicy, *, must_not_reach: list[str] | tuple[str, ...] = ()) -> None:
        self.policy = policy
        self.must_not_reach = [str(p) for p in must_not_reach]
        self.seen: dict[str, Any] = {}
        self.isolation: dict[str, Any] = {}

    def __call__(self, model_dir: Path | str, *, allowed_types: tuple[str, ...],
                 limits: SafetensorsLimits) -> list[Finding]:
        model_dir = Path(model_dir)
        names = list_tree(model_dir)
        got: dict[str, Any] = {}

        def keep(kind: str, payload: bytes) -> None:
            if kind == "R":
                got.update(json.loads(payload))

        header = {"files": names, "allowed_types": list(allowed_types),
                  "limits": {"max_header_bytes": limits.max_header_bytes, "max_tensors": limits.max_tensors,
                             "allowed_dtypes": sorted(limits.allowed_dtypes)},
                  "must_not_reach": self.must_not_reach}
        self.isolation = run_isolated(header, [(model_dir / n).read_bytes() for n in names], policy=self.policy,
                                      entry=SANDBOX_ENTRY, on_frame=keep)
        if not self.isolation.get("level_met"):
            raise SandboxError("the model scan's sandbox did not reach its configured level; not trusting its verdict")
        if "findings" not in got:
            raise SandboxError("the sandboxed model scan returned no findings list")
        self.seen = dict(got.get("seen") or {})
        reached = sorted(p for p, outcome in (self.seen.get("reach") or {}).items()
                         if outcome in ("read", "listed"))
        if reached or any(p not in (self.seen.get("reach") or {}) for p in self.must_not_reach):
            # Fail closed: a scanner that could read a key is not trusted to judge a hostile file.
            raise SandboxError(f"the model scanners could reach {reached[0] if reached else 'an unchecked path'}; "
                               "not trusting their verdict")
        return [Finding(**f) for f in got["findings"]]
