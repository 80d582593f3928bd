"""The security stage: nothing leaves training unscanned, unsigned or unattested.

scan_report -> model_signature -> attestation, each guarded by a blocking check that verifies
from the store (never from a path or from metadata alone), so a failed check stops every
asset after it (registration, deployment).
"""


import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from resources import CustodyResource, verdict
from resources.scan_sandbox import sandboxed_model_scan
from resources.security import SigningResource, signing_op_tags
from secure_ml.custody.integrity import sha256_file, tree_digest
from secure_ml.errors import BadInput, Error
from secure_ml.governance import code_identity
from secure_ml.security import attestation as provenance
from secure_ml.security import scanning, verification
from secure_ml.security.sbom import DatasetRef
from secure_ml.training.policy import IsolationPolicy

SECURITY = "security"
REPO = Path(__file__).resolve().parents[1]
TRAINED_MODEL = dg.AssetKey("trained_model")


@contextmanager
def _model_dir(context: Any, custody: CustodyResource, tree_sha256: str) -> Iterator[Path]:
    """The model's files decrypted from the store (each verified) into a private temp dir."""
    with tempfile.TemporaryDirectory(prefix="secure-ml-model-") as tmp:
        target = Path(tmp) / "model"
        custody.store(context).get_tree(tree_sha256, target)
        yield target


def _recorded_or_none(custody: CustodyResource, context: Any, key: str) -> dict[str, Any] | None:
    try:
        return custody.recorded(context.instance, dg.AssetKey(key))
    except dg.Failure:
        return None


def _dataset_refs(custody: CustodyResource, context: Any) -> list[dict[str, Any]]:
    """ResourceDescriptors for the data the model was trained on, from the recorded materializations."""
    refs = []
    for key in ("dataset", "validated_dataset"):
        recorded = _recorded_or_none(custody, context, key)
        if recorded and recorded.get("sha256"):
            refs.append({"name": key, "uri": f"secure-ml://artifacts/sha256:{recorded['sha256']}",
                         "digest": {"sha256": str(recorded["sha256"])},
                         "annotations": {"dvc_version": str(recorded.get("dvc_version") or "")}})
    return refs


@dg.asset(group_name=SECURITY, kinds={"json", "cyclonedx"}, owners=["team:security"], code_version="1",
          ins={"trained_model": dg.AssetIn()})
def scan_report(context: dg.AssetExecutionContext, trained_model: dict[str, Any], custody: CustodyResource,
                signing: SigningResource) -> dg.Output[Any]:
    """Model file scan (safetensors/JSON only, headers validated, no pickle under any name), pip-audit of
    the lock file, bandit over the pipeline code, and a CycloneDX SBOM. Guarded by: no finding at or over
    the blocking severity."""
    tree = str(trained_model["sha256"])
    config = signing.config()
    datasets = _dataset_refs(custody, context)
    store = custody.store(context)
    # Dependency audit and bandit results are reused while the lock, advisories and code are unchanged.
    cache = scanning.ScanCache(store, custody.settings().home / "cache" / "scans")
    try:
        # The model files are untrusted input: their scanners run in the training sandbox (no KEK, no keys).
        # (On Kubernetes, isolation.backend kubernetes, the step's own pod is the boundary: no user namespaces there.)
        policy = IsolationPolicy.from_mapping(custody.settings().load_config("training").get("isolation"))
        home = custody.settings()
        secrets = [home.keyring_path, home.keys_dir, home.home / "keys" / "model-signing.pem",
                   f"/proc/{os.getpid()}/environ"]
        in_sandbox = sandboxed_model_scan(policy, must_not_reach=[str(p) for p in secrets]) \
            if policy.backend == "local" else None
        with _model_dir(context, custody, tree) as model_dir:
            report, sbom_document = scanning.release_scan(
                model_dir, config, repo_root=REPO, model_name=f"secure-ml-model@{tree[:12]}", cache=cache,
                model_scan=in_sandbox,
                datasets=[DatasetRef(d["name"], d["digest"]["sha256"], d["annotations"]["dvc_version"]) for d in datasets])
    except Error as exc:
        custody.record(context, "scan.model", subject=f"sha256:{tree}", outcome="fail", details={"reason": exc.explain()})
        raise dg.Failure(exc.explain()) from None
    sbom = custody.seal(context, sbom_document.encode(), role="sbom")
    report["model_sha256"] = tree
    report["model_scan_isolation"] = ({"level": in_sandbox.isolation.get("level"), "uid": in_sandbox.seen.get("uid")}
                                      if in_sandbox is not None else {"level": "pod"})
    custody.record(context, "scan.model", subject=f"sha256:{tree}", outcome="deny" if report["blocking"] else "allow",
                   details={"counts": report["counts"], "blocking": report["blocking_count"], "sbom_sha256": sbom.sha256})
    return custody.output(context, report, metadata={
        "summary": dg.MetadataValue.md(scanning.summary_markdown(report)),
        "blocking": report["blocking"],
        "counts": dg.MetadataValue.json(report["counts"]),
        "model_sha256": tree,
        "sbom_sha256": sbom.sha256,
        "sbom_components": sbom_document.count('"bom-ref"'),
        "vulnerability_source": report["vulnerability_source"],
        "scan_cache": dg.MetadataValue.json(cache.summary()),
    })


@dg.asset_check(asset=scan_report, blocking=True)
def scan_report_clear(context: dg.AssetCheckExecutionContext, custody: CustodyResource) -> dg.AssetCheckResult:
    """No finding at or over the blocking severity (code: medium and above)."""
    recorded = custody.recorded(context.instance, scan_report.key)
    report = custody.store(context).get_json(recorded["sha256"])
    blocking = list(scanning.iter_blocking(report))
    subject = f"sha256:{report.get('model_sha256', '')}"
    if blocking:
        reason = f"{len(blocking)} blocking finding(s): " + "; ".join(
            f"{row['where']}: {row['why']}" for row in blocking[:3])
    else:
        reason = f"no finding at or over {report['blocking_severity']} ({json.dumps(report['counts'])})"
    return verdict(custody, context, check="scan_report_clear", subject=subject, passed=not blocking,
                   reason=reason[:900], metadata={"blocking_findings": len(blocking)})


@dg.asset(group_name=SECURITY, kinds={"sigstore"}, owners=["team:security"], code_version="1",
          ins={"trained_model": dg.AssetIn(), "scan_report": dg.AssetIn()},
          op_tags=signing_op_tags())  # on Kubernetes this step's pod alone (with attestation's) mounts the signing key
def model_signature(context: dg.AssetExecutionContext, trained_model: dict[str, Any], scan_report: dict[str, Any],
                    custody: CustodyResource, signing: SigningResource) -> dg.Output[Any]:
    """The OpenSSF model-signing bundle over the model directory (local ECDSA key by default, Sigstore
    keyless by configuration). Guarded by: verifies against the trusted keys or identities in config."""
    tree = str(trained_model["sha256"])
    # Gate: only the model that was scanned, and scanned clean, is signed.
    if scan_report.get("model_sha256") != tree or scan_report.get("blocking"):
        reason = ("the scan report is for another model" if scan_report.get("model_sha256") != tree
                  else "the scan report has blocking findings")
        custody.record(context, "sign.model", subject=f"sha256:{tree}", outcome="deny", details={"reason": reason})
        raise dg.Failure(f"refusing to sign: {reason}")
    # Signed from the custody digests: the store hashed each file as it encrypted it and checks that
    # digest on every read (the verify check below, a deploy, an export), so nothing is hashed twice.
    with tempfile.TemporaryDirectory() as tmp:
        try:
            bundle = signing.sign_files(custody.store(context).tree_files(tree), Path(tmp) / "model.sig")
        except Error as exc:
            custody.record(context, "sign.model", subject=f"sha256:{tree}", outcome="fail",
                           details={"reason": exc.explain()})
            raise dg.Failure(exc.explain()) from None
    method = signing.method()
    custody.record(context, "sign.model", subject=f"sha256:{tree}",
                   details={"method": method, "bundle_sha256": hashlib.sha256(bundle).hexdigest()})
    return custody.output(context, bundle, metadata={"model_sha256": tree, "method": method,
                                                     "media_type": signing_media_type(bundle)})


def signing_media_type(bundle: bytes) -> str:
    try:
        return str(json.loads(bundle).get("mediaType", ""))
    except ValueError:
        return ""


@dg.asset_check(asset=model_signature, blocking=True)
def model_signature_verifies(context: dg.AssetCheckExecutionContext, custody: CustodyResource,
                             signing: SigningResource) -> dg.AssetCheckResult:
    """The bundle verifies over the model's files (decrypted from the store) against the trusted keys
    or identities in security.yaml, and it is the signature of the current trained_model."""
    recorded = custody.recorded(context.instance, model_signature.key)
    model_tree = str(custody.recorded(context.instance, TRAINED_MODEL)["sha256"])
    subject = f"sha256:{model_tree}"
    try:
        verified = _verify_stored(context, custody, signing, model_tree, str(recorded["sha256"]), None)
    except Error as exc:
        return verdict(custody, context, check="model_signature_verifies", subject=subject, passed=False,
                       reason=exc.explain())
    return verdict(custody, context, check="model_signature_verifies", subject=subject, passed=True,
                   reason=f"{len(verified.files)} files verified; signed by {verified.signer}",
                   metadata={"signer": verified.signer, "method": verified.method})


def _verify_stored(context: Any, custody: CustodyResource, signing: SigningResource, model_tree: str,
                   bundle_sha256: str, envelope_sha256: str | None) -> verification.VerifiedModel:
    """The verification chain over the stored model, bundle (and attestation), decrypted from the store.

    Pinned to the tree digest of the store's manifest for ``model_tree``: the files verified are the
    current trained_model's.
    """
    store = custody.store(context)
    bundle = store.get_bytes(bundle_sha256)
    envelope = None if envelope_sha256 is None else store.get_bytes(envelope_sha256)
    pinned = tree_digest(store.tree_files(model_tree))
    with _model_dir(context, custody, model_tree) as model_dir:
        return verification.verify_model(model_dir, bundle, envelope, trust=signing.trust(), expected_digest=pinned)


@dg.asset(group_name=SECURITY, kinds={"slsa", "in-toto"}, owners=["team:security"], code_version="1",
          ins={"trained_model": dg.AssetIn(), "model_signature": dg.AssetIn()},
          op_tags=signing_op_tags())  # it signs the run's provenance with the pipeline key
def attestation(context: dg.AssetExecutionContext, trained_model: dict[str, Any], model_signature: bytes,
                custody: CustodyResource, signing: SigningResource) -> dg.Output[Any]:
    """A signed in-toto Statement (SLSA provenance v1) for this run: subjects are the model files and the
    signature bundle; code commit, lock digest, configuration, hyper-parameters, dataset digests with DVC
    versions, builder and run id. Guarded by: verifies, and its subjects match the signed model."""
    tree = str(trained_model["sha256"])
    store = custody.store(context)
    files = store.tree_files(tree)
    hyper = _hyperparameters(store, files)
    run = context.instance.get_run_record_by_id(context.run_id)
    started = datetime.fromtimestamp(run.start_time, UTC).isoformat() if run and run.start_time else _now()
    config = signing.config()
    build = provenance.BuildInfo(
        builder_id=str(config.get("attestation", {}).get("builder_id", "https://secure-ml.local/dagster/local")),
        invocation_id=context.run_id, started_on=started, finished_on=_now(),
        code_commit=code_identity.commit_of(REPO), code_repository=str(REPO.name),
        lock_sha256=sha256_file(REPO / "requirements.lock") if (REPO / "requirements.lock").exists() else "",
        config={"security": config, "model_sha256": tree}, hyperparameters=hyper,
        dependencies=_dataset_refs(custody, context), byproducts=_byproducts(custody, context),
    )
    statement = provenance.provenance_statement(files, hashlib.sha256(model_signature).hexdigest(), build=build)
    envelope = signing.sign_statement(statement)
    custody.record(context, "attest.model", subject=f"sha256:{tree}",
                   details={"subjects": len(statement["subject"]), "builder": build.builder_id})
    return custody.output(context, envelope, metadata={
        "model_sha256": tree, "subjects": len(statement["subject"]), "builder_id": build.builder_id,
        "code_commit": build.code_commit, "lock_sha256": build.lock_sha256,
        "predicate_type": provenance.SLSA_PROVENANCE,
    })


@dg.asset_check(asset=attestation, blocking=True)
def attestation_verifies(context: dg.AssetCheckExecutionContext, custody: CustodyResource,
                         signing: SigningResource) -> dg.AssetCheckResult:
    """The whole chain over the current model as stored: its signature verifies, and the DSSE envelope
    verifies against a trusted key with subjects exactly the model's files and its signature bundle."""
    recorded = custody.recorded(context.instance, attestation.key)
    model_tree = str(custody.recorded(context.instance, TRAINED_MODEL)["sha256"])
    bundle_sha = str(custody.recorded(context.instance, model_signature.key)["sha256"])
    subject = f"sha256:{model_tree}"
    try:
        verified = _verify_stored(context, custody, signing, model_tree, bundle_sha, str(recorded["sha256"]))
    except Error as exc:
        return verdict(custody, context, check="attestation_verifies", subject=subject, passed=False,
                       reason=exc.explain())
    return verdict(custody, context, check="attestation_verifies", subject=subject, passed=True,
                   reason=f"signed by {verified.attestation['verified_by']}; {verified.attestation['subjects']} "
                          "subjects match the signed model")


def _byproducts(custody: CustodyResource, context: Any) -> list[dict[str, Any]]:
    """The scan report and SBOM this run produced for the model (store digests)."""
    recorded = _recorded_or_none(custody, context, "scan_report")
    if not recorded:
        return []
    return [{"name": "scan_report", "digest": {"sha256": str(recorded["sha256"])}, "mediaType": "application/json"},
            {"name": "sbom.cdx.json", "digest": {"sha256": str(recorded.get("sbom_sha256", ""))},
             "mediaType": "application/vnd.cyclonedx+json"}]


def _hyperparameters(store: Any, files: dict[str, str]) -> dict[str, Any]:
    if "training_record.json" not in files:
        return {}
    try:
        record = store.get_json(files["training_record.json"])
    except BadInput:
        return {}
    if not isinstance(record, dict):
        return {}
    for key in ("hyperparameters", "params", "hyper_parameters"):
        if isinstance(record.get(key), dict):
            return dict(record[key])
    return {}


def _now() -> str:
    return datetime.now(UTC).isoformat()
