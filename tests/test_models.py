"""Many models in one project (issue 16): model specs, `model add`, routing, per-model gates and registry.

Touches: copies of the shipped configuration with a second model drafted into it by the real
``model add`` (scikit-learn's breast-cancer table), the real Rego promotion policy (regopy), a real
signed trust policy, the real SQLite registry, and the real Dagster definitions (asset keys, checks,
tags, sensors, schedules). Does not touch: training or the whole pipeline (tests/test_models_pipeline.py
runs a second model through a real Dagster instance).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from secure_ml.config import SHIPPED_DIR, Config
from secure_ml.errors import BadInput, ConfigurationError, PolicyDenied
from secure_ml.settings import Settings

REPO = Path(__file__).resolve().parents[1]
REASON = "tumour measurements: no attribute of a person"


def breast_cancer_csv(path: Path, rows: int | None = None) -> Path:
    """scikit-learn's bundled breast-cancer table (569 rows, 30 numeric features, label `target`)."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    (frame if rows is None else frame.head(rows)).to_csv(path, index=False)
    return path


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(SHIPPED_DIR, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return target


@pytest.fixture
def two_models(config_dir: Path, tmp_path: Path) -> Path:
    """The shipped configuration plus breast_cancer, drafted by `model add`."""
    from secure_ml.data.onboarding import draft_model

    draft_model(config_dir, "breast_cancer", breast_cancer_csv(tmp_path / "breast_cancer.csv"), label="target",
                no_protected=REASON)
    return config_dir


def write_spec(config_dir: Path, name: str, **changes: Any) -> None:
    spec = yaml.safe_load((config_dir / "models" / "german_credit.yaml").read_text())
    spec.update({"name": name, "sources": [name], **changes})
    spec = {k: v for k, v in spec.items() if v is not ...}
    (config_dir / "models" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    sources = yaml.safe_load((config_dir / "sources.yaml").read_text())
    sources["sources"].append({"name": name, "patterns": [f"{name}*"], "owner": "team:x", "classification": "internal"})
    (config_dir / "sources.yaml").write_text(yaml.safe_dump(sources))


def refusal(config_dir: Path) -> str:
    with pytest.raises(ConfigurationError) as caught:
        Config(config_dir).models()
    line = caught.value.explain()
    assert "\n" not in line and "Traceback" not in line
    return line


# -- the spec ------------------------------------------------------------------------------------
def test_the_shipped_demo_spec_changes_nothing_german_credit_sees() -> None:
    settings = Settings.from_env({})
    spec = settings.config.models()["german_credit"]
    assert spec.protected_attributes == ("sex", "age") and spec.label == "risk" and spec.no_protected_reason is None
    for name in ("training", "release", "validation"):
        raw = yaml.safe_load((SHIPPED_DIR / f"{name}.yaml").read_text())
        assert settings.for_model("german_credit").load_config(name) == raw == settings.load_config(name)


def test_a_spec_with_an_unknown_key_is_one_line_naming_it(config_dir: Path) -> None:
    write_spec(config_dir, "loans", treshold=0.5)
    assert refusal(config_dir) == f"configuration error: {config_dir / 'models' / 'loans.yaml'}: treshold: unknown key"


def test_a_spec_without_a_label_is_one_line_naming_it(config_dir: Path) -> None:
    write_spec(config_dir, "loans", label=...)
    assert refusal(config_dir).endswith("models/loans.yaml: label: required key is missing")


def test_a_protected_attribute_not_in_the_schema_is_one_line_naming_it(config_dir: Path) -> None:
    write_spec(config_dir, "loans", protected=["sex", "gender"])
    assert refusal(config_dir).endswith("models/loans.yaml: protected: 'gender' is not a column of "
                                        "schemas/german_credit.yaml")


def test_a_label_the_schema_does_not_have_and_no_protected_without_a_reason_are_refused(config_dir: Path) -> None:
    write_spec(config_dir, "loans", label="defaulted")
    assert "label: 'defaulted' is not a column of schemas/german_credit.yaml" in refusal(config_dir)
    write_spec(config_dir, "loans", protected={"none": ""})
    assert "protected" in refusal(config_dir)
    write_spec(config_dir, "loans", protected=[])
    assert "protected must list attributes or say {none" in refusal(config_dir)


def test_two_models_cannot_claim_one_source(config_dir: Path) -> None:
    write_spec(config_dir, "loans", sources=["german_credit"])
    assert "sources: 'german_credit' is already the source of model 'german_credit'" in refusal(config_dir)


def test_an_unknown_model_is_refused_naming_the_known_ones(two_models: Path) -> None:
    settings = Settings.from_env({"SECURE_ML_CONFIG": str(two_models)})
    with pytest.raises(ConfigurationError, match=r"no model named 'iris' \(models: breast_cancer, german_credit\)"):
        settings.for_model("iris")


# -- model add ---------------------------------------------------------------------------------------
def run_cli(*argv: str, config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SECURE_ML_HOME": str(home), "SECURE_ML_CONFIG": str(config),
           "SECURE_ML_ACTOR": "test-engineer"}
    return subprocess.run([sys.executable, "-m", "secure_ml", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, config: Path,
        home: Path) -> tuple[int, str, str]:
    """The CLI in this process (the subprocess form is run_cli): exit code, stdout, stderr."""
    from secure_ml.cli import main

    for variable, value in (("SECURE_ML_HOME", str(home)), ("SECURE_ML_CONFIG", str(config)),
                            ("SECURE_ML_ACTOR", "test-engineer")):
        monkeypatch.setenv(variable, value)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_model_add_drafts_spec_schema_pinned_reference_and_source(config_dir: Path, tmp_path: Path) -> None:
    sample = breast_cancer_csv(tmp_path / "breast_cancer.csv")
    before = (config_dir / "sources.yaml").read_text()
    result = run_cli("model", "add", "breast_cancer", "--data", str(sample), "--label", "target",
                     "--no-protected", REASON, config=config_dir, home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert "review before the first run" in result.stdout and "pipeline run --data" in result.stdout
    spec = Config(config_dir).models()["breast_cancer"]
    assert spec.no_protected_reason == REASON and spec.sources == ["breast_cancer"] and spec.label == "target"
    schema = yaml.safe_load((config_dir / "schemas" / "breast_cancer.yaml").read_text())
    assert len(schema["columns"]) == 31 and schema["label"] == "target"
    from secure_ml.custody.integrity import sha256_bytes

    assert schema["reference"]["sha256"] == sha256_bytes(sample.read_bytes())
    assert (config_dir / "schemas" / "breast_cancer.reference.csv").read_bytes() == sample.read_bytes()
    after = (config_dir / "sources.yaml").read_text()
    assert after.startswith(before.rstrip("\n")) and "patterns: [breast_cancer*]" in after  # comments kept
    # German credit still sees exactly the shipped files.
    settings = Settings.from_env({"SECURE_ML_CONFIG": str(config_dir)})
    assert settings.load_config("training") == yaml.safe_load((SHIPPED_DIR / "training.yaml").read_text())


@pytest.mark.parametrize(("argv", "message"), [
    (["--label", "diagnosis", "--no-protected", REASON], "--label 'diagnosis' is not a column of breast_cancer.csv"),
    (["--label", "target", "--protected", "sex"], "--protected 'sex' is not a column of breast_cancer.csv"),
    (["--label", "target", "--no-protected", REASON, "--pattern", "*.csv"],
     "would match sources german_credit, breast_cancer"),
    (["--label", "target", "--no-protected", REASON, "--pattern", "cancer*"],
     "would not match the pattern cancer*"),
])
def test_model_add_refuses_bad_input_in_one_line_and_writes_nothing(
        config_dir: Path, tmp_path: Path, argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    sample = breast_cancer_csv(tmp_path / "breast_cancer.csv", rows=60)
    files = {p: p.read_bytes() for p in config_dir.rglob("*") if p.is_file()}
    code, _, err = cli(monkeypatch, capsys, "model", "add", "breast_cancer", "--data", str(sample), *argv,
                       config=config_dir, home=tmp_path / "home")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in config_dir.rglob("*") if p.is_file()} == files


def test_model_add_refuses_an_existing_model(two_models: Path, tmp_path: Path) -> None:
    from secure_ml.data.onboarding import draft_model

    with pytest.raises(BadInput, match="model 'german_credit' already exists"):
        draft_model(two_models, "german_credit", tmp_path / "breast_cancer.csv", label="target", no_protected=REASON)


# -- routing drops -----------------------------------------------------------------------------------------
def test_a_drop_is_routed_to_its_model_and_one_matching_two_models_is_refused_naming_both(two_models: Path) -> None:
    from secure_ml.governance.sources import ApprovedSources

    settings = Settings.from_env({"SECURE_ML_CONFIG": str(two_models)})
    sources = ApprovedSources.from_settings(settings)
    assert sources.route("breast_cancer-0123456789ab.csv") == "breast_cancer"
    assert sources.route("german_credit-0123456789ab.csv") == "german_credit"
    assert sources.route("iris.csv") is None
    text = (two_models / "sources.yaml").read_text().replace("patterns: [breast_cancer*]",
                                                              "patterns: [breast_cancer*, german_credit_x*]")
    (two_models / "sources.yaml").write_text(text)
    sources = ApprovedSources.from_settings(Settings.from_env({"SECURE_ML_CONFIG": str(two_models)}))
    with pytest.raises(ConfigurationError) as caught:
        sources.route("german_credit_x.csv")
    assert caught.value.explain() == ("configuration error: drop 'german_credit_x.csv' matches the sources of models "
                                      "'german_credit' (source 'german_credit') and 'breast_cancer' (source "
                                      "'breast_cancer'); refused: make their patterns disjoint")
    with pytest.raises(ConfigurationError, match="matches the sources of models"):
        sources.require("german_credit_x.csv")


def test_one_models_pipeline_never_ingests_another_models_drop(two_models: Path) -> None:
    from secure_ml.governance.sources import ApprovedSources

    settings = Settings.from_env({"SECURE_ML_CONFIG": str(two_models)}).for_model("breast_cancer")
    sources = ApprovedSources.from_settings(settings)
    assert sources.require("breast_cancer-0123456789ab.csv").name == "breast_cancer"
    with pytest.raises(PolicyDenied, match="is from source 'german_credit' of model 'german_credit', not of model "
                                           "'breast_cancer'"):
        sources.require("german_credit-0123456789ab.csv")


# -- per-model gates ----------------------------------------------------------------------------------------
def promotion_input(**evaluation: Any) -> dict[str, Any]:
    good: dict[str, Any] = {
        "version": "v1", "model_digest": "d" * 64, "target_stage": "production",
        "evaluation": {"passed": True, "metrics": {"accuracy": 0.95, "roc_auc": 0.98}, "fairness_gaps": [],
                       "robustness": {}, **evaluation},
        "scan": {"blocking": False, "counts": {}, "findings": []},
        "signature": {"verified": True, "digest": "d" * 64, "reason": ""},
        "attestation": {"verified": True, "subject_matches": True, "reason": ""},
        "provenance": {"source": "breast_cancer.csv", "approved": True, "data_actor": "alice"},
        "training": {"actor": "bob", "code_commit": "abc", "code_author": None},
        "registered_by": "bob", "approvals": [{"identity": "carol", "roles": ["approver"]}],
    }
    return good


def test_a_model_without_protected_attributes_is_promotable_and_the_reason_is_in_the_policy_data(
        two_models: Path) -> None:
    from secure_ml.governance.policy import PolicyEngine

    settings = Settings.from_env({"SECURE_ML_CONFIG": str(two_models)})
    demo = PolicyEngine.from_settings(settings).decide("promotion", promotion_input())
    assert not demo.allowed
    assert "bias metric demographic_parity_difference is missing from the evaluation" in demo.reasons
    breast = settings.for_model("breast_cancer")
    promotion = breast.load_config("release")["promotion"]
    assert promotion["no_protected_attributes"] == REASON and promotion["max_fairness_gap"] == {}
    assert promotion["min_metrics"] == settings.load_config("release")["promotion"]["min_metrics"]
    assert breast.load_config("training")["evaluation"]["fairness"] == {}
    decision = PolicyEngine.from_settings(breast).decide("promotion", promotion_input())
    assert decision.allowed, decision.reasons
    # Its other gates still hold: a weak model is refused.
    weak = PolicyEngine.from_settings(breast).decide("promotion", promotion_input(metrics={"accuracy": 0.5,
                                                                                           "roc_auc": 0.9}))
    assert weak.reasons == ("metric accuracy is 0.5, under the minimum 0.65",)


def test_a_specs_promotion_parameters_must_be_in_the_signed_trust_policy(two_models: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_ml.cli import main
    from secure_ml.governance.authn import check_config, verified_policy
    from secure_ml.governance.identity import new_identity
    from secure_ml.settings import init_home

    home = tmp_path / "home"
    for variable, value in (("SECURE_ML_HOME", str(home)), ("SECURE_ML_CONFIG", str(two_models)),
                            ("SECURE_ML_ACTOR", "owner")):
        monkeypatch.setenv(variable, value)
    init_home(Settings.from_env())
    # A policy signed before the model existed: the new model's gate data is not in it.
    spec_file = two_models / "models" / "breast_cancer.yaml"
    held = spec_file.read_text()
    spec_file.unlink()
    owner_key = new_identity("owner", tmp_path / "owner")[0]
    assert main(["trust", "init", "--owner-key", str(owner_key)]) == 0
    spec_file.write_text(held)
    settings = Settings.from_env()
    policy = verified_policy(settings)
    check_config(settings, policy)  # german credit: unchanged, accepted
    with pytest.raises(PolicyDenied, match=r"changes what the gates decide \(promotion.max_fairness_gap, "
                                           r"promotion.no_protected_attributes\)"):
        check_config(settings.for_model("breast_cancer"), policy)
    assert main(["trust", "models", "--owner-key", str(owner_key)]) == 0
    policy = verified_policy(settings)
    assert policy.promotion_for("breast_cancer")["no_protected_attributes"] == REASON
    check_config(settings.for_model("breast_cancer"), policy)
    check_config(settings, policy)
    # Editing the spec after signing (dropping a threshold) is refused again.
    spec = yaml.safe_load(spec_file.read_text())
    spec["promotion"] = {"min_metrics": {}}
    spec_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(PolicyDenied, match="promotion.min_metrics"):
        check_config(Settings.from_env().for_model("breast_cancer"), policy)


# -- the registry per model ------------------------------------------------------------------------------
def test_registry_versions_production_and_deployments_are_per_model(tmp_path: Path) -> None:
    from secure_ml.release.registry import Registry

    path = tmp_path / "registry.db"
    demo, breast = Registry(path, model="german_credit"), Registry(path, model="breast_cancer")
    v1, _ = demo.register("a" * 64, {}, actor="bob")
    v2, _ = breast.register("b" * 64, {}, actor="bob")
    v3, _ = demo.register("c" * 64, {}, actor="bob")
    assert (v1.model, v2.model, v3.model) == ("german_credit", "breast_cancer", "german_credit")
    demo.set_stage("v1", "production", actor="carol")
    breast.set_stage("breast_cancer:v2", "production", actor="carol")
    demo.set_stage("v3", "production", actor="carol")  # archives v1, not breast_cancer's v2
    assert demo.get("v1").stage == "archived" and breast.get("v2").stage == "production"
    assert demo.production().version == "v3" and breast.production().version == "v2"  # type: ignore[union-attr]
    assert breast.resolve("production") == "v2" and demo.resolve("german_credit:production") == "v3"
    assert breast.resolve("breast_cancer:v2") == "v2" == Registry(path).resolve("breast_cancer:v2")
    with pytest.raises(BadInput, match=r"v2 is a version of model 'breast_cancer', not of 'german_credit' "
                                       r"\(name it breast_cancer:v2\)"):
        demo.get("v2")  # refused before anything is read or written for the wrong model
    with pytest.raises(BadInput, match="v2 is a version of model 'breast_cancer'"):
        demo.set_stage("v2", "archived", actor="carol")
    assert breast.get("v2").stage == "production"
    with pytest.raises(BadInput, match="v3 is a version of model 'german_credit', not of 'breast_cancer'"):
        demo.resolve("breast_cancer:v3")
    with pytest.raises(BadInput, match="not a model name"):
        demo.resolve("Breast Cancer:v2")
    demo.record_deployment(actor="dave", target="local", version="v3", model_digest="c" * 64, status="deployed",
                           location="/d/v3")
    breast.record_deployment(actor="dave", target="local", version="v2", model_digest="b" * 64, status="deployed",
                             location="/d/models/breast_cancer/v2")
    assert demo.current_deployment("local").version == "v3"  # type: ignore[union-attr]
    assert breast.current_deployment("local").version == "v2"  # type: ignore[union-attr]
    everything = Registry(path)
    assert [(d.model, d.version, d.location) for d in everything.live("local")] == [
        ("breast_cancer", "v2", "/d/models/breast_cancer/v2"), ("german_credit", "v3", "/d/v3")]
    status = json.loads(json.dumps(demo.status(), default=str))
    assert [(v["model"], v["version"], v["name"]) for v in status["versions"]] == [
        ("german_credit", "v1", "german_credit:v1"), ("breast_cancer", "v2", "breast_cancer:v2"),
        ("german_credit", "v3", "german_credit:v3")]
    assert status["deployed"]["local"]["version"] == "v3"
    assert status["deployed_by_model"]["breast_cancer"]["local"]["version"] == "v2"


def test_a_registry_from_before_models_is_migrated_to_the_demo_model(tmp_path: Path) -> None:
    import sqlite3

    from secure_ml.release import registry as module
    from secure_ml.release.registry import Registry

    path = tmp_path / "old.db"
    old_schema = module._SCHEMA
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO versions VALUES ('v1', 1, ?, 'production', 'bob', 'now', '{}')", ("e" * 64,))
    assert Registry(path).get("v1").model == "german_credit"
    assert Registry(path, model="german_credit").production().version == "v1"  # type: ignore[union-attr]
    assert Registry(path, model="breast_cancer").production() is None


# -- Dagster: the same stages per model ---------------------------------------------------------------------
def test_each_model_gets_the_same_stages_checks_and_schedules_with_its_own_keys(two_models: Path) -> None:
    import dagster as dg

    from secure_ml.definitions import build_definitions

    settings = Settings.from_env({"SECURE_ML_CONFIG": str(two_models), "SECURE_ML_AUTOMATION": "off"})
    definitions = build_definitions(settings)
    graph = definitions.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    stages = {"dataset", "validated_dataset", "trained_model", "model_evaluation", "scan_report", "model_signature",
              "attestation", "registered_model", "deployment"}
    assert keys == stages | {f"breast_cancer/{s}" for s in stages}
    node = graph.get(dg.AssetKey(["breast_cancer", "trained_model"]))
    assert {k.to_user_string() for k in node.parent_keys} == {"breast_cancer/validated_dataset"}
    assert node.tags["secure_ml/model"] == "breast_cancer" and node.group_name == "training"
    assert graph.get(dg.AssetKey("trained_model")).tags["secure_ml/model"] == "german_credit"
    assert graph.get(dg.AssetKey(["breast_cancer", "deployment"])).freshness_policy is not None
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    demo_checks = {name for asset, name in checks if "/" not in asset}
    assert demo_checks and {(f"breast_cancer/{a}", n) for a, n in checks if "/" not in a} <= checks
    assert sorted(s.name for s in definitions.schedules) == ["breast_cancer_weekly_retraining", "weekly_retraining"]
    # each model's schedule is a run of the named `train` job over that model's training and security assets
    schedule = definitions.resolve_schedule_def("breast_cancer_weekly_retraining")
    with dg.instance_for_test() as instance:
        [request] = schedule.evaluate_tick(dg.build_schedule_context(
            instance=instance, repository_def=definitions.get_repository_def())).run_requests or []
    assert schedule.job_name == "train" and request.tags["secure_ml/model"] == "breast_cancer"
    assert {k.to_user_string() for k in request.asset_selection or []} == {
        f"breast_cancer/{s}" for s in ("trained_model", "model_evaluation", "scan_report", "model_signature",
                                       "attestation")}
    landing = next(s for s in definitions.sensors if s.name == "landing_drops")
    assert landing.job_name == "ingest"  # every model's drops stop at its data gate (issue 18)
    ingest = definitions.resolve_job_def("ingest").asset_layer.selected_asset_keys
    assert {k.to_user_string() for k in ingest} == {"dataset", "validated_dataset", "breast_cancer/dataset",
                                                   "breast_cancer/validated_dataset"}


def test_definitions_for_many_models_refuse_a_bad_spec_in_one_line(two_models: Path) -> None:
    from secure_ml.definitions import build_definitions

    spec = two_models / "models" / "breast_cancer.yaml"
    spec.write_text(spec.read_text().replace("label: target", "label: diagnosis"))
    with pytest.raises(ConfigurationError, match="models/breast_cancer.yaml: label: 'diagnosis' is not a column"):
        build_definitions(Settings.from_env({"SECURE_ML_CONFIG": str(two_models)}))


def test_status_json_gives_each_versions_model(two_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from secure_ml.release.registry import Registry

    home = tmp_path / "home"
    Registry(home / "registry" / "registry.db", model="breast_cancer").register("b" * 64, {}, actor="bob")
    code, out, err = cli(monkeypatch, capsys, "status", "--json", config=two_models, home=home)
    assert code == 0, err
    versions = json.loads(out)["versions"]
    assert [(v["model"], v["name"]) for v in versions] == [("breast_cancer", "breast_cancer:v1")]
