"""Many models on a real Dagster instance: drops routed to their model, one model's failure stops only its own lineage.

Touches: the real definitions for two models (German credit and scikit-learn's breast-cancer table,
drafted by `model add`'s code), the real landing sensor on a real instance, and dg.materialize of
both models' data stages in one run (real store, Great Expectations, poisoning screen). Does not
touch: training (the blocked model's trained_model must simply never start; the full breast-cancer
run to a signed candidate is measured by `python -m bench --only models`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from resources.custody import op_name
from secure_ml.config import SHIPPED_DIR
from secure_ml.definitions import build_definitions
from secure_ml.settings import Settings
from tests.conftest import SAMPLE_CSV, land_file
from tests.test_models import REASON, breast_cancer_csv

pytestmark = pytest.mark.slow  # materialises two models' data stages on real drops


@pytest.fixture
def two(settings: Settings, tmp_path: Path) -> tuple[Settings, Path]:
    from secure_ml.data.onboarding import draft_model

    config = tmp_path / "config"
    shutil.copytree(SHIPPED_DIR, config, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    sample = breast_cancer_csv(tmp_path / "breast_cancer.csv")
    draft_model(config, "breast_cancer", sample, label="target", no_protected=REASON)
    return Settings.from_env({**settings.environ, "SECURE_ML_CONFIG": str(config), "SECURE_ML_AUTOMATION": "off"}), sample


def tick(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=None, definitions=defs,
                                      resources={"custody": defs.resources["custody"]})  # type: ignore[index]
    result = defs.resolve_sensor_def("landing_drops")(context)
    assert isinstance(result, dg.SensorResult)
    return result


def test_each_drop_runs_its_own_models_assets_and_one_matching_two_models_runs_nothing(
        two: tuple[Settings, Path]) -> None:
    settings, sample = two
    sources = settings.config_dir / "sources.yaml"
    sources.write_text(sources.read_text().replace("patterns: [breast_cancer*]",
                                                   "patterns: [breast_cancer*, german_credit_x*]"))
    defs = build_definitions(settings)
    land_file(settings, SAMPLE_CSV, "german_credit-v1.csv")
    land_file(settings, sample, "breast_cancer-v1.csv")
    land_file(settings, SAMPLE_CSV, "german_credit_x.csv")
    with dg.DagsterInstance.get() as instance:
        result = tick(defs, instance)
    runs = {r.tags["secure_ml/drop"]: r for r in result.run_requests or []}
    assert set(runs) == {"german_credit-v1.csv", "breast_cancer-v1.csv"}
    breast = runs["breast_cancer-v1.csv"]
    assert breast.tags["secure_ml/model"] == "breast_cancer"
    # A drop's run stops at its model's data gate (issue 18); training follows by automation.
    assert {k.to_user_string() for k in breast.asset_selection or []} == {
        f"breast_cancer/{name}" for name in ("dataset", "validated_dataset")}
    assert {k.to_user_string() for k in runs["german_credit-v1.csv"].asset_selection or []} == {
        "dataset", "validated_dataset"}
    # Each run is the sensor's job subset to one model's assets: its config names the op of that subset.
    repository = defs.get_repository_def()
    job = repository.get_job(defs.resolve_sensor_def("landing_drops").job_name)
    for request in runs.values():
        subset = job.get_subset(asset_selection=set(request.asset_selection or []))
        assert set(request.run_config["ops"]) <= set(subset.graph.node_dict)
        dataset = next(k for k in request.asset_selection or [] if k.path[-1] == "dataset")
        assert subset.asset_layer.get_op_output_handle(dataset).node_handle.name in request.run_config["ops"]
    refused = [e for e in settings.audit_log().entries() if e.get("action") == "automation.landing"
               and e.get("outcome") == "deny"]
    assert len(refused) == 1
    assert refused[0]["details"]["reason"] == (
        "configuration error: drop 'german_credit_x.csv' matches the sources of models 'german_credit' (source "
        "'german_credit') and 'breast_cancer' (source 'breast_cancer'); refused: make their patterns disjoint")


def test_a_failed_blocking_check_stops_only_its_own_models_downstream(two: tuple[Settings, Path],
                                                                       tmp_path: Path) -> None:
    settings, sample = two
    defs = build_definitions(settings)
    bad = pd.read_csv(sample)
    bad.loc[0, "mean radius"] = 1000.0  # far outside the reviewed schema: the expectations fail
    bad_file = tmp_path / "breast_cancer-bad.csv"
    bad.to_csv(bad_file, index=False)
    drops = {"dataset": land_file(settings, SAMPLE_CSV, "german_credit-v1.csv"),
             "breast_cancer/dataset": land_file(settings, bad_file)}
    keys = [dg.AssetKey(k) for k in ("dataset", "validated_dataset")] + [
        dg.AssetKey(["breast_cancer", k]) for k in ("dataset", "validated_dataset", "trained_model")]
    graph = defs.resolve_asset_graph()
    ops = {op_name(graph, dg.AssetKey.from_user_string(key)): {"config": {"drop": drop}} for key, drop in drops.items()}
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([*defs.assets, *(defs.asset_checks or [])],  # type: ignore[list-item]
                                instance=instance, resources=defs.resources, selection=keys,
                                run_config={"ops": ops, "loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                                raise_on_error=False)
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    with dg.DagsterInstance.get() as instance:  # a rejection's verdicts are reported by the asset step itself
        records = instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]  # type: ignore[union-attr]
    checks: dict[str, Any] = {f"{e.asset_key.to_user_string()}:{e.check_name}": e for e in evaluations}
    assert {"dataset", "validated_dataset", "breast_cancer/dataset"} <= done
    assert "breast_cancer/validated_dataset" not in done  # a rejected drop is never materialised
    assert "breast_cancer/trained_model" not in done  # stopped by its own model's failed check
    assert not checks["breast_cancer/validated_dataset:expectations_pass"].passed
    assert checks["validated_dataset:expectations_pass"].passed  # the other model is untouched
    assert checks["validated_dataset:poisoning_below_limit"].passed
    recorded = defs.resources["custody"].recorded  # type: ignore[index]
    with dg.DagsterInstance.get() as instance:
        assert recorded(instance, dg.AssetKey(["breast_cancer", "dataset"]))["source"] == "breast_cancer-bad.csv"
        assert recorded(instance, dg.AssetKey("dataset"))["source"] == "german_credit-v1.csv"


def test_pipeline_run_gives_each_models_dataset_its_drop(two: tuple[Settings, Path]) -> None:
    """`secure-ml pipeline run`'s path: a run confined to one model addresses that run's own dataset op."""
    from secure_ml.cli.cmd_pipeline import route
    from secure_ml.definitions import run_pipeline

    settings, sample = two
    for drop in (land_file(settings, SAMPLE_CSV, "german_credit-v1.csv"), land_file(settings, sample)):
        model = route(settings, drop, None)
        summary = run_pipeline(settings, selection="dataset", model=model, drop=drop)
        assert summary["success"], summary
        assert [a["asset"] for a in summary["assets"] if a["materialized"]] == [
            "dataset" if model == "german_credit" else f"{model}/dataset"]
