"""Crash safety, measured: SIGKILL the real CLI at random points of each stage, then check recovery.

    python -m bench.crash_harness --kills 200 --seed 7                 # `make crash`; JSON + a README table
    python -m bench.crash_harness --stages rotation,ingest --kills 6   # the smoke in tests/test_crash_smoke.py

For each stage (key rotation, ingest, validation, training, signing, registering, approving,
deploying) the harness first runs the stage's real command (``python -m secure_ml ...`` in a
subprocess against a temporary SECURE_ML_HOME) to completion to learn how long it takes; then, one
stage after another in turn, starts it, sends SIGKILL to its whole process group after a seeded random
delay within the last whole run's duration, and re-runs it.
After every kill it checks: the next run completes (exit 0); every object in the artifact store
authenticates and matches its digest (a partial artifact found = one that does not; temp files a
killed atomic write left are counted apart: nothing reads them); the audit chain verifies; the
registry passes SQLite's integrity_check, every version's stored evidence is present and verifies,
and every row is backed by signed statements (no approval or stage without one); an approving kill's
approver has exactly one approval recorded. A kill that lands after the command finished is
not counted. ``--budget-seconds`` stops early (the report says how many kills were made).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES: dict[str, list[str]] = {
    "rotation": ["keys", "rotate"],
    "ingest": ["pipeline", "run", "--select", "dataset"],
    "validation": ["pipeline", "run", "--select", "validated_dataset"],
    "training": ["pipeline", "run", "--select", "trained_model"],
    "signing": ["pipeline", "run", "--select", "scan_report,model_signature"],
    "registering": ["pipeline", "run", "--select", "registered_model"],
    "approving": ["approve", "{candidate}"],
    "deploying": ["deploy", "production", "--again"],  # a real deploy each time (a live version is otherwise a no-op)
}
# What has to exist before a stage can run: the whole pipeline for the release stages.
# (validation follows ingest's first whole run, so it needs nothing more.)
NEEDS_PIPELINE = {"training", "signing", "registering", "approving", "deploying"}
# Who runs each command: identities are keys (issue 13). bob lands data and trains, carol approves,
# dave deploys; key rotation is the owner's.
# A decision is taken once, so each approving kill is a fresh approver's first approval. They all
# approve one candidate: for the approving stage the owner signs a trust policy whose promotion asks
# for more approvals than there are approvers (the harness's own configuration directory says the
# same, as the gates require), so every approval is a real signed write that leaves the candidate
# waiting; afterwards the owner signs one approval back and carol promotes it for the deploy kills.
ACTOR = {"approving": "carol", "deploying": "dave", "rotation": "owner"}
PEOPLE = {"bob": ["data_steward", "ml_engineer"], "carol": ["approver"], "dave": ["deployer"]}
APPROVERS = 60
MODEL = "german_credit"


@dataclass
class StageResult:
    stage: str
    kills: int = 0
    finished_before_kill: int = 0
    recoveries: int = 0
    partial_artifacts: int = 0
    temp_files_left: int = 0
    audit_failures: int = 0
    registry_failures: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Home:
    """A temporary SECURE_ML_HOME and the CLI run against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ids = root / "identities"      # private keys never live under SECURE_ML_HOME
        self.config = root / "config"        # the harness's own configuration (its promotion is signed)
        shutil.copytree(REPO / "secure_ml" / "config", self.config)
        self.env = {**os.environ, "SECURE_ML_HOME": str(root / "home"), "DAGSTER_HOME": str(root / "home" / "dagster"),
                    "SECURE_ML_CONFIG": str(self.config),
                    "PYTHONPATH": str(REPO), "DAGSTER_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1"}
        for name in ("SECURE_ML_KEK", "SECURE_ML_ACTOR", "SECURE_ML_IDENTITY"):
            self.env.pop(name, None)

        self.candidate = ""                 # the version the approving kills approve

    def production(self) -> str | None:
        status = json.loads(self.run(["status", "--json"]).stdout)
        return next((v["version"] for v in status["versions"] if v.get("stage") == "production"), None)

    def key(self, who: str) -> Path:
        return self.ids / who / f"{who}.key"

    def command(self, args: list[str], stage: str | None = None, who: str | None = None) -> tuple[list[str], dict[str, str]]:
        env = dict(self.env)
        who = who or ACTOR.get(stage or "", "bob")
        if self.key(who).exists():
            env["SECURE_ML_IDENTITY"] = str(self.key(who))
        return [sys.executable, "-m", "secure_ml", *args], env

    def run(self, args: list[str], timeout: float = 1800, stage: str | None = None,
            who: str | None = None) -> subprocess.CompletedProcess[str]:
        argv, env = self.command(args, stage, who)
        return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def run_killed(self, args: list[str], delay: float, stage: str | None = None, who: str | None = None) -> bool:
        """Start ``args``, SIGKILL its process group after ``delay`` s; False if it finished first."""
        argv, env = self.command(args, stage, who)
        process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            process.wait(timeout=delay)
            return False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True


def completed(stage: str, run: subprocess.CompletedProcess[str]) -> bool:
    """The run did its work: exit 0, or (approving) the approval is signed and recorded and the
    candidate rightly keeps waiting for more, or the approval had landed before the kill."""
    if run.returncode == 0:
        return True
    return stage == "approving" and run.returncode == 1 and (
        "has already approved" in run.stderr or ("approved" in run.stdout and "production needs" in run.stderr))


def approvers_of(home: Home, version: str) -> list[str]:
    from secure_ml.release.registry import Registry

    database = Path(home.env["SECURE_ML_HOME"]) / "registry" / "registry.db"
    return [a["identity"] for a in Registry(database).get(version).approvals]


def check_home(home: Path, config: Path | None = None) -> dict[str, list[str]]:
    """Everything a crash must not break: store objects, audit chain, registry (its rows, and with a
    trust policy every row backed by signed statements: no approval or stage without one)."""
    from secure_ml.errors import Error
    from secure_ml.settings import Settings

    settings = Settings.from_env({"SECURE_ML_HOME": str(home), "SECURE_ML_ACTOR": "crash-harness",
                                  **({"SECURE_ML_CONFIG": str(config)} if config else {})})
    found: dict[str, list[str]] = {"partial": [], "leftovers": [], "audit": [], "registry": []}
    store = settings.artifact_store()
    for path in store.objects():
        try:
            store.verify(path.name.split(".")[0])
        except Error as exc:
            found["partial"].append(f"{path.name[:16]}: {exc}")
    # A killed atomic write leaves its temp file; it is never read (reads go by digest), but it is counted.
    found["leftovers"] = sorted(str(p.relative_to(home)) for p in settings.artifacts_dir.rglob("*")
                                if p.is_file() and p.name.startswith(".tmp"))
    try:
        settings.audit_log().verify()
    except Error as exc:
        found["audit"].append(str(exc))
    database = home / "registry" / "registry.db"
    if database.exists():
        try:
            with sqlite3.connect(database) as db:
                result = db.execute("PRAGMA integrity_check").fetchone()[0]
            if result != "ok":
                found["registry"].append(f"integrity_check: {result}")
            from secure_ml.release.registry import Registry

            for version in Registry(database).versions():
                for name, digest in (version.evidence.get("store") or {}).items():
                    try:
                        store.verify(str(digest))
                    except Error as exc:
                        found["registry"].append(f"{version.version} {name}: {exc}")
            from secure_ml.release.signed import SignedDecisions

            signed = SignedDecisions.for_settings(settings)
            for version in Registry(database).versions() if signed is not None else ():
                try:
                    signed.trusted(version, strict=True)
                except Error as exc:
                    found["registry"].append(f"{version.version}: {exc}")
        except (sqlite3.Error, Error) as exc:
            found["registry"].append(str(exc))
    return found


def prepare(home: Home, stages: list[str]) -> None:
    """init, the people's keys and the signed trust policy, and the whole pipeline once when a release
    stage is exercised."""
    people = dict(PEOPLE)
    if "approving" in stages:
        people.update({f"approver{n}": ["approver"] for n in range(1, APPROVERS + 1)})
    for who in ("owner", *people):
        home.run(["identity", "new", who, "--out", str(home.ids / who)])
    owner = ["--owner-key", str(home.key("owner"))]
    setup = [["init"], ["trust", "init", *owner]]
    setup += [["trust", "add", who, *[a for r in roles for a in ("--role", r)], "--public-key",
               str(home.ids / who / f"{who}.pub"), *owner] for who, roles in people.items()]
    for args in (*setup, *([["pipeline", "run"]] if set(stages) & NEEDS_PIPELINE else [])):
        result = home.run(args)
        if result.returncode != 0:   # once more: a loaded machine can fail a run for reasons of its own
            result = home.run(args)
        if result.returncode != 0:
            raise SystemExit(f"setup `{' '.join(args)}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    if "rotation" in stages and not set(stages) & NEEDS_PIPELINE:
        from secure_ml.settings import Settings

        settings = Settings.from_env({"SECURE_ML_HOME": home.env["SECURE_ML_HOME"], "SECURE_ML_ACTOR": "crash-harness"})
        store = settings.artifact_store()
        for i in range(20):
            store.put_bytes(os.urandom(1 << 16) + str(i).encode())


def sign_promotion(home: Home, promotion: dict[str, Any]) -> None:
    """The owner signs ``promotion`` (the model spec's overrides in the harness's own configuration
    directory, which must say what the trust policy says) into a new trust policy version."""
    spec = home.config / "models" / f"{MODEL}.yaml"
    doc = yaml.safe_load(spec.read_text())
    doc["promotion"] = promotion
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    run = home.run(["trust", "models", "--owner-key", str(home.key("owner"))])
    if run.returncode != 0:
        raise SystemExit(f"signing the promotion parameters failed: {(run.stderr or run.stdout).strip()[-300:]}")


def candidate(home: Home) -> str:
    """The newest version waiting for approval (candidate or staging)."""
    status = json.loads(home.run(["status", "--json"]).stdout)
    waiting = [v["version"] for v in status["versions"] if v.get("stage") in ("candidate", "staging")]
    if not waiting:
        raise SystemExit("no version waits for approval")
    return max(waiting, key=lambda v: int(str(v).split(":")[-1].lstrip("v") or 0))


def make_production(home: Home, version: str | None = None) -> None:
    """One approval is enough again (signed by the owner), and carol puts ``version`` (default: the
    newest waiting one) into production: what the deploy kills deploy."""
    sign_promotion(home, {})
    version = version or candidate(home)
    verb = "promote" if "carol" in approvers_of(home, version) else "approve"
    run = home.run([verb, version], who="carol")
    if run.returncode != 0:
        raise SystemExit(f"`{verb} {version}` failed: {(run.stderr or run.stdout).strip()[-300:]}")


def kill_once(home: Home, stage: str, result: StageResult, estimate: dict[str, float], rng: random.Random,
              leftovers: set[str]) -> None:
    """One kill of ``stage`` at a random point, the next run, and the checks."""
    args = STAGES[stage]
    who = None
    if stage == "approving":
        if result.kills + result.finished_before_kill >= APPROVERS:
            result.problems.append("no fresh approver left")
            return
        who = f"approver{result.kills + result.finished_before_kill + 1}"
        args = ["approve", home.candidate]
    started = time.monotonic()
    if not home.run_killed(args, rng.uniform(0.05, 0.95) * estimate[stage], stage, who):
        result.finished_before_kill += 1
        estimate[stage] = time.monotonic() - started
        return
    result.kills += 1
    started = time.monotonic()
    again = home.run(args, stage=stage, who=who)
    estimate[stage] = time.monotonic() - started      # how long a whole run takes: the next kill lands inside it
    recorded = who is None or approvers_of(home, home.candidate).count(who) == 1   # approving: exactly once
    if completed(stage, again) and recorded:
        result.recoveries += 1
    else:
        result.problems.append(f"kill {result.kills}: next run exit {again.returncode}: "
                               f"{(again.stderr or again.stdout).strip()[-200:]}"
                               + ("" if recorded else f"; {who}'s approval is not recorded exactly once"))
    found = check_home(Path(home.env["SECURE_ML_HOME"]), home.config)
    result.partial_artifacts += len(found["partial"])
    new = set(found.pop("leftovers")) - leftovers
    result.temp_files_left += len(new)
    leftovers |= new
    result.audit_failures += bool(found["audit"])
    result.registry_failures += bool(found["registry"])
    result.problems += [f"kill {result.kills}: {p}" for key in found for p in found[key]]



def exercise(home: Home, stages: list[str], kills: int, rng: random.Random, deadline: float,
             report: Path | None = None) -> list[StageResult]:
    """Each stage in turn (its share of ``kills``), in pipeline order so that approvals land on a
    staging version before the deploy kills make it production; until ``kills`` or the deadline."""
    results = {stage: StageResult(stage) for stage in stages}
    estimate: dict[str, float] = {}
    leftovers: set[str] = set()
    share = -(-kills // max(len(stages), 1))
    stage_deadline = time.monotonic()
    order = [s for s in STAGES if s in stages]
    for index, stage in enumerate(order):
        stage_deadline += (deadline - stage_deadline) / (len(order) - index)    # an equal share of the time left
        if stage in ("signing", "registering"):   # killed training left a newer model: bring the graph level
            home.run(["pipeline", "run"])
        args = STAGES[stage]
        if stage == "approving":     # many approvals asked for: each approver's approval keeps it waiting
            sign_promotion(home, {"required_approvals": APPROVERS + 2})
            home.candidate = candidate(home)
            args = ["approve", home.candidate]
        if stage == "deploying" and not home.production():
            make_production(home, home.candidate or None)
        started = time.monotonic()     # one whole run first: it must work unkilled, and says how long a run takes
        first = home.run(args, stage=stage)
        estimate[stage] = time.monotonic() - started
        if not completed(stage, first):
            results[stage].problems.append(f"unkilled run failed: {(first.stderr or first.stdout).strip()[-200:]}")
            continue
        attempts = 0
        while results[stage].kills < share and time.monotonic() < stage_deadline and attempts < 3 * share:
            attempts += 1
            started = time.monotonic()
            kill_once(home, stage, results[stage], estimate, rng, leftovers)
            results[stage].seconds = round(results[stage].seconds + time.monotonic() - started, 1)
            if report is not None:
                report.write_text(json.dumps([asdict(r) for r in results.values()], indent=1))
        stage_deadline = time.monotonic()
    return list(results.values())


def table(results: list[StageResult]) -> str:
    lines = ["| stage | kills | next run completed | partial artifacts found | audit chain broken | registry broken "
             "| temp files left (never read) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.stage} | {r.kills} | {r.recoveries} | {r.partial_artifacts} | {r.audit_failures} "
                     f"| {r.registry_failures} | {r.temp_files_left} |")
    total = [sum(getattr(r, k) for r in results) for k in ("kills", "recoveries", "partial_artifacts",
                                                           "audit_failures", "registry_failures", "temp_files_left")]
    lines.append("| **all** | " + " | ".join(str(t) for t in total) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ", ".join(STAGES))
    parser.add_argument("--kills", type=int, default=200, help="kills in all, one per stage in turn")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--budget-seconds", type=float, default=6 * 3600)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}")
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.budget_seconds
    with tempfile.TemporaryDirectory(prefix="secure-ml-crash-") as tmp:
        # The training sandbox drops privileges: it must be able to traverse to the home (0700 by default).
        os.chmod(tmp, 0o755)
        home = Home(Path(tmp))
        prepare(home, stages)
        results = exercise(home, stages, args.kills, rng, deadline, args.json)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    bad = any(r.problems or r.kills != r.recoveries for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
