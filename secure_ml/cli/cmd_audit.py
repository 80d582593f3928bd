"""secure-ml audit verify | checkpoint | tail.

    secure-ml audit verify [--expect HASH] [--witness FILE]   chain + newest signed checkpoint (+ a head kept elsewhere)
    secure-ml audit checkpoint [--witness FILE]               sign the head now (the pipeline's key) into a witness file
    secure-ml audit tail [-n 20] [--json]

Checkpoints come from the Dagster event log (every sealed output of a run records one) and from
the witness file (``--witness`` or ``SECURE_ML_AUDIT_WITNESS``); only those signed by a pipeline key
of the trust policy (or, before there is one, the home's model-signing key) count.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

from secure_ml.settings import Settings

WITNESS_ENV = "SECURE_ML_AUDIT_WITNESS"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = sub.add_parser("audit", help="the hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the chain against the newest signed checkpoint")
    verify.add_argument("--expect", metavar="HASH", help="an entry hash kept elsewhere that must be in the log")
    verify.add_argument("--witness", type=Path, help="a witness file of signed checkpoints")
    verify.set_defaults(handler=cmd_verify)
    checkpoint = audit_sub.add_parser("checkpoint", help="sign the current head into a witness file")
    checkpoint.add_argument("--witness", type=Path)
    checkpoint.set_defaults(handler=cmd_checkpoint)
    tail = audit_sub.add_parser("tail", help="the last entries")
    tail.add_argument("-n", type=int, default=20)
    tail.add_argument("--json", action="store_true")
    tail.set_defaults(handler=cmd_tail)


def _witness(settings: Settings, given: Path | None) -> Path | None:
    value = given or settings.environ.get(WITNESS_ENV)
    return Path(value) if value else None


def checkpoint_keys(settings: Settings) -> list[Any]:
    """Who may sign checkpoints: the trust policy's pipeline identities, else the home's pipeline key."""
    from secure_ml.custody.dsse import public_key
    from secure_ml.governance.authn import trust_store, verified_policy
    from secure_ml.governance.trust import PIPELINE_ROLE

    if trust_store(settings).exists():
        return verified_policy(settings).keys_with_role(PIPELINE_ROLE)
    pub = settings.home / "keys" / "model-signing.pub"
    return [public_key(pub)] if pub.exists() else []


def event_log_checkpoints(settings: Settings) -> list[bytes]:
    """Checkpoint envelopes recorded in the Dagster event log (newest runs first)."""
    if not (settings.dagster_home / "dagster.yaml").exists():
        return []
    os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home))
    import dagster as dg

    from secure_ml.custody.anchor import METADATA_KEY

    found: list[bytes] = []
    with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # any asset's materializations: fetch_materializations needs one key
        records = instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION), limit=200, ascending=False)
        for record in records:
            materialization = record.asset_materialization
            value = materialization.metadata.get(METADATA_KEY) if materialization else None
            if value is not None:
                found.append(json.dumps(getattr(value, "value", value)).encode())
    return found


def newest_checkpoint(settings: Settings, witness: Path | None) -> tuple[Any, int, int]:
    """(the newest verified checkpoint or None, how many verified, how many refused)."""
    from secure_ml.custody import anchor
    from secure_ml.errors import VerificationError

    envelopes = event_log_checkpoints(settings) + (anchor.Witness(witness).envelopes() if witness else [])
    keys = checkpoint_keys(settings) if envelopes else []
    verified, refused = [], 0
    for envelope in envelopes:
        try:
            verified.append(anchor.verify_checkpoint(envelope, keys))
        except VerificationError:
            refused += 1
    return anchor.newest(verified), len(verified), refused


def cmd_verify(args: argparse.Namespace) -> int:
    from secure_ml.errors import VerificationError

    settings = Settings.from_env()
    log = settings.audit_log()
    checkpoint, good, refused = newest_checkpoint(settings, _witness(settings, args.witness))
    try:
        report = log.verify(checkpoint=checkpoint, expect=args.expect)
    except VerificationError as exc:
        if log.path.exists():
            log.record("auditor", "audit.verify", outcome="fail", details={"reason": exc.explain()})
        raise
    against = (f"checkpoint of {checkpoint.time[:19]} (entry {checkpoint.seq}; {good} signed checkpoint(s)"
               f"{f', {refused} refused' if refused else ''})" if checkpoint else "its own head (no signed checkpoint)")
    expect = f", holds {args.expect[:16]}…" if args.expect else ""
    print(f"audit log OK: {report.entries} entries, head {report.last_hash[:16]}…, verified against {against}{expect}")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from secure_ml.custody import anchor
    from secure_ml.errors import BadInput
    from secure_ml.governance.authn import pipeline_signer

    settings = Settings.from_env()
    witness = _witness(settings, args.witness)
    if witness is None:
        raise BadInput(f"give --witness FILE or set {WITNESS_ENV}: a place the log's writer cannot rewrite")
    signer = pipeline_signer(settings)
    if signer is None:
        raise BadInput("the pipeline has no signing key yet: run `secure-ml trust init` or the pipeline first")
    previous, _, _ = newest_checkpoint(settings, witness)
    envelope = anchor.checkpoint(settings.audit_log(), signer, previous=previous)
    anchor.Witness(witness).append(envelope)
    cp = anchor.verify_checkpoint(envelope, [signer.public_key])  # type: ignore[attr-defined]
    print(f"checkpoint: entry {cp.seq} head {cp.hash[:16]}… signed into {witness}")
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
