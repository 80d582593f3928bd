"""Releasing a model: registration, approval, promotion, the deploy gate, deployment and rollback.

    release = Release.from_settings(settings)                   # registry + policies + trust + roles
    version, staging, production = release.register(model_digest, evidence, actor="bob")  # candidate -> staging?
    release.approve("v1", identity="carol")                     # SoD + roles; promotes to production if allowed
    record = release.deploy("production", actor="dave")         # verify from bytes, then write; health check
    release.rollback(actor="dave")                              # previous verified version, re-verified

The deploy gate (:meth:`Release.gate`, secure_ml.release.gate) runs before anything is written to
a target: roles and the deployment policy, then the one verification chain over the bytes
decrypted from the store, pinned to the registry's digest, then the promotion policy again. Any
failure is audited and raises, and no target is touched. The policy inputs are built in
secure_ml.release.evidence.

Targets (secure_ml.release.targets, one module each behind one protocol): ``local`` (default; a
verified model directory under ``$SECURE_ML_HOME/deployments/local`` and a ``current.json`` pointer
the local server reads) and ``kubernetes`` (rendered manifests, validated in strict mode and by the
admission policy, beside the verified model directory to be copied onto the models volume). After
a deploy the target's health check runs (local: load the model the way the server does and predict
one row); a failure rolls back by itself and records why.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from secure_ml.custody.audit import AuditLog
from secure_ml.custody.store import ArtifactStore
from secure_ml.errors import BadInput, ConfigurationError, Error, PolicyDenied, VerificationError
from secure_ml.governance.access import AccessPolicy
from secure_ml.governance.policy import PolicyDecision, PolicyEngine
from secure_ml.release import targets
from secure_ml.release.deployed import (
    ATTESTATION_FILE,
    DEFAULT_MODEL_NAME,
    MODEL_DIR,
    RECEIPT_FILE,
    SIGNATURE_FILE,
    HealthResult,
    live_models,
    served_name,
)
from secure_ml.release.evidence import promotion_input
from secure_ml.release.gate import DeployGate, VerifiedVersion
from secure_ml.release.registry import Deployment, ModelVersion, Registry
from secure_ml.release.targets import DeployTarget
from secure_ml.security.verification import TrustPolicy


class _Settings(Protocol):
    @property
    def home(self) -> Path: ...
    def load_config(self, name: str) -> dict[str, Any]: ...
    def audit_log(self) -> AuditLog: ...
    def artifact_store(self, *, actor: str | None = None) -> ArtifactStore: ...


# -- the release service -------------------------------------------------------------------------
class Release:
    """Registry, policy, roles, trust, store and audit log: every release decision goes through here."""

    def __init__(self, *, home: Path, registry: Registry, engine: PolicyEngine, access: AccessPolicy,
                 store: ArtifactStore, audit: AuditLog, trust: TrustPolicy | Callable[[], TrustPolicy],
                 config: Mapping[str, Any] | None = None, signed: Any = None) -> None:
        self.home = Path(home)
        # Once a trust policy exists: decisions are signed statements and the registry only an index.
        self.signed = signed
        self.registry = registry
        self.engine = engine
        self.access = access
        self.store = store
        self.audit = audit
        self.config = dict(config or {})
        self.default_model: str | None = None  # from_settings sets it (deployments_dir)
        self.gatekeeper = DeployGate(home=self.home, registry=registry, engine=engine, access=access, store=store,
                                     audit=audit, trust=trust)

    @classmethod
    def from_settings(cls, settings: _Settings, *, trust: TrustPolicy | None = None,
                      actor: str | None = None) -> Release:
        from secure_ml.release.signed import SignedDecisions, TrustedRegistry
        from secure_ml.settings import Settings

        config = settings.load_config("release")
        signed = SignedDecisions.for_settings(settings) if isinstance(settings, Settings) else None
        registry = Registry.from_settings(settings)
        if signed is not None:
            registry = TrustedRegistry(registry.path, signed, model=registry.model)
        release = cls(home=settings.home, registry=registry, signed=signed,
                   engine=PolicyEngine.from_settings(settings, lazy=True), access=AccessPolicy.from_settings(settings),
                   store=settings.artifact_store(actor=actor), audit=settings.audit_log(),
                   trust=trust or (lambda: TrustPolicy.from_config(settings.load_config("security"), settings.home)),
                   config=config)
        chosen = getattr(settings, "config", None)
        release.default_model = getattr(chosen, "default_model", None)
        return release

    @property
    def trust(self) -> TrustPolicy:
        """Whom the verification chain believes (resolved lazily: status and approve need no signer config)."""
        return self.gatekeeper.trust

    @property
    def deployments_dir(self) -> Path:
        """Where this model's deployments live: ``deployments/`` for the default model (as before),
        ``deployments/models/NAME/`` for another, so two models never share a target directory."""
        model, default = self.registry.model, getattr(self, "default_model", None)
        if model is None or default is None or model == default:
            return self.home / "deployments"
        return self.home / "deployments" / "models" / model

    def verify(self, version: ModelVersion, *, actor: str) -> VerifiedVersion:
        """The version's stored bytes through the verification chain (:meth:`DeployGate.verify`)."""
        return self.gatekeeper.verify(version, actor=actor)

    def gate(self, ref: str, *, actor: str, target: str, permission: str = "model.deploy") -> VerifiedVersion:
        """Everything that must hold before a byte is written to ``target`` (:meth:`DeployGate.check`)."""
        return self.gatekeeper.check(ref, actor=actor, target=target, permission=permission)


    # -- registration and promotion ------------------------------------------------------------
    def register(self, model_dir_digest: str, evidence: Mapping[str, Any], *,
                 actor: str) -> tuple[ModelVersion, PolicyDecision, PolicyDecision]:
        """Register a candidate, verify it from the stored bytes, promote to staging if policy allows.

        Returns the version and the staging and production decisions (the production one names
        what is still missing, normally the approval by a second identity).
        """
        self.access.require(actor, "model.register", audit=self.audit, subject=f"sha256:{model_dir_digest}")
        version, created = self.registry.register(model_dir_digest, evidence, actor=actor)
        if self.signed is not None and "training" not in self.signed.evidence(version).products:
            self.signed.sign_products(version, evidence, actor=actor)  # the pipeline signs what it produced
            version = self.registry.get(version.version)
        if created:
            self.audit.record(actor, "registry.register", subject=f"{version.version} sha256:{version.model_digest}",
                              details={"stage": "candidate"})
        signature, attestation = self.gatekeeper.verification_facts(version, actor=actor)
        staging = self.decide(version, "staging", signature=signature, attestation=attestation, actor=actor)
        production = self.decide(version, "production", signature=signature, attestation=attestation, actor=actor)
        self._remember_decision(version, production)
        if staging.allowed and version.stage == "candidate":
            version = self.registry.set_stage(version.version, "staging", actor=actor, expect=("candidate",),
                                              reason="promotion policy allows staging; production awaits approval")
            self.audit.record(actor, "model.promote", subject=version.version, outcome="allow",
                              details={"to": "staging", "input_sha256": staging.input_sha256})
        elif not staging.allowed:
            self.audit.record(actor, "model.promote", subject=version.version, outcome="deny",
                              details={"to": "staging", "reasons": list(staging.reasons)})
        return version, staging, production

    def decide(self, version: ModelVersion, stage: str, *, signature: Mapping[str, Any],
               attestation: Mapping[str, Any], actor: str) -> PolicyDecision:
        """Evaluate the promotion policy for ``stage``; the decision and every reason are audited."""
        decision = self.engine.decide("promotion", promotion_input(
            version, target_stage=stage, signature=signature, attestation=attestation, access=self.access))
        self.audit.record(actor, "policy.promotion", subject=f"{version.version} -> {stage}",
                          outcome="allow" if decision.allowed else "deny",
                          details={"reasons": list(decision.reasons), "input_sha256": decision.input_sha256})
        return decision

    def approve(self, ref: str, *, identity: str = "", by: Any = None) -> tuple[ModelVersion, PolicyDecision]:
        """``identity`` approves a version; promoted to production when the policy then allows.

        Denied (audited, PolicyDenied) when the identity is not an approver, added the data,
        trained the model, already approved, or the version is not awaiting approval. With a
        trust policy the approver is ``by`` (an authenticated actor) and the approval is signed.
        """
        if self.signed is not None:
            by = self.signed.require_actor(by, "an approval")
            identity = by.name
        version = self.registry.get(ref)
        subject = f"{version.version} sha256:{version.model_digest}"
        evidence = version.evidence
        access = self.access.decide(identity, "model.approve")
        self.audit.record(identity, "access.allow" if access.allowed else "access.deny", subject=subject,
                          outcome="allow" if access.allowed else "deny",
                          details={"permission": "model.approve", "roles": list(access.roles), "reason": access.reason})
        sod = self.engine.decide("approval", {
            "version": version.version, "stage": version.stage,
            "approver": {"identity": identity, "roles": list(self.access.roles_of(identity))},
            "provenance": evidence.get("provenance") or {}, "training": evidence.get("training") or {},
            "approvals": [{"identity": a["identity"]} for a in version.approvals],
        })
        # Every reason at once: a person denied for two reasons should not have to find the second.
        reasons = [*([] if access.allowed else [access.reason]),
                   *(r for r in sod.reasons if access.allowed or "is not an" not in r),
                   *(self.signed.code_author_conflicts(version, identity) if self.signed is not None else [])]
        if reasons:
            self.audit.record(identity, "model.approve", subject=subject, outcome="deny", details={"reasons": reasons})
            self.registry.record_event(identity, "approve.denied", version.version, {"reasons": reasons})
            raise PolicyDenied(f"{identity} may not approve {version.version}: " + "; ".join(reasons))
        if self.signed is not None:
            self.signed.decide(by, "approval", version, {"stage": version.stage}, permission="model.approve")
        version = self.registry.add_approval(version.version, identity, roles=self.access.roles_of(identity))
        self.audit.record(identity, "model.approve", subject=subject, outcome="allow",
                          details={"roles": list(self.access.roles_of(identity))})
        return self.promote(version.version, actor=identity, by=by)

    def promote(self, ref: str, *, actor: str, stage: str = "production",
                by: Any = None) -> tuple[ModelVersion, PolicyDecision]:
        """Re-verify from the bytes and evaluate the policy; move to ``stage`` only if it allows.

        With a trust policy, moving to production is a promotion statement signed by an approver (``by``)."""
        version = self.registry.get(ref)
        signature, attestation = self.gatekeeper.verification_facts(version, actor=actor)
        decision = self.decide(version, stage, signature=signature, attestation=attestation, actor=actor)
        self._remember_decision(version, decision)
        if not decision.allowed:
            self.registry.record_event(actor, "promote.denied", version.version,
                                       {"to": stage, "reasons": list(decision.reasons)})
            self.audit.record(actor, "model.promote", subject=version.version, outcome="deny",
                              details={"to": stage, "reasons": list(decision.reasons)})
            return self.registry.get(version.version), decision
        if self.signed is not None and stage == "production":
            by = self.signed.require_actor(by, "a promotion to production")
            self.signed.decide(by, "promotion", version, {"stage": stage, "input_sha256": decision.input_sha256},
                               permission="model.approve")
        version = self.registry.set_stage(version.version, stage, actor=actor, expect=("candidate", "staging"),
                                          reason="promotion policy allows")
        self.audit.record(actor, "model.promote", subject=f"{version.version} sha256:{version.model_digest}",
                          outcome="allow", details={"to": stage, "input_sha256": decision.input_sha256})
        return version, decision

    def _remember_decision(self, version: ModelVersion, decision: PolicyDecision) -> None:
        self.registry.record_event("policy", "policy.decision", version.version,
                                   {"package": decision.package, "allowed": decision.allowed,
                                    "reasons": list(decision.reasons)})

    def already_live(self, ref: str, *, target: str) -> Deployment | None:
        """The deployment on ``target`` when it is already ``ref``'s version with the same model digest
        (a re-run demo's ``deploy``: nothing to do), else None. Only a deploy that succeeded counts, and a
        local target's directory must still be there."""
        current = self.registry.current_deployment(target)
        if current is None:
            return None
        version = self.registry.get(ref)
        if (current.version, current.model_digest) != (version.version, version.model_digest):
            return None
        if target == "local" and not Path(current.location).is_dir():
            return None
        return current

    def deploy(self, ref: str = "production", *, actor: str, target: str = "local",
               health: bool = True, _action: str = "deployed", _permission: str = "model.deploy",
               _reason: str = "", by: Any = None) -> Deployment:
        """Gate, then write the verified model to ``target``; health-check it; roll back on failure.

        With a trust policy every deployment is a deployment statement signed by ``by`` (the CLI, the
        ``deployment`` asset and the automatic rollback all come through here); without ``by`` it is
        refused (audited) before the gate runs."""
        if self.signed is not None:
            by = self.signed.require_actor(by, "a deployment")
            actor = by.name  # the signer is who deploys: a name passed alongside counts for nothing
        verified = self.gate(ref, actor=actor, target=target, permission=_permission)
        if self.signed is not None and _action == "deployed":
            try:
                self.signed.decide(by, "deployment", self.registry.get(verified.version),
                                   {"target": target}, permission=_permission)
            except BaseException:
                shutil.rmtree(verified.directory.parent, ignore_errors=True)
                raise
        version = self.registry.get(verified.version)
        where = targets.get(target)
        try:
            location = self._write_target(verified, version, target=where, actor=actor)
        finally:
            shutil.rmtree(verified.directory.parent, ignore_errors=True)
        record = self.registry.record_deployment(actor=actor, target=target, version=version.version,
                                                 model_digest=verified.model_digest, status=_action,
                                                 location=str(location), reason=_reason)
        self.audit.record(actor, "deploy", subject=f"{version.version} sha256:{verified.model_digest} -> {target}",
                          details={"location": str(location), "status": _action})
        result = self._health(where, location) if health else None
        if result is not None and not result.healthy:
            return self._automatic_rollback(record, result, actor=actor, by=by)
        return record

    def _health(self, target: DeployTarget, location: Path) -> HealthResult | None:
        try:
            return target.health(location, trust=self.trust)
        except Error as exc:
            return HealthResult(False, exc.explain())
        except Exception as exc:  # a crash in the health check is an unhealthy deployment
            return HealthResult(False, f"health check crashed: {type(exc).__name__}: {str(exc)[:160]}")

    def _automatic_rollback(self, failed: Deployment, result: HealthResult, *, actor: str,
                            by: Any = None) -> Deployment:
        reason = f"health check failed after deploying {failed.version}: {result.reason}"
        self.registry.record_deployment(actor=actor, target=failed.target, version=failed.version,
                                        model_digest=failed.model_digest, status="rolled_back",
                                        location=failed.location, reason=reason)
        self.audit.record(actor, "deploy.health", subject=f"{failed.version} -> {failed.target}", outcome="fail",
                          details={"reason": result.reason})
        previous = self.registry.previous_deployment(failed.target)
        if previous is None:
            targets.get(failed.target).clear(self.deployments_dir / failed.target)
            self.audit.record(actor, "deploy.rollback", subject=f"{failed.version} -> {failed.target}", outcome="fail",
                              details={"reason": reason + "; no earlier verified version to restore: nothing is live"})
            raise VerificationError(reason + "; no earlier verified version to restore, nothing is live")
        self.audit.record(actor, "deploy.rollback", subject=f"{failed.version} -> {previous.version}",
                          details={"reason": reason, "automatic": True})
        if self.signed is not None:  # the deployer's own signed rollback, like `secure-ml rollback`
            self.signed.decide(by, "rollback", self.registry.get(previous.version),
                               {"target": failed.target, "from": failed.version, "reason": reason,
                                "automatic": True}, permission="model.rollback")
        self._restore_stage(previous.version, failed.version, actor=actor, reason=reason)
        restored = self.deploy(previous.version, actor=actor, target=failed.target, health=False,
                               _action="rollback", _permission="model.rollback", _reason=reason, by=by)
        raise VerificationError(f"{reason}; rolled back to {restored.version}")

    def rollback(self, *, actor: str, target: str = "local", reason: str = "requested", by: Any = None) -> Deployment:
        """Redeploy the previously deployed version (never a revoked one), re-verified through the full gate."""
        current = self.registry.current_deployment(target)
        if current is None:
            raise BadInput(f"nothing is deployed to {target}")
        previous = self.registry.previous_deployment(target)
        if previous is None:
            raise BadInput(f"no earlier verified deployment to roll back to on {target}")
        self.access.require(actor, "model.rollback", audit=self.audit, subject=f"{current.version} -> {previous.version}")
        if self.signed is not None:
            by = self.signed.require_actor(by, "a rollback")
            self.signed.decide(by, "rollback", self.registry.get(previous.version),
                               {"target": target, "from": current.version, "reason": reason}, permission="model.rollback")
        replaced_stage = Registry.get(self.registry, current.version).stage
        self._restore_stage(previous.version, current.version, actor=actor, reason=reason)
        try:
            record = self.deploy(previous.version, actor=actor, target=target, _action="rollback",
                                 _permission="model.rollback", _reason=reason, by=by)
        except Error as exc:
            if replaced_stage == "production":  # nothing changed on the target: the registry says so too
                self.registry.set_stage(current.version, "production", actor=actor, action="rollback.failed",
                                        reason=exc.explain())
            self.audit.record(actor, "deploy.rollback", subject=f"{current.version} -> {previous.version}",
                              outcome="fail", details={"reason": exc.explain()})
            raise
        self.registry.record_deployment(actor=actor, target=target, version=current.version,
                                        model_digest=current.model_digest, status="rolled_back",
                                        location=current.location, reason=reason)
        self.audit.record(actor, "deploy.rollback", subject=f"{current.version} -> {previous.version}",
                          details={"reason": reason})
        return record

    def revoke(self, ref: str, *, by: Any, reason: str) -> list[str]:
        """An approver revokes a version: never deployed again; where it is live, rolled back (or taken down)."""
        from secure_ml.release.signed import REVOKED

        if self.signed is None:
            raise ConfigurationError("revocation is a signed decision: create the trust policy first "
                                     "(`secure-ml trust init`)")
        if not reason.strip():
            raise BadInput("a revocation needs a reason (--reason TEXT)")
        by = self.signed.require_actor(by, "a revocation")
        version = self.registry.get(ref)
        if version.stage == REVOKED:
            raise BadInput(f"{version.version} is already revoked")
        self.signed.decide(by, "revocation", version, {"reason": reason}, permission="model.approve")
        if Registry.get(self.registry, version.version).stage in ("candidate", "staging", "production"):
            self.registry.set_stage(version.version, "archived", actor=by.name, action="revoke", reason=reason)
        self.audit.record(by.name, "model.revoke", subject=f"{version.version} sha256:{version.model_digest}",
                          details={"reason": reason})
        done = []
        for target in sorted({d.target for d in self.registry.deployments()}):
            current = self.registry.current_deployment(target)
            if current is None or current.model_digest != version.model_digest:
                continue
            why = f"{version.version} revoked: {reason}"
            try:
                record = self.rollback(actor=by.name, target=target, reason=why, by=by)
                done.append(f"{target}: rolled back to {record.version}")
            except Error as exc:
                # Nobody may run a revoked model: take it down even where no rollback is possible.
                targets.get(target).clear(self.deployments_dir / target)
                self.registry.record_deployment(actor=by.name, target=target, version=current.version,
                                                model_digest=current.model_digest, status="rolled_back",
                                                location=current.location, reason=why)
                self.audit.record(by.name, "deploy.takedown", subject=f"{current.version} -> {target}",
                                  details={"reason": why, "no_rollback": exc.explain()})
                done.append(f"{target}: taken down, nothing live ({exc.explain()})")
        return done

    def _restore_stage(self, restore: str, replaced: str, *, actor: str, reason: str) -> None:
        """Rollback makes the restored version production again (and archives the replaced one)."""
        if self.registry.get(restore).stage != "production":
            self.registry.set_stage(restore, "production", actor=actor, action="rollback",
                                    reason=f"rolled back from {replaced}: {reason}")

    # -- targets -----------------------------------------------------------------------------
    def _write_target(self, verified: VerifiedVersion, version: ModelVersion, *, target: DeployTarget,
                      actor: str) -> Path:
        """The verified bytes, the target's own files and a receipt, renamed into place at once; then activated."""
        root = self.deployments_dir / target.name
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{version.version}-{verified.model_digest[:12]}"
        final = root / name
        receipt = {
            "format": "secure-ml-deployment/1", "version": version.version, "model_digest": verified.model_digest,
            "target": target.name, "actor": actor, "signature_file": SIGNATURE_FILE,
            "attestation_file": ATTESTATION_FILE, "signer": verified.verified.signer,
        }
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}.", dir=root))
        try:
            shutil.copytree(verified.directory, staging / MODEL_DIR)
            (staging / SIGNATURE_FILE).write_bytes(verified.bundle)
            (staging / ATTESTATION_FILE).write_bytes(verified.envelope)
            config = dict(self.config)
            # What else is live on this target (every model, by name): a target serving them all from one
            # server (kubernetes) renders each, pinned by its digest, beside the one deployed now.
            configured = str((self.config.get("serving") or {}).get("model_name") or DEFAULT_MODEL_NAME)
            config["served_name"] = served_name(version.model, served=configured, default_model=self.default_model)
            config["live_models"] = [m for m in live_models(self.registry, target=target.name, served=configured,
                                                            default_model=self.default_model)
                                     if m.name != config["served_name"]]
            if self.signed is not None:  # admission data from verified deployment statements, never registry rows
                config["admitted_model_digests"] = self.signed.admitted_digests(target.name)
            receipt.update(target.write(staging, version=version.version, model_digest=verified.model_digest,
                                        config=config))
            (staging / RECEIPT_FILE).write_text(json.dumps(receipt, indent=1, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)  # same version and digest: an identical redeploy replaces it
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        target.activate(root, final, version=version.version, model_digest=verified.model_digest)
        return final
