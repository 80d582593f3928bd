"""secure-ml trust init | add | show | verify: the signed trust policy.

    secure-ml trust init --owner-key owner.key [--owner-key second.key --threshold 2] [--unauthenticated-may-train]
    secure-ml trust add carol --role approver --public-key carol.pub --alias carol@example.com --owner-key owner.key
    secure-ml trust add ci --role pipeline --oidc-issuer https://token.actions.githubusercontent.com \\
        --oidc-subject repo:org/secure-ml:ref:refs/heads/main --owner-key owner.key
    secure-ml trust show [--json]
    secure-ml trust verify

Owner keys are identity keys (``secure-ml identity new``); they sign every version of the policy.
``init`` starts from the shipped roles and release configuration and lists the pipeline's own
signing key (``$SECURE_ML_HOME/keys/model-signing.pub``) as the ``pipeline`` identity and model signer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from secure_ml.errors import BadInput
from secure_ml.settings import Settings

TRAINING_ROLES = ("data_steward", "ml_engineer")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    trust = sub.add_parser("trust", help="the signed trust policy: identities, roles, gate policy, signers")
    trust_sub = trust.add_subparsers(dest="trust_command", required=True)
    init = trust_sub.add_parser("init", help="create version 1, signed by the owner key(s)")
    init.add_argument("--owner-key", type=Path, action="append", required=True, help="an owner's private key")
    init.add_argument("--threshold", type=int, default=None, help="owner signatures needed (default: all given)")
    init.add_argument("--unauthenticated-may-train", action="store_true",
                      help="let runs without an identity key land data and train (recorded as unauthenticated)")
    init.set_defaults(handler=cmd_init)
    add = trust_sub.add_parser("add", help="add or extend an identity; the owner key(s) sign the new version")
    add.add_argument("name")
    add.add_argument("--role", action="append", default=[], help="a role (repeatable)")
    add.add_argument("--public-key", type=Path, help="the identity's NAME.pub")
    add.add_argument("--alias", action="append", default=[], help="another name of the same person "
                     "(git email, CI login such as github:carol)")
    add.add_argument("--oidc-issuer")
    add.add_argument("--oidc-subject")
    add.add_argument("--model-signer", action="store_true", help="trust this key's model signatures")
    add.add_argument("--owner-key", type=Path, action="append", required=True)
    add.set_defaults(handler=cmd_add)
    models = trust_sub.add_parser("models", help="sign the model specs' promotion parameters into a new version")
    models.add_argument("--owner-key", type=Path, action="append", required=True, help="an owner's private key")
    models.set_defaults(handler=cmd_models)
    show = trust_sub.add_parser("show", help="the verified policy")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show)
    trust_sub.add_parser("verify", help="verify signatures, version and pin").set_defaults(handler=cmd_verify)


def _owners(settings: Settings, paths: list[Path]) -> list[Any]:
    from secure_ml.governance.identity import load_identity

    return [load_identity(p, home=settings.home) for p in paths]


def cmd_init(args: argparse.Namespace) -> int:
    from secure_ml.custody.dsse import public_key
    from secure_ml.governance.authn import trust_store
    from secure_ml.governance.trust import TrustPolicy, add_identity
    from secure_ml.security.signing import ensure_signing_key, public_key_path

    settings = Settings.from_env()
    owners = _owners(settings, args.owner_key)
    doc = TrustPolicy.new_document([o.key for o in owners], threshold=args.threshold or len(owners),
                                   roles_config=settings.load_config("roles"),
                                   release_config=settings.load_config("release"),
                                   unauthenticated_roles=TRAINING_ROLES if args.unauthenticated_may_train else (),
                                   model_promotion=model_promotion(settings))
    pipeline_key = ensure_signing_key(settings.home / "keys" / "model-signing.pem")
    add_identity(doc, "pipeline", roles=["pipeline"], key=public_key(public_key_path(pipeline_key)), model_signer=True)
    policy = trust_store(settings).init(doc, [o.signer for o in owners])
    settings.audit_log().record(owners[0].keyid[:16], "trust.init", subject=f"trust-policy v{policy.version}",
                                details={"digest": policy.digest, "owners": [o.keyid for o in owners]})
    print(f"trust policy v{policy.version} signed by {len(owners)} owner key(s): {trust_store(settings).policy_path}")
    return 0


def model_promotion(settings: Settings) -> dict[str, dict[str, object]]:
    """Each model spec's promotion overrides: what the owners sign into the trust policy."""
    return {name: spec.promotion_overrides() for name, spec in settings.config.models().items()
            if spec.promotion_overrides()}


def cmd_models(args: argparse.Namespace) -> int:
    from secure_ml.governance.authn import trust_store

    settings = Settings.from_env()
    owners = _owners(settings, args.owner_key)
    wanted = model_promotion(settings)

    def change(doc: dict[str, object]) -> None:
        doc["model_promotion"] = wanted

    policy = trust_store(settings).update(change, [o.signer for o in owners])
    settings.audit_log().record(owners[0].keyid[:16], "trust.models", subject=f"trust-policy v{policy.version}",
                                details={"models": sorted(wanted)})
    print(f"trust policy v{policy.version}: promotion parameters of {len(wanted)} model(s) signed: "
          f"{', '.join(sorted(wanted)) or 'none differ from release.yaml'}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from secure_ml.governance.authn import trust_store
    from secure_ml.governance.identity import check_name, public_key_file
    from secure_ml.governance.trust import add_identity

    settings = Settings.from_env()
    check_name(args.name)
    if bool(args.oidc_issuer) != bool(args.oidc_subject):
        raise BadInput("--oidc-issuer and --oidc-subject go together")
    if not (args.role or args.public_key or args.alias or args.oidc_issuer):
        raise BadInput("nothing to add: give --role, --public-key, --alias or --oidc-issuer/--oidc-subject")
    key = public_key_file(args.public_key) if args.public_key else None
    owners = _owners(settings, args.owner_key)
    oidc = (args.oidc_issuer, args.oidc_subject) if args.oidc_issuer else None
    policy = trust_store(settings).update(
        lambda doc: add_identity(doc, args.name, roles=args.role, key=key, aliases=args.alias, oidc=oidc,
                                 model_signer=args.model_signer), [o.signer for o in owners])
    settings.audit_log().record(owners[0].keyid[:16], "trust.add", subject=args.name,
                                details={"version": policy.version, "roles": args.role,
                                         "keyid": key.keyid if key else "", "aliases": args.alias})
    print(f"trust policy v{policy.version}: {args.name} has roles {', '.join(policy.roles_of(args.name)) or 'none'}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from secure_ml.governance.authn import verified_policy

    summary = verified_policy(Settings.from_env()).summary()
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"trust policy v{summary['version']} sha256:{summary['digest'][:16]}…  owners: "
          f"{summary['owners']['threshold']} of {len(summary['owners']['keyids'])}")
    for name, spec in summary["identities"].items():
        also = f"  aka {', '.join(spec['aliases'])}" if spec["aliases"] else ""
        print(f"  {name:<12} {', '.join(spec['roles']) or '-':<28} {len(spec['keys'])} key(s){also}")
    print(f"  unauthenticated runs: {', '.join(summary['unauthenticated_roles']) or 'nothing'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from secure_ml.governance.authn import check_config, verified_policy

    settings = Settings.from_env()
    policy = verified_policy(settings)
    check_config(settings, policy)
    print(f"trust policy OK: v{policy.version} sha256:{policy.digest[:16]}… signed by "
          f"{policy.owner_threshold} of {len(policy.owner_keys())} owner key(s)")
    return 0
