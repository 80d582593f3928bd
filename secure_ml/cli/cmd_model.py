"""Model security from the command line: scan, verify, export.

    secure-ml scan PATH [--foreign] [--json]          model files (exit 1 on a blocking finding)
    secure-ml verify-model MODEL_DIR --signature SIG [--public-key PEM | --identity ID --issuer URL]
                           [--digest sha256:<hex>]   also pin the directory's tree digest (k8s init container)
    secure-ml verify-attestation ENVELOPE --model MODEL_DIR --signature SIG [--public-key PEM]
    secure-ml model export [VERSION] DIR              decrypt, verify, write model + bundle + attestation + key
    secure-ml model add NAME --data SAMPLE --label COL (--protected A,B | --no-protected REASON)   (model_add.py)

verify-model, verify-attestation and export run the one verification chain
(secure_ml.security.verification), the same the deploy gate, the security checks and the server run.
Without ``--public-key`` / ``--identity``, trust comes from security.yaml (trusted keys and
identities), never from the bundle itself. Everything here runs offline, Sigstore bundles
included (sigstore-python's shipped trusted root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from secure_ml.cli import model_add
from secure_ml.custody.integrity import SHA256_HEX, tree_digest
from secure_ml.errors import BadInput, VerificationError
from secure_ml.security import scanning, signing, verification
from secure_ml.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    scan = sub.add_parser("scan", help="scan a model file or directory (exit 1 on a blocking finding)")
    scan.add_argument("path", type=Path)
    scan.add_argument("--foreign", action="store_true",
                      help="a model from elsewhere: pickles are scanned (modelscan + fickling), not refused outright")
    scan.add_argument("--json", action="store_true", help="print the report as JSON")
    scan.set_defaults(handler=cmd_scan)

    verify = sub.add_parser("verify-model", help="verify a model directory against its signature bundle")
    verify.add_argument("model_dir", type=Path)
    verify.add_argument("--signature", type=Path, required=True)
    verify.add_argument("--digest", help="sha256:<64 hex> the model directory's tree digest must equal "
                                          "(integrity.tree_digest; what the Kubernetes init container pins)")
    _trust_args(verify)
    verify.set_defaults(handler=cmd_verify_model)

    attest = sub.add_parser("verify-attestation", help="verify a DSSE provenance envelope and its subjects")
    attest.add_argument("envelope", type=Path)
    attest.add_argument("--model", type=Path, required=True, help="the model directory it attests")
    attest.add_argument("--signature", type=Path, required=True, help="the model's signature bundle")
    attest.add_argument("--public-key", type=Path, action="append", help="trusted public key PEM (repeatable)")
    attest.set_defaults(handler=cmd_verify_attestation)

    model = sub.add_parser("model", help="model artifacts")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    export = model_sub.add_parser("export", help="write a verified model with its signature, attestation and key")
    export.add_argument("args", nargs="+", metavar="[VERSION] DIR")
    export.set_defaults(handler=cmd_export)
    model_add.register(model_sub)


def _trust_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--public-key", type=Path, action="append", help="trusted public key PEM (repeatable)")
    parser.add_argument("--identity", help="trusted Sigstore signer identity (with --issuer)")
    parser.add_argument("--issuer", help="OIDC issuer of --identity")


def _settings() -> Settings:
    return Settings.from_env()


def _trust(args: argparse.Namespace, settings: Settings) -> signing.TrustPolicy:
    if bool(args.identity) != bool(args.issuer):
        raise BadInput("--identity and --issuer go together")
    if args.public_key or args.identity:
        return signing.TrustPolicy.of(public_keys=args.public_key or [],
                                      identities=[(args.identity, args.issuer)] if args.identity else [])
    return signing.TrustPolicy.from_config(settings.load_config("security"), settings.home)


def _audit(settings: Settings, action: str, subject: str, outcome: str, details: dict[str, Any]) -> None:
    if settings.home.exists():
        settings.audit_log().record(settings.actor(), action, subject=subject, outcome=outcome, details=details)


def cmd_scan(args: argparse.Namespace) -> int:
    path: Path = args.path
    if not path.exists():
        raise BadInput(f"not found: {path}")
    settings = _settings()
    policy = scanning.ScanPolicy.from_config(settings.load_config("security"))
    if path.is_dir() and not args.foreign:
        findings = scanning.scan_model_dir(path)
    else:
        findings = scanning.scan_foreign(path)
    report = policy.report(findings, path=str(path))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        counts = ", ".join(f"{n} {s}" for s, n in report["counts"].items() if n) or "no findings"
        print(f"{path}: {counts}")
        for row in report["findings"]:
            mark = "BLOCK" if row["blocking"] else "     "
            print(f"  {mark} {row['severity']:<8} {row['where']}: {row['why']}")
    _audit(settings, "scan.cli", str(path.absolute()), "deny" if report["blocking"] else "allow",
           {"counts": report["counts"]})
    if report["blocking"]:
        print(f"secure-ml: {report['blocking_count']} blocking finding(s) in {path}", file=sys.stderr)
        return 1
    return 0


def _pinned_digest(value: str | None) -> str | None:
    """The 64-hex digest of ``--digest sha256:<hex>`` (as k8s_render pins it), or BadInput."""
    if value is None:
        return None
    hexpart = value[len("sha256:"):] if value.startswith("sha256:") else ""
    if not SHA256_HEX.match(hexpart):
        raise BadInput(f"--digest must be sha256:<64 lowercase hex>, not {value[:80]!r}")
    return hexpart


def cmd_verify_model(args: argparse.Namespace) -> int:
    pinned = _pinned_digest(args.digest)
    settings = _settings()
    try:
        verified = verification.verify_model(args.model_dir, args.signature, None, trust=_trust(args, settings),
                                             expected_digest=pinned)
    except VerificationError as exc:
        _audit(settings, "verify.model", str(args.model_dir.absolute()), "fail", {"reason": exc.explain()})
        raise
    details = {"signer": verified.signer} | ({"digest": f"sha256:{pinned}"} if pinned else {})
    _audit(settings, "verify.model", str(args.model_dir.absolute()), "pass", details)
    pin = f", tree digest sha256:{pinned[:16]}… as pinned" if pinned else ""
    print(f"verified: {len(verified.files)} files in {args.model_dir} signed by {verified.signer}{pin}")
    return 0


def cmd_verify_attestation(args: argparse.Namespace) -> int:
    settings = _settings()
    keys = args.public_key or list(signing.TrustPolicy.from_config(settings.load_config("security"), settings.home).public_keys)
    try:
        if not args.envelope.is_file():
            raise BadInput(f"attestation not found: {args.envelope}")
        # The subjects must be this model as signed: the whole chain, signature first.
        verified = verification.verify_model(args.model, args.signature, args.envelope,
                                             trust=signing.TrustPolicy.of(public_keys=keys))
    except VerificationError as exc:
        _audit(settings, "verify.attestation", str(args.envelope.absolute()), "fail", {"reason": exc.explain()})
        raise
    facts = verified.attestation
    _audit(settings, "verify.attestation", str(args.envelope.absolute()), "pass", {"invocation": facts["invocation"]})
    print(f"verified: SLSA provenance signed by {facts['verified_by']}; {facts['subjects']} subjects "
          f"match; builder {facts['builder']}, run {facts['invocation']}")
    return 0


def _stored_digests(settings: Settings, version: str | None) -> tuple[str, str, str, str, str | None]:
    """(label, model tree, signature, attestation, pinned model digest): a registry version or the latest run.

    A registry version pins the digest the registry holds; the latest run pins nothing beyond the
    store's own manifest (the store checks every file against it as it decrypts)."""
    if version:
        from secure_ml.release.registry import Registry

        found = Registry.from_settings(settings).for_model(None).get(version)
        stored = found.evidence.get("store") or {}
        if not all(stored.get(k) for k in ("model_tree", "signature", "attestation")):
            raise VerificationError(f"{version} has no stored model, signature and attestation")
        return found.version, stored["model_tree"], stored["signature"], stored["attestation"], found.model_digest
    os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home))
    import dagster as dg

    digests = []
    with dg.DagsterInstance.get() as instance:
        for key in ("trained_model", "model_signature", "attestation"):
            records = instance.fetch_materializations(dg.AssetKey(key), limit=1).records
            if not records or records[0].asset_materialization is None:
                raise BadInput(f"{key} has never been materialized: run the pipeline first")
            digests.append(str(records[0].asset_materialization.metadata["sha256"].value))
    return "latest", digests[0], digests[1], digests[2], None


def cmd_export(args: argparse.Namespace) -> int:
    if len(args.args) > 2:
        raise BadInput("usage: secure-ml model export [VERSION] DIR")
    version, target = (args.args[0], Path(args.args[1])) if len(args.args) == 2 else (None, Path(args.args[0]))
    if target.exists():
        raise BadInput(f"output exists: {target}")
    settings = _settings()
    label, tree, signature_digest, attestation_digest, pinned = _stored_digests(settings, version)
    store = settings.artifact_store()
    trust = signing.TrustPolicy.from_config(settings.load_config("security"), settings.home)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    try:
        store.get_tree(tree, staging / "model")
        (staging / "model.sig").write_bytes(store.get_bytes(signature_digest))
        (staging / "attestation.dsse.json").write_bytes(store.get_bytes(attestation_digest))
        # Verify before anything appears under DIR: the export is all or nothing.
        verified = verification.verify_model(staging / "model", staging / "model.sig",
                                             staging / "attestation.dsse.json", trust=trust,
                                             expected_digest=pinned or tree_digest(store.tree_files(tree)))
        for index, key in enumerate(trust.public_keys):
            if key.exists():
                shutil.copyfile(key, staging / ("signing-key.pub" if index == 0 else f"signing-key-{index}.pub"))
        os.rename(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, VerificationError):
            _audit(settings, "model.export", f"sha256:{tree}", "fail", {"reason": exc.explain()})
        raise
    _audit(settings, "model.export", f"sha256:{tree}", "ok", {"version": label, "to": str(target.absolute())})
    print(f"exported {label} to {target}: model/ ({len(verified.files)} files), model.sig, attestation.dsse.json, "
          f"signing-key.pub (verified: signed by {verified.signer})")
    return 0
