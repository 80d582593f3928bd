"""secure-ml identity new | whoami: identity keys.

    secure-ml identity new carol --out ~/.secure_ml_identities/carol    # carol.key (0600) and carol.pub
    SECURE_ML_IDENTITY=~/.secure_ml_identities/carol/carol.key secure-ml identity whoami
"""

from __future__ import annotations

import argparse
from pathlib import Path

from secure_ml.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    identity = sub.add_parser("identity", help="identity keys: who you are is the key you hold")
    identity_sub = identity.add_subparsers(dest="identity_command", required=True)
    new = identity_sub.add_parser("new", help="write OUT/NAME.key (owner-only) and OUT/NAME.pub")
    new.add_argument("name")
    new.add_argument("--out", type=Path, required=True, help="a folder of your own, outside SECURE_ML_HOME")
    new.set_defaults(handler=cmd_new)
    whoami = identity_sub.add_parser("whoami", help="who the trust policy says your key is")
    whoami.add_argument("--identity", type=Path, help="your private key file (default: $SECURE_ML_IDENTITY)")
    whoami.set_defaults(handler=cmd_whoami)


def cmd_new(args: argparse.Namespace) -> int:
    from secure_ml.governance.identity import new_identity

    settings = Settings.from_env()
    key, pub = new_identity(args.name, args.out, home=settings.home)
    print(f"created {key} (private, keep it to yourself) and {pub} (give this to the trust policy's owner)")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    from secure_ml.governance import authn

    settings = Settings.from_env()
    policy = authn.verified_policy(settings)
    actor = authn.authenticate(settings, policy, identity_file=args.identity)
    roles = ", ".join(policy.roles_of(actor.name)) or "no roles"
    print(f"{actor.name} ({'key ' + actor.keyid[:16] + '…' if actor.keyid else actor.method}): {roles}")
    return 0
