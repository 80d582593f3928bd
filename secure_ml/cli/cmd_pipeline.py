"""secure-ml pipeline run [--data FILE] [--model NAME] [--select SELECTION] [--force] [--json] [--timings] [-v].

A drop landed again with the same bytes, under the same code and configuration, runs nothing: every
asset is still fresh (Dagster's data and code versions) with its blocking checks passed, so the run
says ``up to date`` and no new model version appears. ``--force`` runs it all again.

Many models: the drop is routed to the model whose source its name matches (``--model`` says it
instead), and the run materialises that model's assets only; ``--select`` names them by stage
(``dataset+``). A drop matching the sources of two models is refused, naming both.

The run's summary goes to stdout (a table, or JSON with ``--json``). Each expected failure (a
denial, bad input, a failed blocking check) is ONE line on stderr, ``secure-ml: ...``; Dagster's
own log lines and stack traces stay in the instance's event log (the UI shows them). ``-v`` adds
Dagster's log at INFO on stderr; ``secure-ml --debug pipeline run`` shows it at DEBUG, with
tracebacks. An internal error (a bug) is one line too, naming the exception, and asks for --debug.
``--timings`` adds each step's seconds from the run's event log (slowest first; the JSON summary
always carries them under ``steps``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

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
    run.add_argument("--model", help="the model to run (default: the model whose source the drop matches)")
    run.add_argument("--force", action="store_true",
                     help="run even when the drop, code and configuration are unchanged (default: nothing to do)")
    run.add_argument("--json", action="store_true", help="print a machine-readable summary")
    run.add_argument("--timings", action="store_true", help="print each step's seconds (from the event log)")
    run.add_argument("-v", "--verbose", action="store_true", help="show Dagster's event log (INFO) on stderr")
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
    model = route(settings, drop, args.model)
    # Dagster is imported only for this command
    from secure_ml.definitions import DROP_SHA_TAG, DROP_TAG, MODEL_TAG, run_pipeline

    ingesting = _selects_dataset(args.select)
    drop_tags = {DROP_TAG: drop, DROP_SHA_TAG: sha256_file(settings.landing_dir / drop)} if ingesting else {}
    if model:
        drop_tags[MODEL_TAG] = model
    summary = run_pipeline(settings, selection=args.select, model=model, drop=drop,
                           tags={**drop_tags, **_run_request(settings)},
                           console="debug" if args.debug else "info" if args.verbose else "quiet",
                           force=args.force)
    if args.json:
        print(json.dumps(summary, indent=1))
    elif summary.get("up_to_date"):
        print(f"up to date: drop {drop} is already the latest dataset version and every asset is fresh "
              "(same data, code and configuration; blocking checks passed): nothing run (--force runs it again)")
        for asset in summary["assets"]:
            state = f"sha256:{asset['sha256'][:16]}…" if asset["sha256"] else "(not a drop's: secure-ml deploy)"
            print(f"  asset {asset['asset']:<24} {state}")
    else:
        runs = ", ".join(f"{r['job']} {r['run_id']}" for r in summary["runs"])
        print(f"runs {runs} on drop {drop}")
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
        if args.timings:
            for step in sorted(summary["steps"], key=lambda s: -s["seconds"]):
                print(f"  time  {step['step']:<52} {step['seconds']:7.2f}s  {step['outcome']}")
    sys.stdout.flush()
    problems = failure_lines(summary)
    if not problems and not summary["success"]:
        problems = [f"run {summary['run_id']} failed (its event log in the Dagster UI says why; "
                    "or rerun with secure-ml --debug pipeline run)"]
    for line in problems:
        print(f"secure-ml: {line}", file=sys.stderr)
    return 1 if problems else 0


def route(settings: Settings, drop: str, model: str | None) -> str | None:
    """The model a drop's run is for: ``model``, else the one whose source matches the drop (None while
    the project has one model: the run is the whole pipeline, as before)."""
    from secure_ml.governance.sources import ApprovedSources

    models = settings.config.models()
    if model is not None:
        settings.for_model(model)  # an unknown name is refused, naming the known ones
        return model
    if len(set(models) | {settings.config.default_model}) == 1:
        return None
    return ApprovedSources.from_settings(settings).route(drop) or settings.config.default_model


def failure_lines(summary: dict[str, Any]) -> list[str]:
    """One line per failed blocking check (with its reason) and per failed step that is not just
    Dagster stopping a step for a blocking check already reported."""
    failed = [c for c in summary["checks"] if c["blocking"] and not c["passed"]]
    lines = [f"blocking check failed: {c['asset']}:{c['check']}: {c['reason']}" for c in failed]
    for failure in summary["step_failures"]:
        if failure["kind"] == "blocking_check" and lines:
            continue
        if failure["kind"] == "refused" and any(f"rejected: {c['check']}: " in failure["error"] for c in failed):
            continue  # the step that rejected its input, naming a check already reported above
        hint = " (rerun with secure-ml --debug pipeline run)" if failure["kind"] == "internal" else ""
        what = "internal error: " if failure["kind"] == "internal" else ""
        lines.append(f"step {failure['step']} failed: {what}{failure['error']}{hint}")
    return lines


def _run_request(settings: Settings) -> dict[str, str]:
    """The launcher's signed run request (SECURE_ML_IDENTITY); in CI, its verified OIDC identity
    (SECURE_ML_OIDC_TOKEN, bound by the token's digest); else no tag: an unauthenticated run."""
    from secure_ml.governance import authn

    if settings.environ.get("SECURE_ML_IDENTITY"):
        actor = authn.authenticate(settings, authn.verified_policy(settings))
        return {authn.RUN_REQUEST_TAG: authn.sign_run_request(actor)}
    if settings.environ.get(authn.OIDC_TOKEN_ENV) and authn.has_trust_policy(settings):
        return {authn.RUN_OIDC_TAG: authn.oidc_run_request(settings, authn.verified_policy(settings))}
    return {}



def _selects_dataset(selection: str | None) -> bool:
    return not selection or "dataset" in selection.replace("validated_dataset", "")
