"""The automation wiring in sensors/, evaluated on a real Dagster instance (no daemon here).

Touches: the landing sensor's ticks over a real landing area (settling, one run per drop keyed
by digest, its config and tags, nothing twice), that its request really materialises the drop;
the failed-check sensor after a real tampered ciphertext, and the failed-run sensor after a real
failed run, both POSTing to a real HTTP server on 127.0.0.1 and auditing; the training sensor
(a named ``train`` run once every upstream blocking check passed, nothing for a rejected drop or a
failed check) over a real instance and a stand-in graph with the real keys; no asset carrying a
condition that would run as the anonymous ``__ASSET_JOB``; the deployment freshness policy, the retraining cron,
the SECURE_ML_AUTOMATION switch; and UI hygiene of the whole graph (groups, descriptions,
owners, kinds). The proof (marked slow) runs the real ``dagster-daemon`` on a test home: a clean
drop lands and, with no manual materialisation, becomes a validated, trained, evaluated, scanned,
signed and attested candidate in one sensor-launched `train` run; a poisoned drop (10% label flips)
stops at validation, automation does not carry it further, and the failed check and run reach
the webhook. Does not touch: the browser (tests/test_browser.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

import sensors.landing
from secure_ml.definitions import build_definitions, split_by_job
from sensors import advance
from secure_ml.settings import Settings
from tests._dagster_servers import read_log
from tests.conftest import SAMPLE_CSV, land_file

pytestmark = pytest.mark.slow  # runs the real Dagster daemon

GROUPS = {"data", "training", "security", "release"}


class Hook:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                hook.events.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/token-xyz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hook_server() -> Iterator[Hook]:
    receiver = Hook()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hook]:
    receiver = Hook()
    monkeypatch.setenv("SECURE_ML_WEBHOOK_URL", receiver.url)
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture
def defs(settings: Settings) -> dg.Definitions:
    return build_definitions(settings)


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"custody": defs.resources["custody"]},  # type: ignore[index]
                                      definitions=defs)
    result = defs.resolve_sensor_def("landing_drops")(context)
    assert isinstance(result, dg.SensorResult)
    return result


def materialize(defs: dg.Definitions, instance: dg.DagsterInstance, selection: dg.AssetSelection,
                run_config: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                ) -> dg.ExecuteInProcessResult:
    return dg.materialize([*defs.assets, *(defs.asset_checks or [])],  # type: ignore[list-item]
                          instance=instance, resources=defs.resources, selection=selection,
                          run_config=run_config or {}, tags=tags or {}, raise_on_error=False)


def test_each_complete_drop_becomes_one_run_keyed_by_its_digest(settings: Settings, defs: dg.Definitions) -> None:
    with dg.DagsterInstance.get() as instance:
        first = tick(defs, instance, None)
        assert not first.run_requests
        writing = settings.landing_dir / "german_credit-writing.csv"
        writing.write_bytes(SAMPLE_CSV.read_bytes()[:999])
        future = time.time() + 30                                 # still being written (mtime keeps moving)
        os.utime(writing, (future, future))
        name = land_file(settings, SAMPLE_CSV)
        started = time.monotonic()
        ready = tick(defs, instance, first.cursor)
        assert time.monotonic() - started >= settings.config.automation.landing.recheck_seconds  # looked twice
        [request] = ready.run_requests or []                      # the settled drop, not the one in progress
        assert "german_credit-writing.csv" in json.loads(ready.cursor or "{}")["pending"]
        digest = json.loads(ready.cursor or "{}")["done"][name][2]
        assert request.run_key == f"drop-{digest}"
        assert request.run_config == {"ops": {"dataset": {"config": {"drop": name}}}}
        assert request.tags["secure_ml/drop"] == name and request.tags["secure_ml/drop_sha256"] == digest
        assert not tick(defs, instance, ready.cursor).run_requests  # nothing twice
        # the request's config and selection really ingest that drop
        result = materialize(defs, instance, dg.AssetSelection.assets("dataset"), request.run_config, request.tags)
        assert result.success
        [event] = result.get_asset_materialization_events()
        assert event.materialization.metadata["source_sha256"].value == digest
    audit = [e for e in settings.audit_log().entries() if e["action"] == "automation.landing"]
    assert [e["subject"] for e in audit] == [f"sha256:{digest}"]


def test_a_broken_cursor_stops_the_sensor_and_is_audited(settings: Settings, defs: dg.Definitions) -> None:
    with dg.DagsterInstance.get() as instance, pytest.raises(Exception, match="cursor"):
        tick(defs, instance, '{"format": "something-else"}')
    assert any(e["action"] == "automation.landing" and e["outcome"] == "fail" for e in settings.audit_log().entries())


def test_a_drops_run_stops_at_the_data_gate_and_the_jobs_split_the_graph(settings: Settings,
                                                                         defs: dg.Definitions) -> None:
    graph = defs.resolve_asset_graph()
    chosen = sensors.landing.landing_selection(settings.config.automation).resolve(graph)
    assert chosen == {dg.AssetKey("dataset"), dg.AssetKey("validated_dataset")}
    assert defs.resolve_sensor_def("landing_drops").job_name == "ingest"
    assert defs.resolve_schedule_def("weekly_retraining").job_name == "train"
    # Every asset is in exactly one named job, in pipeline order: ingest, train, release.
    split = split_by_job(defs, graph.get_all_asset_keys())
    assert [name for name, _ in split] == ["ingest", "train", "release"]
    assert {name: {k.to_user_string() for k in keys} for name, keys in split} == {
        "ingest": {"dataset", "validated_dataset"},
        "train": {"trained_model", "model_evaluation", "scan_report", "model_signature", "attestation"},
        "release": {"registered_model", "deployment"}}
    # Training follows accepted data as a named `train` run (never Dagster's anonymous __ASSET_JOB).
    assert defs.resolve_sensor_def(advance.NAME).job_name == "train"
    assert not [node.key for node in graph.asset_nodes if node.automation_condition is not None]


def test_a_tampered_ciphertext_fails_its_check_and_is_posted_and_audited(
        settings: Settings, defs: dg.Definitions, hook: Hook) -> None:
    name = land_file(settings, SAMPLE_CSV)
    with dg.DagsterInstance.get() as instance:
        context = dg.build_sensor_context(instance=instance, cursor=None, definitions=defs,
                                          resources={"custody": defs.resources["custody"]})  # type: ignore[index]
        failed_checks = defs.resolve_sensor_def("failed_checks")
        failed_checks(context)                                  # first tick: starts watching from now
        assert context.cursor is not None
        ok = materialize(defs, instance, dg.AssetSelection.assets("dataset"),
                         {"ops": {"dataset": {"config": {"drop": name}}}})
        assert ok.success
        digest = ok.get_asset_materialization_events()[0].materialization.metadata["sha256"].value
        store = settings.artifact_store()
        path = store.path_for(digest)
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x01                             # one flipped bit in the stored ciphertext
        path.write_bytes(bytes(blob))
        checks = materialize(defs, instance, dg.AssetSelection.checks_for_assets("dataset"))
        failed = [e for e in checks.get_asset_check_evaluations() if not e.passed]
        assert "ciphertext_authentic" in {e.check_name for e in failed}
        failed_checks(context)
        failed_checks(context)                                  # reported once, not on every tick
    assert len(hook.events) == len(failed)
    posted = {e["details"]["check"]: e for e in hook.events}
    event = posted["ciphertext_authentic"]
    assert event["event"] == "check.failed" and event["details"]["blocking"] is True
    assert event["details"]["asset"] == "dataset" and event["details"]["reason"]
    assert "ok" not in {e["details"]["check"] for e in hook.events}      # passed checks are not news
    actions = [(e["action"], e["outcome"]) for e in settings.audit_log().entries()]
    assert ("automation.check_failed", "fail") in actions and ("notify.webhook", "ok") in actions
    assert "token-xyz" not in settings.audit_path.read_text()


def test_a_failed_run_is_posted_with_its_one_line_reason(settings: Settings, defs: dg.Definitions, hook: Hook) -> None:
    with dg.DagsterInstance.get() as instance:
        result = materialize(defs, instance, dg.AssetSelection.assets("dataset"),
                             {"ops": {"dataset": {"config": {"drop": "german_credit-missing.csv"}}}},
                             {"secure_ml/trigger": "landing", "secure_ml/drop": "german_credit-missing.csv"})
        assert not result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None
        failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE)
        context = dg.build_run_status_sensor_context(
            sensor_name="failed_runs", dagster_event=failure, dagster_instance=instance, dagster_run=run,
            resources={"custody": defs.resources["custody"]},  # type: ignore[index]
        ).for_run_failure()
        defs.resolve_sensor_def("failed_runs")(context)
    [event] = hook.events
    assert event["event"] == "run.failed" and event["subject"] == f"run:{result.run_id}"
    assert event["details"]["trigger"] == "landing" and event["details"]["drop"] == "german_credit-missing.csv"
    [step] = event["details"]["failed_steps"]
    assert step["step"] == "dataset" and "german_credit-missing.csv" in step["error"]
    assert "Traceback" not in json.dumps(event)


def test_root_cause_tells_a_refusal_from_a_bug() -> None:
    """One classifier for the CLI and the failure sensor: our errors and dg.Failure are refusals
    (one line, explained), anything else is internal; a look-alike class name is not ours."""
    import sys

    from dagster._utils.error import serializable_error_info_from_exc_info

    from secure_ml.errors import BadInput, PolicyDenied

    class LookAlike(Exception):
        pass

    LookAlike.__name__ = "PolicyDenied"

    def info(exc: BaseException) -> Any:
        try:
            raise exc
        except BaseException:  # noqa: BLE001 - capturing what Dagster would capture
            return serializable_error_info_from_exc_info(sys.exc_info())

    assert sensors.failures.root_cause(info(BadInput("drop x has ragged rows"))) == {
        "error": "bad input: drop x has ragged rows", "kind": "refused"}
    assert sensors.failures.root_cause(info(dg.Failure(PolicyDenied("alice may not").explain()))) == {
        "error": "denied: alice may not", "kind": "refused"}
    try:
        {}["missing"]
    except KeyError as inner:
        wrapped = RuntimeError("step wrapper")
        wrapped.__cause__ = inner
    bug = sensors.failures.root_cause(info(wrapped))
    assert bug["kind"] == "internal" and "KeyError" in bug["error"]
    assert sensors.failures.root_cause(info(LookAlike("trust me")))["kind"] == "internal"


# -- train_on_accepted_data, on a real instance, over a stand-in graph with the real keys ------------
GATE = {"passed": True}
REJECT = {"now": False}
MODEL = {"secure_ml/model": "german_credit"}


@dg.asset(group_name="data", kinds={"python"}, owners=["team:test"], tags=MODEL)
def dataset() -> int:
    """A stand-in drop."""
    return 1


@dg.asset(group_name="data", deps=[dataset], kinds={"python"}, owners=["team:test"], tags=MODEL)
def validated_dataset(context) -> int:  # type: ignore[no-untyped-def]  # (Dagster refuses a string annotation)
    """Refuses its input when told to, as the real one refuses a poisoned drop: its failed verdict is
    reported against it and the step fails; nothing is materialised."""
    if REJECT["now"]:
        context.log_event(dg.AssetCheckEvaluation(asset_key=context.asset_key, check_name="gate", passed=False,
                                                  blocking=True, metadata={"reason": "stand-in rejection"}))
        raise dg.Failure(description="drop rejected: gate: stand-in", allow_retries=False)
    return 2


@dg.asset_check(asset=validated_dataset, blocking=True)
def gate() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=GATE["passed"], metadata={"reason": "test verdict"})


@dg.asset(group_name="training", deps=[validated_dataset], kinds={"python"}, owners=["team:test"], tags=MODEL)
def trained_model() -> int:
    """Trains on the accepted data."""
    return 3


def test_training_follows_only_accepted_data_as_a_named_train_run() -> None:
    automation = Settings.from_env({}).config.automation
    definitions = dg.Definitions(assets=[dataset, validated_dataset, trained_model], asset_checks=[gate])
    graph = definitions.resolve_asset_graph()
    ingest = [dataset, validated_dataset, gate]

    def due(instance: dg.DagsterInstance) -> tuple[list[dg.RunRequest], list[str]]:
        return advance.train_requests(instance, graph, models=["german_credit"], default="german_credit",
                                      automation=automation)

    with dg.instance_for_test() as instance:
        GATE["passed"], REJECT["now"] = True, False
        assert due(instance) == ([], [])                                  # nothing validated yet
        assert dg.materialize(ingest, instance=instance).success
        [request], _ = due(instance)
        assert request.asset_selection == [dg.AssetKey("trained_model")]  # the model's train assets only
        assert request.tags["secure_ml/trigger"] == "automation" and request.tags["secure_ml/model"] == "german_credit"
        first_key = request.run_key
        assert dg.materialize([trained_model], instance=instance,
                              selection=dg.AssetSelection.assets("trained_model")).success
        assert due(instance) == ([], [])                                  # trained on it already
        # an accepted version whose blocking check then fails: nothing advances, and the note says why
        GATE["passed"] = False
        assert not dg.materialize(ingest, instance=instance, raise_on_error=False).success
        requests, notes = due(instance)
        assert requests == [] and notes == ["german_credit: waiting for validated_dataset:gate"]
        # a clean version: requested once, under a new key
        GATE["passed"] = True
        assert dg.materialize(ingest, instance=instance).success
        [request], _ = due(instance)
        assert request.run_key != first_key
        # ...then a rejected drop before it trained: its failed verdict is the latest, nothing is requested
        REJECT["now"] = True
        rejected = dg.materialize(ingest, instance=instance, raise_on_error=False)
        assert not rejected.success and not [e for e in rejected.get_asset_materialization_events()
                                             if e.asset_key == dg.AssetKey("validated_dataset")]
        assert due(instance)[0] == []
        REJECT["now"] = False


def test_real_graph_carries_freshness_and_the_cron_and_no_anonymous_automation(settings: Settings,
                                                                             defs: dg.Definitions) -> None:
    graph = defs.resolve_asset_graph()
    for node in graph.asset_nodes:  # an automation condition would run as the anonymous __ASSET_JOB
        assert node.automation_condition is None, f"{node.key} carries an automation condition"
    if graph.has(dg.AssetKey("deployment")):
        policy = graph.get(dg.AssetKey("deployment")).freshness_policy
        assert policy is not None and policy.fail_window.to_timedelta().total_seconds() == 168 * 3600
    schedule = defs.resolve_schedule_def("weekly_retraining")
    assert schedule.cron_schedule == "0 3 * * 1" and schedule.execution_timezone == "UTC"
    retrained = sensors.landing.retraining_selection(settings.config.automation).resolve(graph)
    assert all(graph.get(key).group_name in {"training", "security"} for key in retrained)
    with dg.instance_for_test() as instance:
        tick_data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    [request] = tick_data.run_requests or []
    assert request.tags["secure_ml/trigger"] == "schedule" and schedule.job_name == "train"
    names = {s.name for s in defs.sensors or []}
    assert {"landing_drops", "failed_runs", "failed_checks", "train_on_accepted_data"} <= names


def test_the_switch_starts_every_sensor_and_schedule_stopped(settings: Settings) -> None:
    """SECURE_ML_AUTOMATION is read when the definitions are built: no module reload needed."""
    def statuses(switch: str) -> set[str]:
        definitions = build_definitions(Settings.from_env({**settings.environ, "SECURE_ML_AUTOMATION": switch}))
        return {*(s.default_status.value for s in definitions.sensors or []),
                *(s.default_status.value for s in definitions.schedules or [])}

    assert statuses("off") == {"STOPPED"}
    assert statuses("on") == {"RUNNING"}
    with pytest.raises(Exception, match="SECURE_ML_AUTOMATION"):
        statuses("sometimes")


def test_automation_yaml_is_read_when_definitions_are_built(settings: Settings, tmp_path: Path) -> None:
    """Intervals, cron and groups come from the active configuration directory at build time."""
    import shutil

    import yaml

    from secure_ml.config import SHIPPED_DIR

    config = tmp_path / "config"
    shutil.copytree(SHIPPED_DIR, config, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    automation = yaml.safe_load((config / "automation.yaml").read_text())
    automation["landing"]["interval_seconds"] = 42
    automation["retraining"]["cron"] = "0 4 * * 2"
    automation["failures"]["interval_seconds"] = 77
    (config / "automation.yaml").write_text(yaml.safe_dump(automation))
    definitions = build_definitions(Settings.from_env(settings.environ, config_dir=config))
    assert definitions.resolve_sensor_def("landing_drops").minimum_interval_seconds == 42
    assert definitions.resolve_sensor_def("failed_checks").minimum_interval_seconds == 77
    assert definitions.resolve_schedule_def("weekly_retraining").cron_schedule == "0 4 * * 2"
    assert definitions.resources["custody"].config_dir == str(config)  # type: ignore[index]
    automation["landing"]["interval_seconds"] = "often"
    (config / "automation.yaml").write_text(yaml.safe_dump(automation))
    with pytest.raises(Exception, match="automation.yaml: landing.interval_seconds: expected an integer"):
        build_definitions(Settings.from_env(settings.environ, config_dir=config))


def test_every_asset_explains_itself_in_the_ui(defs: dg.Definitions) -> None:
    """Groups data/training/security/release; a description, owners and kinds on every asset."""
    problems = []
    for node in defs.resolve_asset_graph().asset_nodes:
        name = node.key.to_user_string()
        if node.group_name not in GROUPS:
            problems.append(f"{name}: group {node.group_name!r}")
        if not (node.description or "").strip():
            problems.append(f"{name}: no description")
        if not node.owners:
            problems.append(f"{name}: no owners")
        if not node.kinds:
            problems.append(f"{name}: no kinds")
    assert not problems, problems


def test_the_sensor_sees_the_landing_area_of_its_own_home(settings: Settings, defs: dg.Definitions) -> None:
    custody = defs.resources["custody"]  # type: ignore[index]
    assert Path(custody.settings().landing_dir) == settings.landing_dir


# -- the proof: the real daemon turns a drop into a signed candidate, and stops a poisoned one ------
CANDIDATE = ("dataset", "validated_dataset", "trained_model", "model_evaluation", "scan_report",
             "model_signature", "attestation")


def drop_atomically(landing_dir: Path, name: str, data: bytes) -> None:
    """How a careful producer lands a file: write a hidden temporary, then rename it into place."""
    partial = landing_dir / f".{name}.part"
    partial.write_bytes(data)
    os.replace(partial, landing_dir / name)


def wait_for_drop_run(instance: dg.DagsterInstance, name: str, timeout: float, log_dir: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"secure_ml/drop": name, "secure_ml/trigger": "landing"}))
        if len(runs) > 1:
            raise AssertionError(f"drop {name} ran {len(runs)} times")
        if runs and runs[0].is_finished:
            return runs[0]
        time.sleep(1)
    raise AssertionError(f"no finished run for drop {name} after {timeout:.0f}s; daemon log:\n"
                         f"{read_log(log_dir)}")


def wait_for_candidate(instance: dg.DagsterInstance, after_run: str, timeout: float, log_dir: Path) -> list[Any]:
    """The automation runs that built the candidate after ``after_run``: each stage advances once its
    upstream checks passed, until ``attestation`` is materialised and every run has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"secure_ml/trigger": "automation"}))
        done = instance.fetch_materializations(dg.AssetKey("attestation"), limit=1).records
        if any(r.status == dg.DagsterRunStatus.FAILURE for r in runs):
            raise AssertionError(f"an automation run failed; daemon log:\n{read_log(log_dir)}")
        if done and runs and all(r.is_finished for r in runs):
            return list(reversed(runs))
        time.sleep(2)
    raise AssertionError(f"no candidate after {after_run} in {timeout:.0f}s; daemon log:\n{read_log(log_dir)}")


def run_outcome(instance: dg.DagsterInstance, run_id: str) -> tuple[set[str], dict[str, bool]]:
    materialized = {e.asset_key.to_user_string() for e in
                    (r.dagster_event for r in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION))
                    if e and e.asset_key}
    checks = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = record.dagster_event.event_specific_data  # type: ignore[union-attr]
        checks[f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"] = evaluation.passed
    return materialized, checks


def bad_finished(instance: dg.DagsterInstance, run_id: str) -> float:
    record = instance.get_run_record_by_id(run_id)
    assert record is not None and record.end_time is not None
    return float(record.end_time)


def automation_ticks_after(instance: dg.DagsterInstance, after: float, *, count: int, timeout: float) -> list[Any]:
    """The training sensor's ticks that started after ``after`` (at least ``count`` of them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [s for s in instance.all_instigator_state() if s.name == advance.NAME]
        ticks = [t for state in states for t in instance.get_ticks(state.instigator_origin_id, state.selector_id,
                                                                      limit=20)
                 if t.timestamp > after and t.status.value != "STARTED"]
        if len(ticks) >= count:
            return ticks
        time.sleep(1)
    raise AssertionError(f"the training sensor did not tick {count} times in {timeout:.0f}s")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the candidate follows in several automation runs
def test_a_clean_drop_becomes_a_signed_candidate_and_a_poisoned_one_stops_at_validation(
        tmp_path: Path, hook_server: Hook) -> None:
    from secure_ml.data.poisoning import flip_labels
    from tests._dagster_servers import daemon, make_home

    home = make_home(tmp_path, automation="on", extra={"SECURE_ML_WEBHOOK_URL": hook_server.url,
                                                        "SECURE_ML_ACTOR": "alice"})
    graph = build_definitions(home.settings).resolve_asset_graph()
    expected = {k.to_user_string() for k in
                sensors.landing.landing_selection(home.settings.config.automation).resolve(graph)}
    missing_stages = [key for key in CANDIDATE if dg.AssetKey(key) not in graph.get_all_asset_keys()]
    logs = tmp_path / "logs"
    logs.mkdir()
    sample = pd.read_csv(SAMPLE_CSV)
    poisoned, _ = flip_labels(sample, "risk", 0.10, seed=3)
    instance = dg.DagsterInstance.from_config(str(home.dagster_home))
    try:
        with daemon(home, logs):
            drop_atomically(home.settings.landing_dir, "german_credit-clean.csv", SAMPLE_CSV.read_bytes())
            clean = wait_for_drop_run(instance, "german_credit-clean.csv", 300, logs)
            materialized, checks = run_outcome(instance, clean.run_id)
            assert clean.status == dg.DagsterRunStatus.SUCCESS, (checks, read_log(logs))
            assert clean.job_name == "ingest" and materialized == expected == {"dataset", "validated_dataset"}
            assert checks and all(checks.values()), checks
            assert clean.tags["secure_ml/trigger"] == "landing"
            # The candidate follows by automation, once every blocking check upstream passed.
            built = wait_for_candidate(instance, clean.run_id, 720, logs)
            materialized, checks = set(), {}
            for run in built:
                assert run.status == dg.DagsterRunStatus.SUCCESS, read_log(logs)
                got, verdicts = run_outcome(instance, run.run_id)
                materialized |= got
                checks.update(verdicts)
                tags = instance.get_run_by_id(run.run_id).tags  # type: ignore[union-attr]
                assert tags["secure_ml/trigger"] == "automation" and tags["secure_ml/model"] == "german_credit"
                assert run.job_name == "train"  # a named job on the Runs page and timeline
                assert tags["secure_ml/drop_sha256"] == clean.tags["secure_ml/drop_sha256"]
                assert tags["secure_ml/identity"] == "alice"
            assert set(CANDIDATE) - expected == materialized, materialized
            assert checks and all(checks.values()), checks
            built_ids = {run.run_id for run in built}

            drop_atomically(home.settings.landing_dir, "german_credit-poisoned.csv",
                            poisoned.to_csv(index=False).encode())
            bad = wait_for_drop_run(instance, "german_credit-poisoned.csv", 300, logs)
            materialized, checks = run_outcome(instance, bad.run_id)
            assert bad.status == dg.DagsterRunStatus.FAILURE
            assert checks["validated_dataset:poisoning_below_limit"] is False
            assert materialized == {"dataset"}, materialized  # the rejected drop never becomes an input
            # automation must not pick anything up afterwards either
            ticks = automation_ticks_after(instance, bad_finished(instance, bad.run_id), count=2, timeout=60)
            assert all(not tick.run_ids for tick in ticks), [tick.run_ids for tick in ticks]
            for key in CANDIDATE[1:]:
                latest = instance.fetch_materializations(dg.AssetKey(key), limit=1).records
                assert latest and latest[0].run_id in {clean.run_id, *built_ids}, f"{key} moved on a rejected drop"
            deadline = time.monotonic() + 40                  # failure sensors tick every 15 s
            while time.monotonic() < deadline and not (
                    {"run.failed", "check.failed"} <= {e["event"] for e in hook_server.events}):
                time.sleep(1)
        # The two drop runs and the candidate's automation runs, nothing else.
        extra = [r.run_id for r in instance.get_runs() if r.run_id not in {clean.run_id, bad.run_id, *built_ids}]
        assert extra == [], f"unexpected runs besides the drop runs and the candidate's: {extra}"
    finally:
        instance.dispose()
    events = {(e["event"], e["details"].get("check", "")) for e in hook_server.events}
    assert ("check.failed", "poisoning_below_limit") in events, hook_server.events
    assert any(e["event"] == "run.failed" and e["details"]["run_id"] == bad.run_id for e in hook_server.events)
    if missing_stages:
        warnings.warn(f"stages not defined yet, so not proven here: {', '.join(missing_stages)}", stacklevel=1)
