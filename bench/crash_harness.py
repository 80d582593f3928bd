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
killed atomic write left are counted apart: nothing reads them); the audit chain verifies; the registry passes SQLite's integrity_check and every
version's stored evidence is present and verifies. A kill that lands after the command finished is
not counted. ``--budget-seconds`` stops early (the report says how many kills were made).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES: dict[str, list[str]] = {
    "rotation": ["keys", "rotate"],
    "ingest": ["pipeline", "run", "--select", "dataset"],
    "validation": ["pipeline", "run", "--select", "validated_dataset"],
    "training": ["pipeline", "run", "--select", "trained_model"],
    "signing": ["pipeline", "run", "--select", "scan_report,model_signature"],
    "registering": ["pipeline", "run", "--select", "registered_model"],
    "approving": ["approve", "{candidate}"],
    "deploying": ["deploy", "v1"],
}
# What has to exist before a stage can run: the whole pipeline for the release stages.
# (validation follows ingest's first whole run, so it needs nothing more.)
NEEDS_PIPELINE = {"training", "signing", "registering", "approving", "deploying"}
# Who runs each command: identities are keys (issue 13). bob lands data and trains, carol approves,
# dave deploys; key rotation is the owner's.
# A decision is taken once, so each approving kill is on a fresh candidate (one whole pipeline run
# registers it first, not timed) by a fresh approver: every kill lands on the write path.
ACTOR = {"approving": "carol", "deploying": "dave", "rotation": "owner"}
PEOPLE = {"bob": ["data_steward", "ml_engineer"], "carol": ["approver"], "dave": ["deployer"]}
APPROVERS = 60


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
        self.drops = 0
        self.env = {**os.environ, "SECURE_ML_HOME": str(root / "home"), "DAGSTER_HOME": str(root / "home" / "dagster"),
                    "PYTHONPATH": str(REPO), "DAGSTER_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1"}
        for name in ("SECURE_ML_KEK", "SECURE_ML_ACTOR", "SECURE_ML_IDENTITY"):
            self.env.pop(name, None)

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


def check_home(home: Path) -> dict[str, list[str]]:
    """Everything a crash must not break: store objects, audit chain, registry."""
    from secure_ml.errors import Error
    from secure_ml.settings import Settings

    settings = Settings.from_env({"SECURE_ML_HOME": str(home), "SECURE_ML_ACTOR": "crash-harness"})
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


def fresh_candidate(home: Home) -> str:
    """Land a new drop (the sample less a few rows, so training is deterministic yet gives a new model
    digest), run the whole pipeline on it, and name the new candidate."""
    lines = (REPO / "data" / "sample" / "german_credit.csv").read_text().splitlines(keepends=True)
    home.drops += 1
    drop = home.root / f"german_credit-crash{home.drops}.csv"
    drop.write_text("".join(line for i, line in enumerate(lines) if i == 0 or i % 97 != home.drops % 97))
    run = home.run(["pipeline", "run", "--data", str(drop)])
    if run.returncode != 0:
        raise SystemExit(f"pipeline run for a fresh candidate failed: {(run.stderr or run.stdout).strip()[-300:]}")
    status = json.loads(home.run(["status", "--json"]).stdout)
    candidates = [v["version"] for v in status["versions"] if v.get("stage") in ("candidate", "staging")]
    if not candidates:
        raise SystemExit("the pipeline run registered no new candidate")
    return max(candidates, key=lambda v: int(str(v).lstrip("v").split(":")[-1].lstrip("v") or 0))


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
        args = [fresh_candidate(home) if a == "{candidate}" else a for a in args]
    started = time.monotonic()
    if not home.run_killed(args, rng.uniform(0.05, 0.95) * estimate[stage], stage, who):
        result.finished_before_kill += 1
        estimate[stage] = time.monotonic() - started
        return
    result.kills += 1
    started = time.monotonic()
    again = home.run(args, stage=stage, who=who)
    estimate[stage] = time.monotonic() - started      # how long a whole run takes: the next kill lands inside it
    # A decision that had landed before the kill is refused the second time: that is a completed run.
    landed = again.returncode == 1 and "has already approved" in again.stderr
    if again.returncode == 0 or landed:
        result.recoveries += 1
    else:
        result.problems.append(f"kill {result.kills}: next run exit {again.returncode}: "
                               f"{(again.stderr or again.stdout).strip()[-200:]}")
    found = check_home(Path(home.env["SECURE_ML_HOME"]))
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
        if stage == "approving":
            args = [fresh_candidate(home) if a == "{candidate}" else a for a in args]
        started = time.monotonic()     # one whole run first: it must work unkilled, and says how long a run takes
        first = home.run(args, stage=stage)
        estimate[stage] = time.monotonic() - started
        if first.returncode != 0:
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
