"""secure-ml approve | promote | status | deploy | rollback | serve: the release commands.

    secure-ml status [--json] [VERSION]                  versions, stages, approvals, what is deployed
    SECURE_ML_IDENTITY=carol.key secure-ml approve v3     a second person approves (signed); production if policy allows
    SECURE_ML_IDENTITY=carol.key secure-ml promote v3     re-evaluate the promotion policy now (an approver)
    SECURE_ML_IDENTITY=dave.key secure-ml deploy [VERSION] [--target TARGET]
    SECURE_ML_IDENTITY=dave.key secure-ml rollback [--target local] [--reason TEXT]
    SECURE_ML_IDENTITY=carol.key secure-ml revoke v3 --reason TEXT
    secure-ml serve [--issue-token NAME]                  serve every verified deployed model (/v1, /v2)

Many models: a version is named ``MODEL:VERSION`` (``breast_cancer:v3``) or by its bare number
(``v3``; versions are numbered across the project, so that is never ambiguous). A stage name
(``production``, ``staging``) and ``deploy``/``rollback`` without a version act for ``--model NAME``
(default: the default model). ``status --json`` gives each version's ``model``.

Who acts is the holder of the identity key (``SECURE_ML_IDENTITY`` or ``--identity FILE``) as the
signed trust policy names it; every decision is a signed statement. A name typed anywhere
(``SECURE_ML_ACTOR``, CI variables) grants nothing. Denials and forgeries exit 1 with every reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from secure_ml.errors import BadInput
from secure_ml.release import targets
from secure_ml.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    status = sub.add_parser("status", help="model versions, stages, approvals and deployments")
    status.add_argument("version", nargs="?", help="show one version's history")
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(handler=cmd_status)

    approve = sub.add_parser("approve", help="approve a model version (a second identity)")
    approve.add_argument("version", help="[MODEL:]v1, sha256:<prefix>, or a stage (staging: the newest awaiting approval)")
    _identity_option(approve)
    approve.set_defaults(handler=cmd_approve)

    promote = sub.add_parser("promote", help="re-evaluate the promotion policy for a version")
    promote.add_argument("version")
    promote.add_argument("--stage", choices=("staging", "production"), default="production")
    _identity_option(promote)
    promote.set_defaults(handler=cmd_promote)

    deploy = sub.add_parser("deploy", help="verify the production model from its bytes, then deploy it")
    deploy.add_argument("version", nargs="?", default="production")
    deploy.add_argument("--target", choices=sorted(targets.TARGETS), default=None)
    deploy.add_argument("--no-health-check", action="store_true", help="skip the post-deploy health check")
    deploy.add_argument("--again", action="store_true",
                        help="deploy even when the target already runs this version (default: say so, do nothing)")
    _identity_option(deploy)
    deploy.set_defaults(handler=cmd_deploy)

    rollback = sub.add_parser("rollback", help="redeploy the previous verified version")
    rollback.add_argument("--target", choices=sorted(targets.TARGETS), default="local")
    rollback.add_argument("--reason", default="requested by an operator")
    _identity_option(rollback)
    rollback.set_defaults(handler=cmd_rollback)

    revoke = sub.add_parser("revoke", help="revoke a version (an approver): never deployed again, rolled back where live")
    revoke.add_argument("version")
    revoke.add_argument("--reason", required=True, help="why (recorded in the signed revocation)")
    _identity_option(revoke)
    revoke.set_defaults(handler=cmd_revoke)

    serve = sub.add_parser("serve", help="serve the verified local deployment (or a pinned model dir)")
    serve.add_argument("--model", nargs=3, action="append", metavar=("NAME", "DIR", "DIGEST"),
                       help="serve the deployed directory DIR as NAME, pinned to DIGEST (sha256:<hex>); repeat per "
                            "model (Kubernetes: on the volume; needs --public-key)")
    serve.add_argument("--model-dir", type=Path,
                       help="one deployed model directory (as --model with the configured name)")
    serve.add_argument("--digest", help="sha256:<hex> the model directory must hash to (with --model-dir)")
    serve.add_argument("--public-key", type=Path, help="trusted model-signing public key (with --model/--model-dir)")
    serve.add_argument("--tokens", type=Path, help="hashed bearer tokens file (default: $SECURE_ML_HOME/serving)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--issue-token", metavar="NAME", help="create a bearer token for NAME, print it once, exit")
    serve.add_argument("--revoke-token", metavar="NAME", help="revoke NAME's token and exit")
    serve.set_defaults(handler=cmd_serve)


def _identity_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identity", type=Path, help="your identity key file (default: $SECURE_ML_IDENTITY)")
    parser.add_argument("--model", help="the model a stage name or a bare deploy/rollback acts for "
                                        "(default: the default model; MODEL:VERSION says it too)")


def for_version(settings: Settings, ref: str | None, model: str | None = None) -> Settings:
    """The settings acting for the model ``ref`` names: ``MODEL:VERSION``, a version's own model, or ``model``."""
    from secure_ml.config.model_spec import split_ref
    from secure_ml.release.registry import STAGES, Registry

    named, rest = split_ref(ref or "")
    if named is not None and model is not None and named != model:
        raise BadInput(f"{ref} names model {named!r} but --model says {model!r}")
    chosen = named or model
    if chosen is None and rest and rest not in STAGES:
        chosen = Registry.from_settings(settings).for_model(None).model_of(rest)
    return settings.for_model(chosen)


def _release(settings: Settings, actor: str | None = None) -> Any:
    from secure_ml.release.deploy import Release

    return Release.from_settings(settings, actor=actor)


def _actor(settings: Settings, args: argparse.Namespace) -> Any:
    """The authenticated actor; privileged commands need a trust policy and an identity key."""
    from secure_ml.errors import ConfigurationError
    from secure_ml.governance import authn

    if not authn.trust_store(settings).exists() and not settings.environ.get("SECURE_ML_TRUST_ROOT"):
        raise ConfigurationError("no trust policy: decisions are signed with identity keys; create it with "
                                 "`secure-ml trust init --owner-key FILE` and `secure-ml trust add`")
    return authn.authenticate(settings, authn.verified_policy(settings), identity_file=args.identity)


def cmd_status(args: argparse.Namespace) -> int:
    from secure_ml.release.registry import Registry
    from secure_ml.release.signed import SignedDecisions, TrustedRegistry

    settings = Settings.from_env()
    registry = Registry.from_settings(settings).for_model(None)  # every model's versions
    signed = SignedDecisions.for_settings(settings)
    if signed is not None:  # stages, approvals and trainers as the signed statements say
        registry = TrustedRegistry(registry.path, signed)
    if args.version:
        version = registry.get(args.version)
        data: dict[str, Any] = {**version.as_dict(), "history": registry.history(version.version)}
        if args.json:
            print(json.dumps(data, indent=1, default=str))
            return 0
        print(f"{version.model}:{version.version}  sha256:{version.model_digest}  {version.stage}  "
              f"registered by {version.registered_by}")
        for event in data["history"]:
            reasons = event["details"].get("reasons")
            extra = f"  ({'; '.join(reasons)})" if reasons else ""
            print(f"  {event['at'][:19]}  {event['actor']:<14} {event['action']:<18}{extra}")
        return 0
    status = registry.status()
    if args.json:
        print(json.dumps(status, indent=1, default=str))
        return 0
    if not status["versions"]:
        print("no model versions registered yet (run `secure-ml pipeline run`)")
    # One model (the demo): versions print as before; several: each as MODEL:VERSION.
    several = len({v["model"] for v in status["versions"]} | set(status["deployed_by_model"])) > 1
    for v in status["versions"]:
        approvers = ", ".join(a["identity"] for a in v["approvals"]) or "none"
        print(f"{v['name'] if several else v['version']:<{20 if several else 5}} {v['stage']:<11} sha256:{v['model_digest'][:16]}…  registered by "
              f"{v['registered_by']}; approvals: {approvers}")
        policy = v.get("policy") or {}
        for reason in policy.get("reasons", []) if not policy.get("allowed") else []:
            print(f"      waiting: {reason}")
    for model, live in status["deployed_by_model"].items():
        for target, deployed in live.items():
            named = f"{model}:{deployed['version']}" if several else deployed["version"]
            print(f"deployed to {target}: {named} sha256:{deployed['model_digest'][:16]}… "
                  f"by {deployed['actor']} at {deployed['at'][:19]} ({deployed['status']})")
    if not any(status["deployed_by_model"].values()):
        for target in status["deployed"]:
            print(f"deployed to {target}: nothing")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    settings = for_version(Settings.from_env(), args.version, args.model)
    actor = _actor(settings, args)
    release = _release(settings, actor=actor.name)
    if args.version == "staging" and not any(v.stage == "staging" for v in release.registry.versions()):
        # `approve staging` in a re-run demo: nothing waits, and that is not an error.
        live = release.registry.production()
        if live is not None:
            print(f"nothing awaits approval; {live.version} is in production")
            return 0
    version, decision = release.approve(args.version, by=actor)
    print(f"{actor.name} approved {version.version} (signed)")
    if decision.allowed:
        print(f"{version.version} is now {version.stage}: the promotion policy allows it")
        return 0
    print(f"{version.version} stays {version.stage}: the promotion policy denies production:", file=sys.stderr)
    for reason in decision.reasons:
        print(f"  - {reason}", file=sys.stderr)
    return 1


def cmd_promote(args: argparse.Namespace) -> int:
    settings = for_version(Settings.from_env(), args.version, args.model)
    actor = _actor(settings, args)
    release = _release(settings, actor=actor.name)
    version, decision = release.promote(args.version, actor=actor.name, stage=args.stage, by=actor)
    print(decision.markdown().replace("**", ""))
    print(f"{version.version} is {version.stage}")
    return 0 if decision.allowed else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    settings = for_version(Settings.from_env(), args.version, args.model)
    actor = _actor(settings, args)
    release = _release(settings, actor=actor.name)
    target = args.target or str((release.config.get("deploy") or {}).get("default_target", "local"))
    live = None if args.again else release.already_live(args.version, target=target)
    if live is not None:  # a re-run demo: the same version is live there already
        print(f"{live.version} sha256:{live.model_digest[:16]}… is already deployed to {target} "
              f"(by {live.actor} at {live.at}): nothing to do (--again redeploys it)")
        return 0
    record = release.deploy(args.version, actor=actor.name, target=target, health=not args.no_health_check, by=actor)
    print(f"deployed {record.version} sha256:{record.model_digest[:16]}… to {target} as {actor.name}: {record.location}")
    _report(settings, target)
    return 0


def _report(settings: Settings, target: str) -> None:
    """The deployment asset follows deployments made here too (its freshness measures real ones)."""
    os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home))
    if not (Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml").exists():
        return  # no Dagster instance set up (`secure-ml init` not run): nothing to record it in
    from secure_ml.definitions import report_deployment  # Dagster only for this step

    report_deployment(settings, target)


def cmd_rollback(args: argparse.Namespace) -> int:
    settings = for_version(Settings.from_env(), None, args.model)
    actor = _actor(settings, args)
    record = _release(settings, actor=actor.name).rollback(actor=actor.name, target=args.target, reason=args.reason,
                                                           by=actor)
    print(f"rolled back {args.target} to {record.version} sha256:{record.model_digest[:16]}… (re-verified)")
    _report(settings, args.target)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    settings = for_version(Settings.from_env(), args.version, args.model)
    actor = _actor(settings, args)
    done = _release(settings, actor=actor.name).revoke(args.version, by=actor, reason=args.reason)
    print(f"{actor.name} revoked {args.version} (signed): {args.reason}")
    for line in done:
        print(f"  {line}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from secure_ml.release import served, serving

    settings = Settings.from_env()
    config = settings.load_config("release").get("serving") or {}
    tokens = serving.TokenStore(args.tokens or serving.tokens_path(settings.home))
    if args.issue_token:
        secret = tokens.issue(args.issue_token)
        settings.audit_log().record(settings.actor(), "serve.token.issue", subject=args.issue_token)
        print(secret)
        return 0
    if args.revoke_token:
        revoked = tokens.revoke(args.revoke_token)
        settings.audit_log().record(settings.actor(), "serve.token.revoke", subject=args.revoke_token,
                                    outcome="ok" if revoked else "fail")
        print("revoked" if revoked else "no such token")
        return 0 if revoked else 1
    if not tokens.names():
        raise BadInput(f"no bearer tokens in {tokens.path}: create one with `secure-ml serve --issue-token NAME`")
    audit = settings.audit_log()
    models = _served_models(settings, args, str(config.get("model_name") or served.DEFAULT_MODEL_NAME))
    for model in models:
        audit.record(settings.actor(), "serve.start",
                     subject=f"{model.name} {model.version} sha256:{model.model_digest}")

    def on_event(client: str, action: str, outcome: str, details: dict[str, Any]) -> None:
        audit.record(client, action, subject=str(details.get("model") or models[0].name), outcome=outcome,
                     details=details)

    auth = config.get("auth_failures") or {}
    detector = config.get("extraction_detector") or {}
    detectors = {} if detector.get("enabled") is False else {
        m.name: serving.ExtractionDetector(m.spec, **{k: v for k, v in detector.items() if k != "enabled"})
        for m in models}
    app = serving.create_app(
        models, tokens, rate_per_minute=int(config.get("rate_limit_per_minute", 120)),
        max_batch=int(config.get("max_batch", 256)), max_body_bytes=int(config.get("max_body_bytes", 1 << 20)),
        on_event=on_event, daily_budget=int(config["daily_query_budget"]) if config.get("daily_query_budget") else None,
        output=serving.OutputPolicy.from_config(config.get("output")), detectors=detectors,
        auth_failures=serving.AuthFailures(window_s=float(auth.get("window_seconds", 60)),
                                           max_per_window=int(auth.get("max_per_window", 20))))
    host = args.host or str(config.get("host", "127.0.0.1"))
    port = args.port or int(config.get("port", 8765))
    for model in models:
        print(f"serving {model.name} {model.version} sha256:{model.model_digest[:16]}… "
              f"on http://{host}:{port}/v2/models/{model.name}", flush=True)
    serving.serve(app, host=host, port=port)
    return 0


def _served_models(settings: Settings, args: argparse.Namespace, default_name: str) -> list[Any]:
    """Every model to serve, each loaded through the verification chain pinned to its digest."""
    from secure_ml.release import served
    from secure_ml.release.deploy import Release
    from secure_ml.security.verification import TrustPolicy

    given = [(name, Path(directory), digest) for name, directory, digest in args.model or []]
    if args.model_dir or args.digest:
        given.append((default_name, args.model_dir, args.digest or ""))
    if not given:
        deployed = served.deployed_models(settings)
        if not deployed:
            raise BadInput("nothing is deployed locally: run `secure-ml deploy` first")
        return served.load_deployed(deployed, trust=Release.from_settings(settings).trust)
    if not args.public_key:
        raise BadInput("--model and --model-dir need --public-key")
    if not args.public_key.is_file():
        raise BadInput(f"public key not found: {args.public_key}")
    deployed = []
    for name, directory, digest in given:
        if directory is None or not digest.startswith("sha256:"):
            raise BadInput(f"model {name!r} needs a directory and a digest sha256:<hex>")
        deployed.append(served.DeployedModel(name, "", directory, digest.removeprefix("sha256:")))
    return served.load_deployed(deployed, trust=TrustPolicy.of(public_keys=[args.public_key]))
