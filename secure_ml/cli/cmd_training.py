"""Re-checking a registered model's training from the command line, without training again.

    secure-ml verify-training VERSION [--segments K] [--segment I ...]

Decrypts the version's model from the store, verifies it as every gate does (its signature and
its attestation against the trusted keys, and the digest the registry pins; both cover
``training_chain.safetensors`` and the record's chain digests), checks the chain against the
record and the weights, then re-executes K segments chosen at random here (or the segments named
by index), isolated in the training sandbox, on the train split the record names, and compares
each end state with the chain (secure_ml.training.proof). Exit 0 when all match; 1 with one line
when the chain is tampered with or a segment does not reach its recorded state.
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
from pathlib import Path

from secure_ml.errors import BadInput, Error, VerificationError
from secure_ml.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    verify = sub.add_parser("verify-training", help="re-execute K segments of a registered model's training chain")
    verify.add_argument("version", metavar="VERSION", help="registry version (v3) or model digest")
    verify.add_argument("--segments", type=int, default=3, metavar="K", help="segments chosen at random (default 3)")
    verify.add_argument("--segment", type=int, action="append", metavar="I", help="re-check segment I (repeatable)")
    verify.set_defaults(handler=cmd_verify_training)


def cmd_verify_training(args: argparse.Namespace) -> int:
    from secure_ml.release.registry import Registry
    from secure_ml.security import signing, verification
    from secure_ml.training.proof import verify_segments
    from secure_ml.training.sandbox import IsolationPolicy

    if args.segments < 1:
        raise BadInput("--segments must be at least 1")
    settings = Settings.from_env()
    found = Registry.from_settings(settings).get(args.version)
    stored = found.evidence.get("store") or {}
    if not all(stored.get(k) for k in ("model_tree", "signature", "attestation")):
        raise VerificationError(f"{found.version} has no stored model, signature and attestation")
    store = settings.artifact_store()
    trust = signing.TrustPolicy.from_config(settings.load_config("security"), settings.home)
    isolation = IsolationPolicy.from_mapping(settings.load_config("training").get("isolation"))
    subject = f"sha256:{found.model_digest}"
    try:
        with tempfile.TemporaryDirectory(prefix="secure-ml-verify-training-") as tmp:
            model_dir = Path(tmp) / "model"
            store.get_tree(stored["model_tree"], model_dir)
            (Path(tmp) / "model.sig").write_bytes(store.get_bytes(stored["signature"]))
            (Path(tmp) / "attestation.dsse.json").write_bytes(store.get_bytes(stored["attestation"]))
            # The chain is only evidence if it is the one that was signed with the model.
            verification.verify_model(model_dir, Path(tmp) / "model.sig", Path(tmp) / "attestation.dsse.json",
                                      trust=trust, expected_digest=found.model_digest)
            record = json.loads((model_dir / "training_record.json").read_text())
            train_sha = str((record.get("data") or {}).get("train_sha256") or "")
            train = store.get_dataframe(train_sha)
            report = verify_segments(model_dir, train, k=args.segments, run_id=secrets.token_hex(16),
                                     isolation=isolation, segments=args.segment)
    except Error as exc:
        _audit(settings, subject, "fail", {"version": found.version, "reason": exc.explain()})
        raise
    _audit(settings, subject, "pass" if report.passed else "fail", {"version": found.version, **report.metadata()})
    if not report.passed:
        raise VerificationError(f"{found.version}: {report.reason()}")
    print(f"{found.version}: {report.reason()}")
    return 0


def _audit(settings: Settings, subject: str, outcome: str, details: dict[str, object]) -> None:
    if settings.home.exists():
        settings.audit_log().record(settings.actor(), "verify.training", subject=subject, outcome=outcome,
                                    details=details)
