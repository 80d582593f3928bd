"""The training stage on a real Dagster instance: dataset -> validated_dataset -> trained_model -> model_evaluation.

Touches: a real SQLite Dagster instance under a fresh DAGSTER_HOME, the real data, validation and
training assets with every resource from ``resources.build_resources``, the encrypted store, the
audit log, Great Expectations and DVC (through the upstream assets), the isolated training process
(network namespace, socket guard, nobody), torch and matplotlib. Epochs are cut to 6 through a
SECURE_ML_CONFIG copy so the test stays fast.

Does not touch: the security and release stages, the UI itself (the plots' Markdown is checked for
embedded PNG images, which the UI's sanitiser allows), a GPU.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

import resources
from assets import data as data_stage
from assets import training as training_stage
from assets import validation as validation_stage
from secure_ml.settings import Settings
from tests.conftest import SAMPLE_CSV, land_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # slow: trains and evaluates through Dagster
CONFIG = Path(__file__).resolve().parents[1] / "secure_ml" / "config"


@pytest.fixture
def fast_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    target = tmp_path / "config"
    shutil.copytree(CONFIG, target)
    config = yaml.safe_load((target / "training.yaml").read_text())
    config["training"].update({"epochs": 6, "checkpoint_every": 2})
    (target / "training.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("SECURE_ML_CONFIG", str(target))
    return target


def _materialize(settings: Settings, drop: str, *,
                 selection: list[dg.AssetKey] | dg.AssetSelection | None = None) -> dg.ExecuteInProcessResult:
    modules = [data_stage, validation_stage, training_stage]
    with dg.DagsterInstance.get() as instance:
        return dg.materialize(
            [*dg.load_assets_from_modules(modules), *dg.load_asset_checks_from_modules(modules)],
            instance=instance,
            resources=resources.build_resources(settings),
            run_config={"ops": {"dataset": {"config": {"drop": drop}}},
                        "loggers": {"console": {"config": {"log_level": "WARNING"}}}} if not selection else
                       {"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            selection=selection,
            raise_on_error=False,
        )


def test_the_sample_goes_through_training_and_evaluation(fast_config: Path, home: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env()
    drop = land_file(settings, SAMPLE_CSV)
    from secure_ml.training import sandbox

    warmed: list[sandbox.Prepared] = []  # the real sandbox.warm, its children noted
    monkeypatch.setattr(training_stage, "warm", lambda *a, **k: warmed.append(sandbox.warm(*a, **k)) or warmed[-1])
    result = _materialize(settings, drop)
    assert result.success, [e.step_failure_data.error for e in result.get_step_failure_events()]
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    for name in ("record_complete", "reproducible", "sandbox_in_bounds", "metrics_in_limits",
                 "fairness_in_limits", "robustness_in_limits"):
        assert checks[name].passed, (name, checks[name].metadata["reason"])
    # By default reproducible replays chain segments (6 epochs, segment_epochs 1: 6 segments, k = 3).
    replayed = checks["reproducible"].metadata
    assert "re-executed 3 of 6 segments" in replayed["reason"].value and replayed["retrained"].value is False
    assert replayed["segments_checked"].value == 3 and replayed["detection_formula"].value == "1 - (1 - f)^3"
    assert replayed["detection_probability"].value["f=0.5"] == 0.875
    # The verifier's sandbox, started by the training step while it trained, was taken by the check:
    # nothing is left warm (a child the check did not claim would still be waiting here).
    assert [w.entry for w in warmed] == ["secure_ml.training.loop:child_segments"] and warmed[0].claimed
    assert not sandbox._WARM and warmed[0].started.process.poll() is not None

    events = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    trained = events["trained_model"]
    assert trained["device"].value == "cpu" and trained["epochs"].value == 6
    assert trained["train_rows"].value == 800 and trained["network_namespace"].value is True
    assert trained["isolation_level"].value == "namespaces" and trained["sandbox_cpu_seconds"].value > 0
    assert trained["sandbox_peak_memory_bytes"].value > 0 and trained["sandbox_denied"].value == {"denied": []}
    validated = events["validated_dataset"]
    assert trained["train_sha256"].value == validated["train_sha256"].value

    # The model directory comes back from the store, verified, with the record naming what made it.
    store = settings.artifact_store()
    model_dir = home / "model"
    files = store.get_tree(trained["sha256"].value, model_dir)
    assert sorted(files) == sorted(["model.safetensors", "config.json", "preprocessing.json",
                                    "training_record.json", "MODEL_CARD.md", "training_chain.safetensors"])
    record = json.loads((model_dir / "training_record.json").read_text())
    assert record["result"]["weights_sha256"] == trained["weights_sha256"].value
    assert record["data"]["dataset_sha256"] == validated["dataset_sha256"].value
    assert record["actor"] == "test-engineer" and record["isolation"]["uid"] == 65534
    assert not any(name.startswith(("SECURE_ML", "DAGSTER")) for name in record["isolation"]["environment"])

    # Epoch progress and loss went to the Dagster logs.
    with dg.DagsterInstance.get() as instance:
        messages = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any("epoch 6/6: loss" in m for m in messages), messages[-5:]

    evaluation = events["model_evaluation"]
    report = store.get_json(evaluation["sha256"].value)
    assert report["passed"] is True and report["metrics"]["accuracy"] >= 0.65
    assert set(report["fairness"]) == {"sex", "age"}
    # One metadata entry per plot, each the stored PNG inline; the verdict table carries no images.
    assert set(report["plots"]) == {"roc", "confusion", "groups", "calibration"}
    for name, digest in report["plots"].items():
        png = store.get_bytes(digest)
        entry = evaluation[f"plot_{name}"].value
        assert png.startswith(b"\x89PNG") and entry.endswith(f"(data:image/png;base64,{base64.b64encode(png).decode()})")
    assert evaluation["plot_png_sha256"].value == report["plots"]
    assert "data:image" not in evaluation["verdicts"].value and "| fairness |" in evaluation["verdicts"].value
    assert evaluation["model_tree_sha256"].value == trained["sha256"].value
    assert trained["plot_loss"].value.startswith("![Training loss](data:image/png;base64,")
    # ...and beside each, a text chart short enough for the UI to show inline (under 1,000 characters)
    for name in ("roc", "confusion", "groups_sex", "groups_age", "calibration"):
        assert 0 < len(evaluation[name].value) < 1000 and "data:image" not in evaluation[name].value, name
    assert f"{report['metrics']['roc_auc']:.3f}" in evaluation["roc"].value
    assert "epochs" in trained["loss"].value and len(trained["loss"].value) < 1000
    # Dagster's standard metadata: row count and the Columns tab, tagged from the schema.
    assert validated["dagster/row_count"].value == 1000 and events["dataset"]["dagster/row_count"].value == 1000
    columns = {c.name: c for c in validated["dagster/column_schema"].value.columns}
    assert columns["risk"].tags == {"classification": "confidential", "pii": "none", "role": "label"}
    assert columns["sex"].tags["role"] == "protected" and "good risk (1)" in (columns["risk"].description or "")

    # The audit log saw the isolated training and each check.
    actions = [json.loads(line)["action"] for line in settings.audit_path.read_text().splitlines()]
    assert "training.complete" in actions and "check.reproducible" in actions
    assert "training.checkpoint.write" in actions and "check.fairness_in_limits" in actions

    # Each check runs alone (the UI's "Execute"), judging what the assets stored: nothing materializes,
    # the model is retrained from the record and the train split read back by digest, and all six pass.
    alone = _materialize(settings, drop, selection=dg.AssetSelection.checks_for_assets(
        training_stage.trained_model, training_stage.model_evaluation))
    assert alone.success and not alone.get_asset_materialization_events()
    rechecked = {e.check_name: e for e in alone.get_asset_check_evaluations()}
    assert set(rechecked) == {"record_complete", "reproducible", "sandbox_in_bounds",
                              "metrics_in_limits", "fairness_in_limits", "robustness_in_limits"}
    assert all(e.passed for e in rechecked.values()), {n: e.metadata["reason"].value for n, e in rechecked.items()}
    assert rechecked["reproducible"].metadata["weights_sha256"].value == trained["weights_sha256"].value
    assert rechecked["sandbox_in_bounds"].metadata["compared_with_runs"].value == 0
    assert "each reached the state the chain records" in rechecked["reproducible"].metadata["reason"].value

    # reproducible.method full retrains from scratch instead, and compares the weights digest.
    config = yaml.safe_load((fast_config / "training.yaml").read_text())
    config["reproducible"]["method"] = "full"
    (fast_config / "training.yaml").write_text(yaml.safe_dump(config))
    full = _materialize(settings, drop, selection=dg.AssetSelection.checks_for_assets(training_stage.trained_model))
    retrained = {e.check_name: e for e in full.get_asset_check_evaluations()}["reproducible"]
    assert retrained.passed and retrained.metadata["retrained"].value is True
    assert "identical weights" in retrained.metadata["reason"].value

    # Configured to prove reproducibility only on release, an ordinary run says it did not retrain.
    config = yaml.safe_load((fast_config / "training.yaml").read_text())
    config["reproducible"]["when"] = "release"
    (fast_config / "training.yaml").write_text(yaml.safe_dump(config))
    ordinary = _materialize(settings, drop, selection=[dg.AssetKey("trained_model")])
    reproducible = {e.check_name: e for e in ordinary.get_asset_check_evaluations()}["reproducible"]
    assert ordinary.success and reproducible.passed and reproducible.metadata["retrained"].value is False
    assert "secure_ml/release=true" in reproducible.metadata["reason"].value

    # Then a breach: an impossible limit on one bias metric blocks; a breach set to warn only warns.
    config = yaml.safe_load((fast_config / "training.yaml").read_text())
    config["evaluation"]["fairness"]["demographic_parity_difference"] = {"max": 0.0, "on_breach": "block"}
    config["evaluation"]["metrics"]["accuracy"] = {"min": 0.99, "on_breach": "warn"}
    (fast_config / "training.yaml").write_text(yaml.safe_dump(config))
    again = _materialize(settings, drop, selection=[dg.AssetKey("model_evaluation")])
    checks = {e.check_name: e for e in again.get_asset_check_evaluations()}
    fairness, metrics = checks["fairness_in_limits"], checks["metrics_in_limits"]
    assert not fairness.passed and fairness.severity == dg.AssetCheckSeverity.ERROR
    assert "demographic_parity_difference (sex)" in fairness.metadata["reason"].value
    assert not metrics.passed and metrics.severity == dg.AssetCheckSeverity.WARN
    assert "warn only" in metrics.metadata["reason"].value
    assert checks["robustness_in_limits"].passed
    assert not again.success  # the blocking breach fails the step, so nothing downstream runs
    assert store.get_json(again.get_asset_materialization_events()[0].materialization.metadata["sha256"].value)[
        "passed"] is False
