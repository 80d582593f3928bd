"""The release stage: the model registry and deployment, gated by policy, approval and verification.

registered_model registers the signed, attested model as a candidate (staging when everything but
the approval allows) and shows the promotion decision with every reason; production needs
``SECURE_ML_IDENTITY=KEY secure-ml approve VERSION`` by a second person. deployment deploys whatever
the registry says is production, through the deploy gate, when the run's identity may deploy it.
"""

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from resources import CustodyResource, verdict
from resources.release import ReleaseResource
from resources.security import signing_op_tags
from secure_ml.custody.integrity import list_tree
from secure_ml.errors import Error, VerificationError
from secure_ml.governance import code_identity
from secure_ml.release.deploy import Release
from secure_ml.release.deployed import ATTESTATION_FILE, MODEL_DIR, SIGNATURE_FILE
from secure_ml.release.evidence import evaluation_evidence, model_digest, pipeline_changers, scan_evidence
from secure_ml.security import verification

RELEASE = "release"
#: a deployment check run alone before anything is live: a warning, never a pass
NOTHING_DEPLOYED = "nothing is deployed: there is no live model to check"
REPO = Path(__file__).resolve().parents[1]


def _recorded(custody: CustodyResource, context: Any, key: str) -> dict[str, Any]:
    return custody.recorded(context.instance, dg.AssetKey(key))


def _training_facts(record: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    code = record.get("code") if isinstance(record.get("code"), dict) else {}
    commit = str(code.get("commit") or record.get("code_commit") or record.get("git_commit")
                 or recorded.get("code_commit") or "")
    email, name = code.get("author"), code.get("author_name")
    if not email and not name:
        email, name = code_identity.author_of(REPO, commit)
    # Both: the code-author rule matches either against the approver's names.
    return {"actor": str(record.get("actor") or recorded.get("actor") or ""), "code_commit": commit,
            "code_author": str(email) if email else None, "code_author_name": str(name) if name else None}


def _provenance(custody: CustodyResource, context: Any) -> dict[str, Any]:
    """Where the training data came from, and whether that source is approved now."""
    from secure_ml.governance.sources import ApprovedSources

    recorded = _recorded(custody, context, "dataset")
    source = str(recorded.get("source") or "")
    facts = {"source": source, "source_sha256": str(recorded.get("source_sha256") or ""),
             "data_actor": str(recorded.get("actor") or ""), "approved": False,
             "approved_source": str(recorded.get("approved_source") or "")}
    try:
        # Judged against today's list: a source withdrawn since ingestion no longer qualifies.
        facts["approved"] = ApprovedSources.from_settings(custody.settings()).require(source).name == \
            facts["approved_source"]
    except Error as exc:
        facts["why_not"] = exc.explain()
    return facts


def _versions_table(release: Release) -> str:
    rows = ["| version | stage | model digest | registered by | approvals |", "| --- | --- | --- | --- | --- |"]
    for v in release.registry.versions():
        approvals = ", ".join(a["identity"] for a in v.approvals) or "—"
        rows.append(f"| {v.version} | {v.stage} | `{v.model_digest[:16]}…` | {v.registered_by} | {approvals} |")
    return "\n".join(rows)


@dg.asset(group_name=RELEASE, kinds={"sqlite", "rego"}, owners=["team:ml-platform"], code_version="1",
          ins={"model_evaluation": dg.AssetIn(), "scan_report": dg.AssetIn()},
          deps=["trained_model", "model_signature", "attestation", "dataset"],
          op_tags=signing_op_tags())  # it signs the pipeline's statements about its products: the signing key's pod
def registered_model(context: dg.AssetExecutionContext, model_evaluation: dict[str, Any], scan_report: dict[str, Any],
                     custody: CustodyResource, release: ReleaseResource) -> dg.Output[Any]:
    """The model version in the registry (addressed by the digest its signature covers), its stage and
    approvals. Registered as a candidate and moved to staging only if the Rego promotion policy allows
    everything but the approval (evaluation, bias, scan, signature and attestation re-verified from the
    stored bytes, approved data source); production needs `secure-ml approve` by a second identity."""
    actor = custody.actor(context)
    tree = str(_recorded(custody, context, "trained_model")["sha256"])
    signature = _recorded(custody, context, "model_signature")
    envelope = _recorded(custody, context, "attestation")
    for name, recorded in (("model_signature", signature), ("attestation", envelope)):
        if recorded.get("model_sha256") != tree:
            reason = f"{name} is for model tree {str(recorded.get('model_sha256'))[:16]}…, not {tree[:16]}…"
            custody.record(context, "registry.register", subject=f"sha256:{tree}", outcome="deny",
                           details={"reason": reason})
            raise dg.Failure(f"refusing to register: {reason}")
    with tempfile.TemporaryDirectory(prefix="secure-ml-register-") as tmp:
        model_dir = Path(tmp) / "model"
        custody.store(context).get_tree(tree, model_dir)
        digest = model_digest(model_dir)
        record = json.loads((model_dir / "training_record.json").read_text()) \
            if "training_record.json" in list_tree(model_dir) else {}
    trained = _recorded(custody, context, "trained_model")
    evidence = {
        "store": {"model_tree": tree, "signature": str(signature["sha256"]), "attestation": str(envelope["sha256"])},
        "evaluation": evaluation_evidence(model_evaluation),
        "scan": scan_evidence(scan_report),
        "provenance": _provenance(custody, context),
        "training": _training_facts(record if isinstance(record, dict) else {}, trained),
        "run_id": context.run_id,
    }
    service = release.release(actor)
    try:
        version, staging, production = service.register(digest, evidence, actor=actor)
    except Error as exc:
        raise dg.Failure(exc.explain()) from None
    awaiting = staging.allowed and version.stage == "staging"
    next_step = (f"approve with `SECURE_ML_IDENTITY=<your key> secure-ml approve {version.version}` "
                 "(someone who neither added the data nor trained the model)" if awaiting
                 else "fix what the policy names, then run the pipeline again")
    value = {"version": version.version, "model_sha256": version.model_digest, "stage": version.stage,
             "approvals": list(version.approvals), "staging": staging.as_dict(), "production": production.as_dict()}
    context.log.info(f"registered {version.version} ({version.stage}); production: "
                     f"{'allowed' if production.allowed else '; '.join(production.reasons)}")
    return custody.output(context, value, metadata={
        "version": version.version,
        "stage": version.stage,
        "model_digest": version.model_digest,
        "staging_decision": dg.MetadataValue.md(staging.markdown()),
        "production_decision": dg.MetadataValue.md(production.markdown()),
        "deny_reasons": dg.MetadataValue.json(list(production.reasons)),
        "next_step": next_step,
        "registry": dg.MetadataValue.md(_versions_table(service)),
    })


@dg.asset_check(asset=registered_model, blocking=True)
def policy_allows(context: dg.AssetCheckExecutionContext, custody: CustodyResource,
                                   release: ReleaseResource) -> dg.AssetCheckResult:
    """The promotion policy allows this version everything but the approval (it reached staging or beyond)."""
    recorded = custody.recorded(context.instance, registered_model.key)
    version = release.release(custody.actor(context)).registry.get(str(recorded["version"]))
    decision = custody.store(context).get_json(str(recorded["sha256"]))["staging"]
    passed = bool(decision["allowed"]) and version.stage in ("staging", "production")
    reason = (f"{version.version} is {version.stage}: policy allows everything but the approval" if passed else
              f"{version.version} is {version.stage}: " + "; ".join(decision["reasons"]))
    return verdict(custody, context, check="policy_allows", subject=version.version,
                   passed=passed, reason=reason, metadata={"reasons": dg.MetadataValue.json(decision["reasons"])})


@dg.asset_check(asset=registered_model, blocking=True)
def separation_of_duties(context: dg.AssetCheckExecutionContext, custody: CustodyResource,
                                          release: ReleaseResource) -> dg.AssetCheckResult:
    """No recorded approval comes from whoever added the data or trained the model, and every approver
    holds the approver role today."""
    recorded = custody.recorded(context.instance, registered_model.key)
    service = release.release(custody.actor(context))
    version = service.registry.get(str(recorded["version"]))
    conflicted = {str(version.evidence.get("provenance", {}).get("data_actor") or ""),
                  str(version.evidence.get("training", {}).get("actor") or "")} - {""}
    bad = [a["identity"] for a in version.approvals
           if a["identity"] in conflicted or "approver" not in service.access.roles_of(a["identity"])]
    if bad:
        reason = f"approval(s) by {', '.join(bad)} break separation of duties (data: {', '.join(sorted(conflicted))})"
    elif version.approvals:
        reason = f"approved by {', '.join(a['identity'] for a in version.approvals)}, none of whom added the data " \
                 f"or trained the model"
    else:
        reason = f"no approvals yet; only an approver other than {', '.join(sorted(conflicted)) or 'the trainer'} " \
                 f"can approve {version.version}"
    return verdict(custody, context, check="separation_of_duties", subject=version.version,
                   passed=not bad, reason=reason,
                   metadata={"pipeline_changers": dg.MetadataValue.json(pipeline_changers(version))})


def _deployer(release: ReleaseResource, service: Release, actor: str) -> Any:
    """Who signs the deployment statement: the identity key in this process's environment, which must be
    the run's own verified launcher (None before a trust policy exists; the deploy then refuses without one)."""
    from secure_ml.errors import PolicyDenied
    from secure_ml.governance import authn

    if service.signed is None:
        return None
    settings = release.settings()
    by = authn.authenticate(settings, service.signed.policy)
    if by.identity is None:
        return None  # Release.deploy refuses and audits: a deployment is a signed decision
    if by.name != actor:
        settings.audit_log().record(by.name, "access.deny", outcome="deny",
                                    details={"reason": f"the run was launched by {actor}, the key is {by.name}'s"})
        raise PolicyDenied(f"the run was launched by {actor} but the identity key here is {by.name}'s: "
                           "a deployment is signed by whoever launched it")
    return by


@dg.asset(group_name=RELEASE, kinds={"kubernetes", "python"}, owners=["team:ml-platform"], code_version="1",
          deps=[registered_model], output_required=False)
def deployment(context: dg.AssetExecutionContext, custody: CustodyResource,
               release: ReleaseResource) -> Iterator[dg.Output[Any]]:
    """What is live where: materialised only when a model is deployed (here, through the deploy gate:
    signature and attestation re-verified from the stored bytes, registry says production, policy
    again, when the run's identity may deploy; or by `secure-ml deploy`), carrying the deployed version
    and model digest, so its freshness measures real deployments. Guarded by: deployed digest = signed
    digest, health check passes (both warn when nothing is deployed)."""
    actor = custody.actor(context)
    service = release.release(actor)
    target = str((service.config.get("deploy") or {}).get("default_target", "local"))
    production = service.registry.production()
    deployed_now = False
    reason = ""
    if production is None:
        reason = "no version is in production yet: it needs `secure-ml approve`"
    elif not service.access.decide(actor, "model.deploy").allowed:
        reason = f"{actor} may not deploy; a deployer runs `SECURE_ML_IDENTITY=<deployer key> secure-ml deploy`"
    else:
        current = service.registry.current_deployment(target)
        if current is None or current.version != production.version:
            try:
                # The same signed path as `secure-ml deploy`: a deployment statement by the run's own signer.
                service.deploy(production.version, actor=actor, target=target,
                               by=_deployer(release, service, actor))
            except Error as exc:
                custody.record(context, "deploy", subject=target, outcome="deny", details={"reason": exc.explain()})
                raise dg.Failure(description=exc.explain(), allow_retries=False) from None
            deployed_now = True
    if reason:
        custody.record(context, "deploy.skip", subject=target, outcome="deny", details={"reason": reason})
    current = service.registry.current_deployment(target)
    if current is None:
        context.log.info(f"nothing is deployed on {target}, so deployment is not materialised: {reason}")
        return
    recorded = _recorded_deployment(context.instance, context.asset_key)
    if not deployed_now and recorded == (current.version, current.model_digest, current.at):
        context.log.info(f"{current.version} is still what is live on {target} (deployed {current.at[:19]} by "
                         f"{current.actor}); nothing new to record{f': {reason}' if reason else ''}")
        return
    yield deployment_output(custody, context, service, target)


def _recorded_deployment(instance: dg.DagsterInstance, key: dg.AssetKey) -> tuple[str, str, str] | None:
    records = instance.fetch_materializations(key, limit=1).records
    if not records or records[0].asset_materialization is None:
        return None
    meta = {k: getattr(v, "value", v) for k, v in records[0].asset_materialization.metadata.items()}
    return str(meta.get("deployed_version")), str(meta.get("model_digest")), str(meta.get("deployed_at"))


def deployment_output(custody: CustodyResource, context: Any, service: Release, target: str) -> dg.Output[Any]:
    """The deployment asset's value and metadata for what is live on ``target`` now (also what
    `secure-ml deploy` reports to the instance)."""
    current = service.registry.current_deployment(target)
    assert current is not None
    history = [d.as_dict() for d in service.registry.deployments(target)][-20:]
    value = {"target": target, "status": "deployed", "deployed": current.as_dict(), "history": history}
    rows = ["| when | who | version | status | reason |", "| --- | --- | --- | --- | --- |"] + [
        f"| {d['at'][:19]} | {d['actor']} | {d['version']} | {d['status']} | {d['reason'][:80]} |" for d in history]
    return custody.output(context, value, metadata={
        "target": target,
        "deployed_version": current.version,
        "model_digest": current.model_digest,
        "deployed_at": current.at,
        "deployed_by": current.actor,
        "history": dg.MetadataValue.md("\n".join(rows)),
    })


@dg.asset_check(asset=deployment, blocking=True)
def deployed_digest_signed(context: dg.AssetCheckExecutionContext, custody: CustodyResource,
                                     release: ReleaseResource) -> dg.AssetCheckResult:
    """The files live on the target hash to the registry's signed digest, the signature verifies over
    them now, and (with a trust policy) a deployer's signed statement put that version there."""
    service = release.release(custody.actor(context))
    target = str((service.config.get("deploy") or {}).get("default_target", "local"))
    current = service.registry.current_deployment(target)
    if current is None:
        return verdict(custody, context, check="deployed_digest_signed", subject=target, passed=False,
                       reason=NOTHING_DEPLOYED, severity=dg.AssetCheckSeverity.WARN)
    location = Path(current.location)
    signer = ""
    try:
        version = service.registry.get(current.version)
        registered = version.model_digest
        if current.model_digest != registered:
            raise VerificationError(f"the deployment record says sha256:{current.model_digest[:16]}…, "
                                    f"the registry signed sha256:{registered[:16]}…")
        if service.signed is not None:  # a deployment row is believed only with a signed statement behind it
            signer = service.signed.require_signed_deployment(version, target).signer
        # The one chain, over the files live on the target now, pinned to the registry's digest.
        verified = verification.verify_model(location / MODEL_DIR, location / SIGNATURE_FILE,
                                             location / ATTESTATION_FILE, trust=service.trust,
                                             expected_digest=registered)
    except Error as exc:
        return verdict(custody, context, check="deployed_digest_signed", subject=current.version,
                       passed=False, reason=exc.explain())
    deployed_by = f"; deployment signed by {signer}" if service.signed is not None else ""
    return verdict(custody, context, check="deployed_digest_signed", subject=current.version, passed=True,
                   reason=f"{current.version} on {target} is sha256:{verified.model_digest[:16]}…, signed and verified"
                          f"{deployed_by}")


@dg.asset_check(asset=deployment, blocking=True)
def deployment_healthy(context: dg.AssetCheckExecutionContext, custody: CustodyResource,
                       release: ReleaseResource) -> dg.AssetCheckResult:
    """The live local deployment loads the way the server loads it and answers a representative row."""
    from secure_ml.release import serving

    service = release.release(custody.actor(context))
    current = service.registry.current_deployment("local")
    if current is None:
        return verdict(custody, context, check="deployment_healthy", subject="local", passed=False,
                       reason=NOTHING_DEPLOYED, severity=dg.AssetCheckSeverity.WARN)
    try:
        result = serving.health_probe(current.location, trust=service.trust)
    except Error as exc:
        return verdict(custody, context, check="deployment_healthy", subject=current.version, passed=False,
                       reason=exc.explain())
    return verdict(custody, context, check="deployment_healthy", subject=current.version, passed=result.healthy,
                   reason=result.reason)
