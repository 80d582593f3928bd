"""A drop landed again changes nothing: ``secure_ml.definitions.up_to_date`` on a real Dagster instance.

Touches: a small asset graph shaped like the pipeline's head (``dataset`` recording the drop's sha256
and a data version, a downstream asset with a blocking check) materialised with ``dg.materialize`` on
``dg.instance_for_test()``, and ``code_version`` over a configuration directory. Does not run the
real pipeline (tests/test_end_to_end.py re-runs the sample through the CLI and sees no new version).
"""


from pathlib import Path

import dagster as dg
import pytest

from secure_ml.definitions import code_version, up_to_date
from secure_ml.settings import Settings

DROP = "a" * 64
STATE = {"check_passes": True}


def graph(downstream_version: str = "1") -> list[dg.AssetsDefinition]:
    @dg.asset(name="dataset", code_version="1")
    def dataset(context: dg.AssetExecutionContext) -> dg.Output[int]:
        drop = context.run.tags.get("drop", DROP)
        return dg.Output(1, data_version=dg.DataVersion(drop[:16]),
                         metadata={"source_sha256": drop, "sha256": "d" * 64})

    @dg.asset(name="trained_model", code_version=downstream_version, deps=[dataset],
              check_specs=[dg.AssetCheckSpec("reproducible", asset="trained_model", blocking=True)])
    def trained_model() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"sha256": "m" * 64},
                                    check_results=[dg.AssetCheckResult(passed=STATE["check_passes"])])

    return [dataset, trained_model]


def decide(instance: dg.DagsterInstance, assets: list[dg.AssetsDefinition], drop: str = DROP) -> "dict | None":
    definitions = dg.Definitions(assets=assets)
    keys = definitions.resolve_asset_graph().get_all_asset_keys()
    return up_to_date(instance, definitions, keys, drop_sha256=drop)


@pytest.fixture
def instance() -> dg.DagsterInstance:
    STATE["check_passes"] = True
    with dg.instance_for_test() as instance:
        yield instance


def test_the_same_drop_with_everything_fresh_and_checked_is_up_to_date(instance: dg.DagsterInstance) -> None:
    assert decide(instance, graph()) is None  # nothing materialised yet: run it
    assert dg.materialize(graph(), instance=instance).success
    assert decide(instance, graph()) == {"dataset": "d" * 64, "trained_model": "m" * 64}


def test_new_bytes_are_not_up_to_date(instance: dg.DagsterInstance) -> None:
    assert dg.materialize(graph(), instance=instance).success
    assert decide(instance, graph(), drop="b" * 64) is None


def test_changed_code_or_configuration_makes_it_stale(instance: dg.DagsterInstance) -> None:
    assert dg.materialize(graph(), instance=instance).success
    assert decide(instance, graph(downstream_version="2")) is None


def test_a_failed_blocking_check_is_never_stepped_around(instance: dg.DagsterInstance) -> None:
    STATE["check_passes"] = False
    assert not dg.materialize(graph(), instance=instance, raise_on_error=False).get_asset_check_evaluations()[0].passed
    assert decide(instance, graph()) is None


def test_a_new_dataset_version_upstream_makes_the_model_stale(instance: dg.DagsterInstance) -> None:
    assert dg.materialize(graph(), instance=instance).success
    # the same drop name re-ingested as other bytes, then back: the model was trained on neither
    assert dg.materialize(graph()[:1], instance=instance, tags={"drop": "c" * 64}).success
    assert decide(instance, graph(), drop="c" * 64) is None


def test_code_version_follows_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "training.yaml").write_text("epochs: 3\n")
    settings = Settings.from_env({"SECURE_ML_HOME": str(tmp_path / "home"), "SECURE_ML_CONFIG": str(config)})
    first = code_version(settings)
    assert code_version(settings) == first and len(first) == 16
    (config / "training.yaml").write_text("epochs: 4\n")
    assert code_version(settings) != first
