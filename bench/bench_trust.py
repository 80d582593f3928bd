"""Trust figures (issue 13): the deploy gate's evidence from signed statements, and anchored audit verify.

- deploy gate evidence: load and verify the signed trust policy (owner signature, pin), then verify
  every signed statement about the model (training, evaluation, scan, provenance by the pipeline;
  two approvals; a promotion), read from the ledger on disk after checking the registry's index
  (no statement gone), and build the policy input from them, median of N, goal <= 50 ms;
  baseline: reading the same facts from the registry rows as the gate did before (get the version,
  its evidence and approvals, its history) in the same run.
- audit verify of 100,000 entries against a signed checkpoint (verify the checkpoint's signature,
  then the log), goal >= 0.5 x the throughput of a plain SHA-256 pass over the same file.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import Figure


def _median(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _identity(root: Path, name: str) -> Any:
    from secure_ml.governance.identity import load_identity, new_identity

    return load_identity(new_identity(name, root / name)[0])


def run(quick: bool) -> list[Figure]:
    from secure_ml.custody import anchor
    from secure_ml.custody.audit import AuditLog
    from secure_ml.governance.decisions import sign_decision
    from secure_ml.governance.ledger import Ledger
    from secure_ml.governance.trust import TrustPolicy, TrustStore, add_identity
    from secure_ml.release.registry import Registry

    figures: list[Figure] = []
    n = 20 if quick else 200
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as tmp:
        root = Path(tmp)
        owner, carol, erin, pipe = (_identity(root / "ids", n_) for n_ in ("owner", "carol", "erin", "pipeline"))
        roles = {"classifications": ["public"], "roles": {"approver": {"may": ["model.approve"], "clearance": "public"},
                                                          "deployer": {"may": ["model.deploy"], "clearance": "public"}}}
        release = {"promotion": {"required_approvals": 2, "approver_role": "approver"}}
        store = TrustStore(root / "trust")
        store.init(TrustPolicy.new_document([owner.key], threshold=1, roles_config=roles, release_config=release),
                   [owner.signer])

        def people(doc: dict[str, Any]) -> None:
            add_identity(doc, "carol", roles=["approver"], key=carol.key)
            add_identity(doc, "erin", roles=["approver", "deployer"], key=erin.key)
            add_identity(doc, "pipeline", roles=["pipeline"], key=pipe.key, model_signer=True)

        store.update(people, [owner.signer])
        digest = hashlib.sha256(b"model").hexdigest()
        evaluation = {"metrics": {"accuracy": 0.8, "roc_auc": 0.8}, "fairness": {"demographic_parity_difference": 0.1}}
        envelopes = [
            sign_decision("training", digest, {"trainer": "bob", "data_adders": ["alice"], "code_authors": ["bob"]},
                          pipe.signer),
            sign_decision("evaluation", digest, evaluation, pipe.signer),
            sign_decision("scan", digest, {"blocking": 0, "findings": []}, pipe.signer),
            sign_decision("provenance", digest, {"builder": "bench"}, pipe.signer),
            sign_decision("approval", digest, {"version": "v1"}, carol.signer),
            sign_decision("approval", digest, {"version": "v1"}, erin.signer),
            sign_decision("promotion", digest, {"version": "v1", "stage": "production"}, erin.signer),
        ]

        registry = Registry(root / "registry" / "registry.db")
        # As the gate reads them: from the ledger on disk, each indexed in the registry (none may be gone).
        ledger = Ledger(root / "statements", index=registry)
        for envelope in envelopes:
            ledger.record(envelope, store.load(), model_digest=digest)

        def gate() -> None:
            policy = store.load()
            ledger.evidence(digest, policy).policy_input(policy, version="v1")

        registry.register(digest, {"evaluation": evaluation, "scan": {"blocking": 0}}, actor="bob")
        registry.add_approval("v1", "carol", roles=["approver"])
        registry.add_approval("v1", "erin", roles=["approver"])

        def rows() -> None:
            version = registry.get("v1")
            registry.history(version.version)

        gate()
        ours, base = _median(gate, n), _median(rows, n)
        figures.append(Figure(13, "deploy gate evidence from 7 signed statements on disk (indexed) + policy", ours * 1000, "ms",
                              "registry rows read as before", base * 1000, "<= 50 ms", ours <= 0.050))

        entries = 10_000 if quick else 100_000
        log = AuditLog(root / "audit" / "audit.jsonl")
        for i in range(entries):
            log.record("bench", "store.write", subject=f"sha256:{i:064x}", details={"kind": "parquet", "i": i})
        envelope = anchor.checkpoint(log, pipe.signer)
        keys = [pipe.key]

        def verify() -> None:
            log.verify(checkpoint=anchor.verify_checkpoint(envelope, keys))

        def plain() -> None:
            with log.path.open("rb") as handle:
                hashlib.file_digest(handle, "sha256")

        rounds = 3 if quick else 7
        verify()
        ours, base = _median(verify, rounds), _median(plain, rounds)
        size = log.path.stat().st_size / 2**20
        # Throughput ratio: the plain pass's time over ours (1.0 = as fast as one SHA-256 pass).
        figures.append(Figure(13, f"audit verify vs checkpoint ({entries:,} entries, {size:.0f} MiB)",
                              ours * 1000, "ms", "plain sha256 pass over the file", base * 1000,
                              ">= 0.5x sha256", base / ours >= 0.5))
    return figures
