"""secure-ml audit verify | tail."""

from __future__ import annotations

import argparse
import json

from secure_ml.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = sub.add_parser("audit", help="the hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("verify", help="check the whole chain; name the first bad entry").set_defaults(handler=cmd_verify)
    tail = audit_sub.add_parser("tail", help="the last entries")
    tail.add_argument("-n", type=int, default=20)
    tail.add_argument("--json", action="store_true")
    tail.set_defaults(handler=cmd_tail)


def cmd_verify(args: argparse.Namespace) -> int:
    log = Settings.from_env().audit_log()
    report = log.verify()
    print(f"audit log OK: {report.entries} entries, head {report.last_hash[:16]}…")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    entries = list(Settings.from_env().audit_log().entries())[-args.n:]
    for entry in entries:
        if args.json:
            print(json.dumps(entry))
        else:
            print(f"{entry['seq']:>6} {entry['time'][:19]} {entry['actor']:<12} {entry['outcome']:<5} "
                  f"{entry['action']:<28} {entry['subject'][:40]}")
    return 0
