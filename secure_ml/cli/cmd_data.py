"""secure-ml data sign-off DATASET --drop SHA256 --reason TEXT

A data steward accepts the first version of a data set whose schema pins no trusted reference
sample (secure_ml/data/poisoning_reference.py). The acting identity (settings.resolve_actor) must hold
``data.sign_off`` in roles.yaml; the allow or deny and the sign-off itself go to the audit log, and
``validated_dataset`` accepts that drop (and only that drop) on the record. Once a trust policy
exists the sign-off is a signed decision, like approvals: ``SECURE_ML_IDENTITY=alice.key secure-ml
data sign-off ...`` signs a ``data_signoff`` statement about the drop's digest with the steward's key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    data = sub.add_parser("data", help="data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    sign = data_sub.add_parser("sign-off", help="accept the first version of a data set that has no trusted "
                                                "reference (data stewards)")
    sign.add_argument("dataset", help="the data set's name (the schema's 'dataset')")
    sign.add_argument("--drop", required=True, help="the drop's dataset digest, sha256:<hex> as the rejection names it")
    sign.add_argument("--reason", required=True, help="what was checked, against what")
    sign.add_argument("--identity", type=Path, help="your identity key file (default: $SECURE_ML_IDENTITY)")
    sign.set_defaults(handler=cmd_sign_off)


def cmd_sign_off(args: argparse.Namespace) -> int:
    from secure_ml.data.poisoning_reference import sign_off, signed_sign_off
    from secure_ml.governance import authn
    from secure_ml.governance.access import AccessPolicy
    from secure_ml.settings import Settings

    settings = Settings.from_env()
    if authn.has_trust_policy(settings):
        actor = authn.authenticate(settings, authn.verified_policy(settings), identity_file=args.identity)
        record = signed_sign_off(settings, actor, dataset=args.dataset, drop_sha256=args.drop, reason=args.reason)
        print(f"signed off {args.dataset} drop sha256:{record['drop_sha256'][:16]}… as {record['actor']} "
              f"(signed statement, key {record['keyid'][:16]}…)", file=sys.stderr)
        return 0
    record = sign_off(settings.home, dataset=args.dataset, drop_sha256=args.drop, actor=settings.actor(),
                      policy=AccessPolicy.from_settings(settings), audit=settings.audit_log(), reason=args.reason)
    print(f"signed off {args.dataset} drop sha256:{record['drop_sha256'][:16]}… as {record['actor']} "
          f"(audit entry {record['audit_seq']})", file=sys.stderr)
    return 0
