"""Loading the Dagster definitions: secure_ml/definitions.py, workspace.yaml, and where the code comes from.

Touches: the real `defs` code location (every stage module of assets/, every sensor and schedule of
sensors/, resources built for the local environment), listed explicitly (no reflection), `dagster definitions validate` over workspace.yaml in a subprocess (the way
the UI loads the code location), and the import paths of the top-level assets/resources/sensors
packages from a different working directory.
Does not touch: materialising anything (tests/test_dataset_asset.py and each stage's tests do).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

pytestmark = pytest.mark.slow  # loads the code location in subprocesses and the webserver

REPO = Path(__file__).resolve().parents[1]


def test_defs_load_with_the_dataset_asset_its_blocking_checks_and_custody_resources() -> None:
    from resources.custody import CustodyResource, EncryptedIOManager
    from secure_ml.definitions import defs as lazy_defs

    defs = lazy_defs()  # what Dagster does when it loads the code location
    assert isinstance(defs, dg.Definitions)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert "dataset" in keys
    check_keys = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert {("dataset", "ciphertext_authentic"), ("dataset", "provenance_matches")} <= check_keys
    specs = {spec.name: spec for item in [*defs.assets, *defs.asset_checks] for spec in getattr(item, "check_specs", [])}
    assert specs["ciphertext_authentic"].blocking and specs["provenance_matches"].blocking
    resources = defs.resources or {}
    assert isinstance(resources["custody"], CustodyResource)
    # Never the default (pickling, pod-local) IO manager.
    assert isinstance(resources["io_manager"], EncryptedIOManager)
    dataset = graph.get(dg.AssetKey("dataset"))
    assert dataset.group_name == "data" and dataset.owners and dataset.code_version
    assert defs.resolve_job_def("__ASSET_JOB") is not None


def test_wiring_is_explicit_every_stage_sensor_and_schedule_is_listed() -> None:
    """Each stage module is listed and contributes its assets; nothing is found by reflection."""
    import assets
    import secure_ml.definitions as definitions
    from secure_ml.definitions import STAGES, build_definitions

    on_disk = {p.stem for p in Path(assets.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert {m.__name__.split(".")[-1] for m in STAGES} == on_disk  # a new stage module must be listed
    source = Path(definitions.__file__).read_text() + Path(assets.__file__).parents[1].joinpath(
        "resources", "__init__.py").read_text()
    assert "pkgutil" not in source and "hasattr" not in source and "importlib" not in source
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    for stage in STAGES:
        names = {a.key for a in dg.load_assets_from_modules([stage]) if isinstance(a, dg.AssetsDefinition)}
        assert names and all(graph.has(k) for k in names), stage.__name__
    assert {s.name for s in defs.sensors or []} == {"landing_drops", "train_on_accepted_data", "failed_runs",
                                                     "failed_checks"}
    assert {s.name for s in defs.schedules or []} == {"weekly_retraining"}
    assert set(defs.resources or {}) >= {"custody", "io_manager", "release", "signing"}


def test_every_asset_is_described_grouped_and_owned() -> None:
    from secure_ml.definitions import build_definitions

    graph = build_definitions().resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable:
            continue
        name = key.to_user_string()
        assert node.group_name and node.group_name != "default", name
        assert node.owners, name
        assert node.code_version, name
        assert (node.description or "").strip(), name


def test_packages_are_imported_from_this_repository_not_site_packages(tmp_path: Path) -> None:
    import assets
    import resources
    import secure_ml
    import sensors

    for package in (assets, resources, sensors, secure_ml):
        assert Path(package.__file__).resolve().is_relative_to(REPO), package.__file__  # type: ignore[arg-type]
    # The same from elsewhere (no repository on sys.path via the working directory).
    probe = ("import json, assets, resources, sensors, secure_ml, secure_ml.definitions as d; "
             "print(json.dumps({m.__name__: m.__file__ for m in (assets, resources, sensors, secure_ml, d)}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = json.loads(result.stdout.strip().splitlines()[-1])
    for name, file in files.items():
        assert Path(file).resolve().is_relative_to(REPO), (name, file)
        assert "site-packages" not in file
    site = Path(dg.__file__).resolve().parents[1]
    for name in ("assets", "resources", "sensors", "secure_ml"):
        assert not (site / name).exists(), f"a stale copy of {name} in {site}"


@pytest.mark.slow
def test_workspace_yaml_loads_the_code_location(home: Path) -> None:
    """`dagster definitions validate -w workspace.yaml`: what `make ui` and the webserver load."""
    env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"}
    result = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate",
                             "-w", "workspace.yaml"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "secure_ml" in output


def test_production_runs_each_step_in_a_hardened_k8s_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SECURE_ML_ENV=production: the code location's executor is dagster-k8s's k8s_job_executor,
    configured from k8s/job_executor.yaml (non-root, read-only root filesystem, all capabilities
    dropped); locally every step runs in one process."""
    import base64

    from secure_ml.definitions import build_definitions
    from secure_ml.settings import Settings

    monkeypatch.setenv("SECURE_ML_KEK", base64.b64encode(os.urandom(32)).decode())
    production = build_definitions(Settings.from_env({"SECURE_ML_HOME": str(tmp_path), "SECURE_ML_ENV": "production",
                                                      "SECURE_ML_KEK": os.environ["SECURE_ML_KEK"]}))
    executor = production.executor
    assert isinstance(executor, dg.ExecutorDefinition) and executor.name == "k8s_job_executor"
    resolved = executor.config_schema.resolve_config({})  # validated against dagster-k8s's own schema
    assert resolved.success, resolved.errors
    security = resolved.value["config"]["step_k8s_config"]["container_config"]["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"] == {"drop": ["ALL"]}
    local = build_definitions(Settings.from_env({"SECURE_ML_HOME": str(tmp_path)}))
    assert local.executor is not None and local.executor.name == "in_process"


def test_one_check_style_every_check_is_separate_blocking_described_and_runs_alone() -> None:
    """No asset declares in-asset check_specs (those cannot be executed alone from the UI); every check
    of the graph is its own blocking, described ``@dg.asset_check`` whose job runs just that check."""
    from secure_ml.definitions import build_definitions

    defs = build_definitions()
    for item in defs.assets or []:
        if isinstance(item, dg.AssetsDefinition):
            assert not list(item.check_specs), (sorted(item.keys), [s.name for s in item.check_specs])
    separate = [c for c in defs.asset_checks or [] if isinstance(c, dg.AssetChecksDefinition)]
    by_key = {key: c for c in separate for key in c.check_keys}
    graph = defs.resolve_asset_graph()
    assert set(graph.asset_check_keys) == set(by_key) and len(by_key) >= 20
    for key, definition in by_key.items():
        spec = definition.get_spec_for_check_key(key)
        assert spec.blocking and (spec.description or "").strip(), key
    # Executable alone: a job that selects only one check has that check's step and materializes nothing.
    jobs = [dg.define_asset_job(f"only_{key.asset_key.to_python_identifier()}_{key.name}",
                                selection=dg.AssetSelection.checks(key)) for key in by_key]
    alone = dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=jobs, resources=defs.resources)
    for job_def, key in zip(jobs, by_key, strict=True):
        job = alone.resolve_job_def(job_def.name)
        assert len(job.nodes) == 1, (key, [n.name for n in job.nodes])
        assert set(job.asset_layer.asset_graph.asset_check_keys) == {key}
        assert not job.asset_layer.selected_asset_keys, key
