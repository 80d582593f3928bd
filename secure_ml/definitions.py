"""The one place where Dagster wiring happens: assets, checks, sensors and resources.

``dagster dev -w workspace.yaml`` (or ``make ui``) loads ``defs`` from here; ``secure-ml pipeline
run`` calls :func:`run_pipeline`, which materialises the same definitions on the instance under
``$DAGSTER_HOME``.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import dagster as dg

import assets as assets_package
import resources
from secure_ml.errors import BadInput
from secure_ml.settings import Settings

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def _modules(package: ModuleType) -> list[ModuleType]:
    return [importlib.import_module(f"{package.__name__}.{m.name}")
            for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]


def _sensor_modules() -> list[ModuleType]:
    try:
        import sensors as sensors_package
    except ImportError:  # pragma: no cover
        return []
    return _modules(sensors_package)


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    stage_modules = _modules(assets_package)
    stage_assets: list[Any] = list(dg.load_assets_from_modules(stage_modules))
    automation: dict[str, list[Any]] = {"sensors": [], "schedules": [], "jobs": []}
    executor = None
    for module in _sensor_modules():
        for name in automation:
            automation[name].extend(getattr(module, name.upper(), []))
        # sensors/ may apply automation conditions, freshness policies and the executor to every stage.
        if hasattr(module, "map_assets"):
            stage_assets = module.map_assets(stage_assets)
        if hasattr(module, "executor_for"):
            executor = module.executor_for(settings) or executor
    return dg.Definitions(
        assets=stage_assets,
        asset_checks=dg.load_asset_checks_from_modules(stage_modules),
        resources=resources.build_resources(settings),
        executor=executor,
        **automation,
    )


defs = build_definitions()


# -- running the pipeline outside the UI (secure-ml pipeline run) --------------------------------
def run_pipeline(settings: Settings, *, selection: str | None = None,
                 run_config: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                 log_level: str = "WARNING") -> dict[str, Any]:
    """Materialise ``selection`` (default: every asset) on the instance under DAGSTER_HOME.

    Returns a summary: for each asset, whether it materialised and its digest; for each check,
    its result and reason; and the names of the blocking checks that failed.
    """
    definitions = build_definitions(settings)
    graph = definitions.resolve_asset_graph()
    chosen = parse_selection(selection)
    everything = [*(definitions.assets or []), *(definitions.asset_checks or [])]
    config = {"loggers": {"console": {"config": {"log_level": log_level}}}, **(run_config or {})}
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            everything,  # type: ignore[arg-type]
            instance=instance,
            resources=resources.build_resources(settings),
            selection=chosen,
            run_config=config,
            tags=tags or {},
            raise_on_error=False,
        )
        picked = chosen.resolve(graph)
        in_pipeline_order = [key for key in graph.toposorted_asset_keys if key in picked]
        return summarise(result, in_pipeline_order, definitions)


def parse_selection(text: str | None) -> dg.AssetSelection:
    """``a,b`` names assets; ``+a`` adds everything upstream of a, ``a+`` everything downstream;
    empty or ``*`` is everything. (Dagster's own selection-string parser needs an antlr runtime
    that conflicts with DVC's, so strings are never handed to it.)"""
    if not text or text.strip() == "*":
        return dg.AssetSelection.all()
    selection: dg.AssetSelection | None = None
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        name = raw.strip("+")
        if not name.replace("_", "").replace("/", "").isalnum():
            raise BadInput(f"not an asset name in --select: {raw!r}")
        part = dg.AssetSelection.assets(dg.AssetKey.from_user_string(name))
        if raw.startswith("+"):
            part = part.upstream()
        if raw.endswith("+"):
            part = part.downstream()
        selection = part if selection is None else selection | part
    if selection is None:
        raise BadInput("--select names no asset")
    return selection


def summarise(result: dg.ExecuteInProcessResult, selected_keys: list[dg.AssetKey],
              definitions: dg.Definitions) -> dict[str, Any]:
    materialized = {e.asset_key: e for e in result.get_asset_materialization_events()}
    check_specs = {spec.key: spec for spec in _check_specs(definitions)}
    checks: list[dict[str, Any]] = []
    for evaluation in result.get_asset_check_evaluations():
        spec = check_specs.get(evaluation.asset_check_key)
        checks.append({
            "asset": evaluation.asset_key.to_user_string(),
            "check": evaluation.check_name,
            "passed": evaluation.passed,
            "blocking": bool(spec and spec.blocking),
            "reason": str(getattr(evaluation.metadata.get("reason"), "value", "")),
        })
    summary_assets = []
    for key in selected_keys:
        event = materialized.get(key)
        metadata = event.materialization.metadata if event else {}
        digest = getattr(metadata.get("sha256"), "value", None)
        summary_assets.append({"asset": key.to_user_string(), "materialized": event is not None, "sha256": digest})
    failed = [f"{c['asset']}:{c['check']}" for c in checks if c["blocking"] and not c["passed"]]
    step_failures = [{"step": e.step_key, "error": _root_cause(e.step_failure_data.error)}
                     for e in result.get_step_failure_events()]
    return {
        "run_id": result.run_id,
        "success": result.success and not failed,
        "selected": [k.to_user_string() for k in selected_keys],
        "assets": summary_assets,
        "checks": checks,
        "failed_blocking_checks": failed,
        "step_failures": step_failures,
    }


def _root_cause(error: Any) -> str:
    """The one line that says what went wrong: the innermost cause, not Dagster's wrapper."""
    while error is not None and getattr(error, "cause", None) is not None:
        error = error.cause
    if error is None:
        return ""
    lines = [line.strip() for line in error.message.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else error.cls_name or ""
    # A dg.Failure carries our own one-line explanation: drop Dagster's class path before it.
    return line.split(": ", 1)[1] if error.cls_name == "Failure" and ": " in line else line


def _check_specs(definitions: dg.Definitions) -> Sequence[dg.AssetCheckSpec]:
    specs: list[dg.AssetCheckSpec] = []
    for item in list(definitions.assets or []) + list(definitions.asset_checks or []):
        specs.extend(getattr(item, "check_specs", []))
    return specs
