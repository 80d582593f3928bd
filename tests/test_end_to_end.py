"""The README's promise end to end, on the real chain, through the real `secure-ml` CLI.

Touches: one `secure-ml pipeline run` on a fresh SECURE_ML_HOME/DAGSTER_HOME (every asset of the
real pipeline: data, GE validation, isolated training, evaluation, scan, model-signing, SLSA
attestation, registry, deployment asset), then the release commands a team runs by hand:
approvals with separation of duties, a deployer's verified deploy, export and offline
verification (including the tree digest the Kubernetes init container pins), a model tampered in
the encrypted store refused at deploy, and the audit log verified before and after an edit.
Does not touch Kubernetes itself (tests/test_k8s.py) or the UI (tests/test_browser.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the whole pipeline end to end

CLI = str(Path(sys.executable).parent / "secure-ml")
TRAINER = "pat"  # a data steward and ML engineer, added to the trust policy with a key of her own
KEYS: dict[str, Path] = {}  # who holds which identity key (filled by the `home` fixture)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from _identities import trust_people

    from secure_ml.settings import Settings

    root = tmp_path_factory.mktemp("e2e") / "home"
    settings = Settings.from_env({"SECURE_ML_HOME": str(root), "DAGSTER_HOME": str(root / "dagster")})
    KEYS.update(trust_people(settings, root.parent / "identities", unauthenticated_may_train=False,
                             extra={TRAINER: ["data_steward", "ml_engineer"]}))
    yield root


def cli(home: Path, *args: str, actor: str | None = TRAINER) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURE_ML_")}
    env.update(SECURE_ML_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), SECURE_ML_ACTOR="carol")
    if actor is not None:  # the holder of the key acts; the SECURE_ML_ACTOR claim is ignored
        env["SECURE_ML_IDENTITY"] = str(KEYS[actor])
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=600)


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def pipeline(home: Path) -> dict:
    result = cli(home, "pipeline", "run", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_pipeline_materialises_every_asset_and_passes_every_check(pipeline: dict) -> None:
    assets = {a["asset"]: a for a in pipeline["assets"]}
    assert list(assets) == ["dataset", "validated_dataset", "trained_model", "model_evaluation", "scan_report",
                            "model_signature", "attestation", "registered_model", "deployment"]
    # Nothing is deployed before an approval, so deployment is not materialised (and its checks skip).
    assert not assets.pop("deployment")["materialized"]
    assert all(a["materialized"] and len(a["sha256"]) == 64 for a in assets.values())
    assert pipeline["checks"] and all(c["passed"] for c in pipeline["checks"]), pipeline["checks"]
    assert not {c["check"] for c in pipeline["checks"]} & {"deployment_healthy", "deployed_digest_signed"}
    assert pipeline["failed_blocking_checks"] == [] and pipeline["step_failures"] == []
    # One named run per stage of the pipeline, each tagged with its source, drop, identity and model.
    assert [r["job"] for r in pipeline["runs"]] == ["ingest", "train", "release"]
    assert all(r["success"] for r in pipeline["runs"])


def test_pipeline_run_validates_in_the_worker_it_warmed(home: Path, pipeline: dict) -> None:
    """The CLI started a Great Expectations worker before its ingest run; the suite ran there."""
    log = home / "audit" / "audit.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    [validated] = [e for e in entries if e["action"] == "validation.expectations"]
    assert validated["details"]["ran"] == "worker" and validated["outcome"] == "pass"
    assert validated["details"]["passed"] == validated["details"]["expectations"] == 32


def test_release_needs_a_second_person_and_a_deployer(home: Path, pipeline: dict) -> None:
    status = json.loads(cli(home, "status", "--json").stdout)
    assert [v["stage"] for v in status["versions"]] == ["staging"] and not status["deployed"]

    # Whoever added the data and trained the model may not approve it.
    assert "pat" in one_line_error(cli(home, "approve", "staging", actor=TRAINER), 1)
    # An ML engineer is not an approver.
    assert "bob" in one_line_error(cli(home, "approve", "staging", actor="bob"), 1)
    # Nothing can be deployed before approval.
    assert "no model version is in production" in one_line_error(cli(home, "deploy", actor="dave"), 2)

    # No key: a claimed name (SECURE_ML_ACTOR=carol) grants nothing.
    assert "SECURE_ML_IDENTITY" in one_line_error(cli(home, "approve", "staging", actor=None), 1)
    approved = cli(home, "approve", "staging", actor="carol")
    assert approved.returncode == 0 and "production" in approved.stdout, approved.stderr
    # A data steward is not a deployer.
    assert "alice" in one_line_error(cli(home, "deploy", actor="alice"), 1)
    deployed = cli(home, "deploy", actor="dave")
    assert deployed.returncode == 0, deployed.stderr

    status = json.loads(cli(home, "status", "--json").stdout)
    (version,) = status["versions"]
    assert version["stage"] == "production" and [a["identity"] for a in version["approvals"]] == ["carol"]
    local = status["deployed"]["local"]
    assert local["status"] == "deployed" and local["actor"] == "dave"
    assert local["model_digest"] == version["model_digest"]
    assert Path(local["location"], "model", "model.safetensors").is_file()
    # The deploy made from the CLI is the deployment asset's materialization (its freshness is real).
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    try:
        with dg.DagsterInstance.get() as instance:
            event = instance.get_latest_materialization_event(dg.AssetKey("deployment"))
            runs = {r.run_id: r for r in instance.get_runs()}
    finally:
        del os.environ["DAGSTER_HOME"]
    assert event is not None and event.asset_materialization is not None
    assert event.asset_materialization.metadata["model_digest"].value == version["model_digest"]
    for entry in pipeline["runs"]:
        tags = runs[entry["run_id"]].tags
        assert tags["secure_ml/trigger"] == "cli" and tags["secure_ml/identity"] == TRAINER
        assert len(tags["secure_ml/drop_sha256"]) == 64 and tags["secure_ml/model"] == "german_credit"


def test_the_same_drop_again_runs_nothing_and_the_release_steps_say_so(home: Path, pipeline: dict) -> None:
    """A re-run demo: the same bytes, code and configuration make no new run and no new model version;
    approve and deploy notice the version is already in production and deployed."""
    before = json.loads(cli(home, "status", "--json").stdout)
    again = cli(home, "pipeline", "run", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["up_to_date"] is True and summary["runs"] == [] and summary["success"] is True
    digests = {a["asset"]: a["sha256"] for a in summary["assets"]}
    assert digests["trained_model"] == {a["asset"]: a["sha256"] for a in pipeline["assets"]}["trained_model"]
    # Running nothing is still decided as landing would be: an approver may not add data (audited).
    assert "may not data.add" in one_line_error(cli(home, "pipeline", "run", actor="carol"), 1)
    approve = cli(home, "approve", "staging", actor="carol")
    assert approve.returncode == 0 and "nothing awaits approval; v1 is in production" in approve.stdout, approve.stderr
    deploy = cli(home, "deploy", actor="dave")
    assert deploy.returncode == 0 and "v1" in deploy.stdout and "already deployed to local" in deploy.stdout
    after = json.loads(cli(home, "status", "--json").stdout)
    assert after["versions"] == before["versions"] and after["deployed"] == before["deployed"]


def test_export_verifies_offline_with_the_pinned_digest(home: Path, pipeline: dict, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert cli(home, "model", "export", str(out)).returncode == 0
    model, bundle, key = out / "model", out / "model.sig", out / "signing-key.pub"
    digest = json.loads(cli(home, "status", "--json").stdout)["versions"][0]["model_digest"]
    # Exactly what the Kubernetes init container runs (secure_ml/release/k8s_render.py).
    pinned = cli(home, "verify-model", str(model), "--signature", str(bundle), "--public-key", str(key),
                 "--digest", f"sha256:{digest}")
    assert pinned.returncode == 0, pinned.stderr
    assert "not the pinned" in one_line_error(cli(home, "verify-model", str(model), "--signature", str(bundle),
                                                  "--public-key", str(key), "--digest", "sha256:" + "0" * 64), 1)
    one_line_error(cli(home, "verify-model", str(model), "--signature", str(bundle), "--public-key", str(key),
                       "--digest", digest), 2)
    attested = cli(home, "verify-attestation", str(out / "attestation.dsse.json"), "--model", str(model),
                   "--signature", str(bundle), "--public-key", str(key))
    assert attested.returncode == 0, attested.stderr


def test_a_model_tampered_in_the_store_is_refused_at_deploy(home: Path, pipeline: dict) -> None:
    import dagster as dg

    from secure_ml.settings import Settings

    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    try:
        with dg.DagsterInstance.get() as instance:
            record = instance.fetch_materializations(dg.AssetKey("trained_model"), limit=1).records[0]
            tree = record.asset_materialization.metadata["sha256"].value
    finally:
        del os.environ["DAGSTER_HOME"]
    store = Settings.from_env({"SECURE_ML_HOME": str(home)}).artifact_store(actor="attacker")
    weights = store.path_for(store.get_json(tree)["files"]["model.safetensors"])
    deployments = sorted(p.name for p in (home / "deployments" / "local").iterdir())
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    # v1 is live already (a plain `deploy` would say so and write nothing): deploying it again goes
    # through the gate, which reads the stored bytes.
    refused = one_line_error(cli(home, "deploy", "--again", actor="dave"), 1)
    assert "authentication" in refused or "integrity" in refused or "verif" in refused, refused
    assert sorted(p.name for p in (home / "deployments" / "local").iterdir()) == deployments


def test_the_audit_log_covers_it_all_and_detects_an_edit(home: Path, pipeline: dict) -> None:
    log = home / "audit" / "audit.jsonl"
    actions = {json.loads(line)["action"] for line in log.read_text().splitlines()}
    # Every kind of security decision the run and the release made is on the record.
    assert {"ingest", "store.write", "access.allow", "access.deny", "sign.model", "attest.model", "scan.model",
            "registry.register", "policy.promotion", "model.approve", "deploy.gate", "deploy", "verify.model",
            "verify.attestation", "store.verify", "check.reproducible"} <= actions, sorted(actions)
    # The tampered deploy: the store's verification failure is recorded with its reason.
    failures = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e["action"] == "store.verify" and e["outcome"] == "fail" for e in failures)
    assert cli(home, "audit", "verify").returncode == 0
    lines = log.read_text().splitlines(keepends=True)
    entry = json.loads(lines[5])
    entry["actor"] = "mallory"
    lines[5] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    log.write_text("".join(lines))
    assert "entry 6" in one_line_error(cli(home, "audit", "verify"), 1)
