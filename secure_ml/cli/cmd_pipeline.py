"""secure-ml pipeline run [--data FILE] [--select SELECTION] [--json]."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from secure_ml.custody.integrity import atomic_write, sha256_file
from secure_ml.errors import BadInput
from secure_ml.settings import Settings, init_home

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "german_credit.csv"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pipeline = sub.add_parser("pipeline", help="run the pipeline")
    pipeline_sub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    run = pipeline_sub.add_parser("run", help="land a drop and materialise the pipeline")
    run.add_argument("--data", type=Path, help=f"data drop to land (default: {SAMPLE.name})")
    run.add_argument("--select", help="Dagster asset selection (default: everything)")
    run.add_argument("--json", action="store_true", help="print a machine-readable summary")
    run.add_argument("-v", "--verbose", action="store_true", help="show Dagster's event log")
    run.set_defaults(handler=cmd_run)


def land(settings: Settings, source: Path) -> str:
    """Copy a drop into the landing area atomically; the same bytes land under the same name."""
    if not source.is_file():
        raise BadInput(f"data file not found: {source}")
    digest = sha256_file(source)
    name = f"{source.stem}-{digest[:12]}{source.suffix.lower()}"
    target = settings.landing_dir / name
    if not target.exists():
        with source.open("rb") as src, atomic_write(target, mode=0o640) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        old = time.time() - 3600  # landed whole by rename, so it is settled now
        os.utime(target, (old, old))
    return name


def cmd_run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home))
    init_home(settings)
    drop = land(settings, args.data or SAMPLE)
    from secure_ml.definitions import run_pipeline  # Dagster is imported only for this command

    summary = run_pipeline(settings, selection=args.select,
                           run_config={"ops": {"dataset": {"config": {"drop": drop}}}}
                           if _selects_dataset(args.select) else None,
                           tags=_run_request(settings), log_level="DEBUG" if args.verbose else "WARNING")
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"run {summary['run_id']} on drop {drop}")
        for asset in summary["assets"]:
            state = f"sha256:{asset['sha256'][:16]}…" if asset["sha256"] else (
                "materialized" if asset["materialized"] else "NOT materialized")
            print(f"  asset {asset['asset']:<24} {state}")
        for check in summary["checks"]:
            mark = "PASS" if check["passed"] else "FAIL"
            name = f"{check['asset']}:{check['check']}"
            print(f"  check {name:<52} {mark}  {check['reason']}")
        for failure in summary["step_failures"]:
            print(f"  step {failure['step']} failed: {failure['error']}")
    if summary["failed_blocking_checks"]:
        print(f"secure-ml: blocking check failed: {', '.join(summary['failed_blocking_checks'])}",
              file=sys.stderr)
        return 1
    if summary["step_failures"]:
        print(f"secure-ml: step failed: {summary['step_failures'][0]['step']}: {summary['step_failures'][0]['error']}",
              file=sys.stderr)
        return 1
    return 0


def _run_request(settings: Settings) -> dict[str, str]:
    """The launcher's signed run request (SECURE_ML_IDENTITY), or no tag: an unauthenticated run."""
    from secure_ml.governance import authn

    if not settings.environ.get("SECURE_ML_IDENTITY"):
        return {}
    actor = authn.authenticate(settings, authn.verified_policy(settings))
    return {authn.RUN_REQUEST_TAG: authn.sign_run_request(actor)}


def _selects_dataset(selection: str | None) -> bool:
    return not selection or "dataset" in selection.replace("validated_dataset", "")
