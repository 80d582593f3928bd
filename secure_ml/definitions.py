"""The one place where Dagster wiring happens: assets, checks, sensors, schedules, resources, executor.

    defs                                   # what `dagster dev -w workspace.yaml` loads (lazily)
    build_definitions(settings)            # the same, for given settings (tests, the CLI)
    run_pipeline(settings, selection="dataset+")   # `secure-ml pipeline run`: the named jobs in order
    up_to_date(instance, definitions, picked, drop_sha256=...)   # a re-landed drop: nothing to run

Everything is listed here explicitly: the stage modules of assets/, the sensors and the schedule
of sensors/, the resources of resources/ and the executor for the environment. Nothing reads the
configuration or the environment at import time: ``defs`` is a ``@dg.definitions`` function that
Dagster calls when it loads the code location, and ``build_definitions`` reads automation.yaml
(through ``settings.config``) when it runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from assets import _per_model as per_model
from assets import data, release, security, training, validation
from resources import build_resources
from resources.custody import model_selection, op_name
from secure_ml.data import validation as gx_validation
from secure_ml.training.sandbox import Prepared, discard
from secure_ml.errors import BadInput
from secure_ml.settings import Settings
from sensors import advance, conditions, failures, jobs, landing
from sensors._shared import DROP_SHA_TAG, DROP_TAG, MODEL_TAG, TRIGGER_TAG

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

#: The pipeline's stages in order; a new stage is a new module in assets/, listed here.
STAGES = (data, validation, training, security, release)
K8S_JOB_EXECUTOR = Path(__file__).resolve().parents[1] / "k8s" / "job_executor.yaml"
#: The code every asset's code version covers: the core, the Dagster layer and the shipped configuration.
CODE_PACKAGES = ("secure_ml", "assets", "resources", "sensors")
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".rego", ".json", ".csv")
#: Assets a drop's run may leave unmaterialised: deploying is a deliberate act, not a consequence of data.
DELIBERATE = ("deployment",)


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """The code location for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    automation = settings.config.automation
    assets, checks = per_model.for_models(dg.load_assets_from_modules(STAGES), dg.load_asset_checks_from_modules(STAGES),
                                          models=list(settings.config.models()),
                                          default=settings.config.default_model)
    version = code_version(settings)
    assets = [dg.map_asset_specs(lambda spec: spec.replace_attributes(
        code_version=f"{spec.code_version or '0'}+{version}"), [a])[0] if isinstance(a, dg.AssetsDefinition) else a
        for a in assets]
    return dg.Definitions(
        assets=conditions.map_assets(assets, automation),
        asset_checks=checks,
        jobs=jobs.pipeline_jobs(automation),
        sensors=[landing.landing_sensor(settings), advance.training_sensor(settings),
                 *failures.failure_sensors(settings)],
        schedules=landing.retraining_schedules(settings),
        resources=build_resources(settings),
        executor=executor_for(settings),
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The code location as ``dagster dev`` / ``dagster-webserver`` load it (workspace.yaml)."""
    return build_definitions()


def code_version(settings: Settings) -> str:
    """What every asset's ``code_version`` carries after its own: a digest of the code and configuration
    it runs with (the packages' sources, the shipped configuration, and ``$SECURE_ML_CONFIG`` when set).

    Dagster marks an asset stale when its code version or an input's data version changed, so a drop
    landed again with the same bytes, code and configuration finds every asset fresh (:func:`up_to_date`)
    and any edit makes them all stale: coarse, never wrongly fresh."""
    root = Path(__file__).resolve().parents[1]
    trees = [root / name for name in CODE_PACKAGES]
    if settings.config_override:
        trees.append(Path(settings.config_override))
    digest = hashlib.sha256()
    for tree in trees:
        for path in sorted(_code_files(tree)):
            digest.update(f"{path.relative_to(tree.parent)}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _code_files(tree: Path) -> Iterable[Path]:
    if not tree.is_dir():
        return []
    return (p for p in tree.rglob("*") if p.suffix in CODE_SUFFIXES and p.is_file() and "__pycache__" not in p.parts)


def executor_for(settings: Settings) -> dg.ExecutorDefinition | None:
    """automation.yaml ``executor.<env>``: in_process, multiprocess, k8s, or default (Dagster's, None)."""
    choice = getattr(settings.config.automation.executor, settings.env)
    if choice == "k8s":
        return _k8s_job_executor()
    if choice == "in_process":
        return dg.in_process_executor
    if choice == "multiprocess":
        return dg.multiprocess_executor
    return None


def _k8s_job_executor() -> dg.ExecutorDefinition:
    """One hardened pod per step (dagster-k8s), configured from k8s/job_executor.yaml when present."""
    import yaml
    from dagster_k8s import k8s_job_executor

    if not K8S_JOB_EXECUTOR.exists():  # an image without the k8s/ folder: configure it per run instead
        return k8s_job_executor
    config = (yaml.safe_load(K8S_JOB_EXECUTOR.read_text()) or {}).get("execution", {}).get("config") or {}
    return k8s_job_executor.configured(config, name="k8s_job_executor")


# -- running the pipeline outside the UI (secure-ml pipeline run) --------------------------------
#: Console log levels for run_pipeline: "quiet" keeps Dagster's own log lines (and their stack
#: traces) off the terminal; they are always in the instance's event log.
CONSOLE_LEVELS = {"quiet": "CRITICAL", "info": "INFO", "debug": "DEBUG"}


def run_pipeline(settings: Settings, *, selection: str | None = None,
                 run_config: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                 console: str = "quiet", model: str | None = None, drop: str | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Materialise ``selection`` (default: every asset) on the instance under DAGSTER_HOME, as one
    run per named job it touches (ingest, train, release), in order, stopping at the first that fails.

    ``model`` confines the run to that model's assets: names in ``selection`` are its stage names
    (``dataset+``), prefixed here for a model other than the default one. ``drop`` is the landed file
    the model's ``dataset`` ingests (when the run includes it).

    Returns a summary: the runs (job, run id, success); for each asset, whether it materialised and its digest; for each check,
    its result and reason; the names of the blocking checks that failed; and each failed step
    with its one-line reason and whether it was an expected refusal (a denial, bad input, a
    failed blocking check) or an internal error. ``console`` (quiet, info, debug) is how much of
    Dagster's own log reaches stderr.

    A drop run (``dataset`` picked, its sha256 in ``tags``) whose bytes are already the latest dataset
    version, with every picked asset fresh and its blocking checks passed, runs nothing and says so
    (``up_to_date``); ``force`` runs it anyway.
    """
    if console not in CONSOLE_LEVELS:
        raise BadInput(f"console must be one of {', '.join(CONSOLE_LEVELS)}, not {console!r}")
    definitions = build_definitions(settings)
    graph = definitions.resolve_asset_graph()
    default = settings.config.default_model
    if model is not None:
        settings.for_model(model)  # an unknown model is refused, naming the known ones
        if model != default and selection:
            selection = ",".join(_prefix_name(part, model) for part in selection.split(","))
    chosen = parse_selection(selection)
    if model is not None:
        chosen = chosen & model_selection(model) if selection else model_selection(model)
    known = {key.to_user_string() for key in graph.get_all_asset_keys()}
    unknown = [name for name in (part.strip().strip("+") for part in (selection or "").split(","))
               if name and name != "*" and name not in known]
    if unknown:
        raise BadInput(f"--select names {', '.join(map(repr, unknown))}, not an asset of the pipeline "
                       f"(assets: {', '.join(sorted(known))})")
    picked = chosen.resolve(graph)
    config = {"loggers": {"console": {"config": {"log_level": CONSOLE_LEVELS[console]}}}}
    dataset = dg.AssetKey("dataset") if model in (None, default) else dg.AssetKey([str(model), "dataset"])
    with dg.DagsterInstance.get() as instance:
        drop_sha = (tags or {}).get(DROP_SHA_TAG)
        if drop_sha and dataset in picked and not force:
            latest = up_to_date(instance, definitions, picked, drop_sha256=drop_sha)
            if latest is not None:
                _allow_rerun(settings, drop or "", drop_sha, tags or {})
                in_pipeline_order = [key for key in graph.toposorted_asset_keys if key in picked]
                summary = summarise([], in_pipeline_order, definitions, instance)
                for asset in summary["assets"]:
                    asset["sha256"] = latest.get(asset["asset"])
                return {**summary, "up_to_date": True, "steps": []}
        warmed = _warm_up(settings, picked)
        try:
            results = _run_jobs(definitions, picked, instance, dataset=dataset, drop=drop, config=config,
                                run_config=run_config, tags=tags)
        finally:
            for prepared in warmed:
                discard(prepared)
            gx_validation.discard_worker()
        in_pipeline_order = [key for key in graph.toposorted_asset_keys if key in picked]
        return {**summarise(results, in_pipeline_order, definitions, instance),
                "up_to_date": False, "steps": run_steps(instance, results)}


def _warm_up(settings: Settings, picked: set[dg.AssetKey]) -> list[Prepared]:
    """Every step of run_pipeline runs in this process (execute_in_process), one after another, and their
    fixed costs are imports: begin them now, beside the ingest run, so they use the other core. Great
    Expectations in a worker process that validated_dataset hands its job to; each model's training
    sandbox (it imports torch; trained_model claims it). Nothing here sees data or a key. (Not the
    evaluation's imports: in a thread of this process they would slow the ingest run's own steps;
    trained_model starts them while it waits on its sandbox.) Returns the sandboxes, for the caller to
    end if no run took them."""
    stages = {key.path[-1] for key in picked}
    if "validated_dataset" in stages:
        gx_validation.warm()
    warmed = [training.warm_trainer(settings.for_model(None if len(key.path) == 1 else key.path[0]))
              for key in picked if key.path[-1] == "trained_model"]
    return [prepared for prepared in warmed if prepared is not None]


def _run_jobs(definitions: dg.Definitions, picked: set[dg.AssetKey], instance: dg.DagsterInstance, *,
              dataset: dg.AssetKey, drop: str | None, config: dict[str, Any], run_config: dict[str, Any] | None,
              tags: dict[str, str] | None) -> list[dg.ExecuteInProcessResult]:
    """One named run per job (ingest, train, release), in order, stopping at the first that fails: a
    rejected drop ends its ingest run and touches nothing downstream."""
    graph = definitions.resolve_asset_graph()
    results: list[dg.ExecuteInProcessResult] = []
    for job_name, keys in split_by_job(definitions, picked):
        job_config: dict[str, Any] = {**config, **(run_config or {})} if dataset in keys else dict(config)
        if drop is not None and dataset in keys:
            # ops of a subset are named from its own assets: address the model's dataset through them
            name = op_name(graph, dataset, dg.AssetSelection.assets(*keys))
            job_config["ops"] = {**job_config.get("ops", {}), name: {"config": {"drop": drop}}}
        result = definitions.resolve_job_def(job_name).execute_in_process(
            run_config=job_config, instance=instance, tags={TRIGGER_TAG: "cli", **(tags or {})},
            asset_selection=sorted(keys, key=lambda k: k.to_user_string()), raise_on_error=False)
        results.append(result)
        release_memory()
        if not result.success:
            break
    return results


def release_memory() -> None:
    """Give the heap a finished run freed back to the OS (pyarrow's pool, then the C allocator's) before
    the next run in this process: both keep freed memory for reuse, so the ingest run's peak would be the
    training run's floor (10,000,000 rows: about 3 GB more at the training step's peak)."""
    gc.collect()
    with contextlib.suppress(Exception):  # only a hint to the allocators: nothing depends on it
        import pyarrow

        pyarrow.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _allow_rerun(settings: Settings, drop: str, drop_sha: str, tags: dict[str, str]) -> None:
    """The decision ``dataset`` makes before reading a drop, made for a run that reads nothing: whoever
    may not add this drop is still denied (audited), and an allowed no-op is audited too."""
    from secure_ml.governance import authn
    from secure_ml.governance.access import AccessPolicy
    from secure_ml.governance.sources import ApprovedSources

    actor = authn.run_actor(settings, tags)
    approved = ApprovedSources.from_settings(settings).require(drop)
    audit = settings.audit_log()
    AccessPolicy.from_settings(settings).require(actor, "data.add", classification=approved.classification,
                                                 audit=audit, subject=f"drop:{drop}")
    audit.record(actor, "pipeline.up_to_date", subject=f"sha256:{drop_sha}",
                 details={"drop": drop, "reason": "same bytes, code and configuration; nothing run"})


def up_to_date(instance: dg.DagsterInstance, definitions: dg.Definitions, picked: Iterable[dg.AssetKey], *,
               drop_sha256: str) -> dict[str, str | None] | None:
    """Each picked asset's latest digest when a run of this drop would change nothing, else None.

    Nothing would change when the model's latest ``dataset`` was ingested from these very bytes, and
    every other picked asset is fresh in Dagster's terms (materialised from its inputs' current data
    versions under the current code version, see :func:`code_version`) with every blocking check on
    its latest materialization passed since. A failed or missing check makes it not up to date: a
    re-run must never step around a blocking check. ``deployment`` is left out: deploying is a
    person's act (``secure-ml deploy``, gated then), not a consequence of data."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
    from dagster._time import get_current_datetime

    graph = definitions.resolve_asset_graph()
    keys = list(picked)
    datasets = [key for key in keys if key.path[-1] == "dataset"]
    latest: dict[dg.AssetKey, Any] = {}
    for key in keys:
        if key.path[-1] in DELIBERATE:
            continue
        event = instance.get_latest_materialization_event(key)
        if event is None or event.asset_materialization is None:
            return None
        latest[key] = event
    for key in datasets:
        source = latest[key].asset_materialization.metadata.get("source_sha256")
        if getattr(source, "value", None) != drop_sha256:
            return None  # new bytes: ingest them
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    if any(resolver.get_status(key) != StaleStatus.FRESH for key in latest):
        return None
    blocking = [spec.key for spec in _check_specs(definitions) if spec.blocking and spec.asset_key in latest]
    executions = instance.event_log_storage.get_latest_asset_check_execution_by_key(blocking) if blocking else {}
    for check in blocking:
        record = executions.get(check)
        materialized = latest[check.asset_key].timestamp
        if (record is None or record.status != AssetCheckExecutionRecordStatus.SUCCEEDED or record.event is None
                or record.event.timestamp < materialized):
            return None
    return {key.to_user_string(): getattr(event.asset_materialization.metadata.get("sha256"), "value", None)
            for key, event in latest.items()}


def split_by_job(definitions: dg.Definitions, picked: set[dg.AssetKey] | Any) -> list[tuple[str, set[dg.AssetKey]]]:
    """The picked assets, grouped by the named job each belongs to, in pipeline order (ingest, train,
    release); an asset in no job is a wiring mistake, refused in one line."""
    graph = definitions.resolve_asset_graph()
    out: list[tuple[str, set[dg.AssetKey]]] = []
    left = set(picked)
    for job in definitions.jobs or []:
        name = str(job.name)
        keys = left & set(definitions.resolve_job_def(name).asset_layer.selected_asset_keys)
        if keys:
            out.append((name, keys))
            left -= keys
    if left:
        names = ", ".join(sorted(k.to_user_string() for k in left if graph.has(k)))
        raise BadInput(f"{names}: in no job of the pipeline (ingest, train, release)")
    return out


def step_durations(instance: dg.DagsterInstance, run_id: str) -> list[dict[str, Any]]:
    """Each step's wall seconds, from the run's event log (start to success or failure), in the
    order the steps finished; with ``run`` first: the run's own span, first event to last."""
    records = instance.all_logs(run_id)
    if not records:
        return []
    started: dict[str, float] = {}
    steps = [{"step": "run", "seconds": round(max(r.timestamp for r in records) - min(r.timestamp for r in records), 3),
              "outcome": "span"}]
    for record in records:
        event = record.dagster_event
        if event is None or record.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            started[record.step_key] = record.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            begun = started.get(record.step_key, record.timestamp)
            steps.append({"step": record.step_key, "seconds": round(record.timestamp - begun, 3),
                          "outcome": "success" if event.event_type == dg.DagsterEventType.STEP_SUCCESS else "failure"})
    return steps


def run_steps(instance: dg.DagsterInstance, results: list[dg.ExecuteInProcessResult]) -> list[dict[str, Any]]:
    """Every run's step seconds, after one ``run`` entry spanning them all (first event to last) and
    one ``run:JOB`` span per run."""
    steps: list[dict[str, Any]] = []
    for result in results:
        timed = step_durations(instance, result.run_id)
        if timed:
            steps += [{**timed[0], "step": f"run:{result.job_def.name}"}, *timed[1:]]
    records = [r for result in results for r in instance.all_logs(result.run_id)]
    whole = round(max(r.timestamp for r in records) - min(r.timestamp for r in records), 3) if records else 0.0
    return ([{"step": "run", "seconds": whole, "outcome": "span"}] if records else []) + steps


def _prefix_name(part: str, model: str) -> str:
    """``dataset+`` -> ``breast_cancer/dataset+`` (a name already prefixed is kept)."""
    name = part.strip().strip("+")
    if not name or name == "*" or "/" in name:
        return part
    return part.replace(name, f"{model}/{name}", 1)


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


def summarise(results: list[dg.ExecuteInProcessResult], selected_keys: list[dg.AssetKey],
              definitions: dg.Definitions, instance: dg.DagsterInstance) -> dict[str, Any]:
    """One summary over the runs (in order): checks as the instance stored them, so a verdict an
    asset reported on rejecting its input is listed as well as those of check steps."""
    materialized = {e.asset_key: e for result in results for e in result.get_asset_materialization_events()}
    check_specs = {spec.key: spec for spec in _check_specs(definitions)}
    checks: list[dict[str, Any]] = []
    evaluations = [record.event_log_entry.dagster_event.event_specific_data  # type: ignore[union-attr]
                   for result in results for record in instance.get_records_for_run(
                       result.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION, limit=1000).records]
    for evaluation in evaluations:
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
    step_failures = [{"step": e.step_key, **failures.root_cause(e.step_failure_data.error)}
                     for result in results for e in result.get_step_failure_events()]
    return {
        "run_id": results[0].run_id if results else "",
        "runs": [{"job": r.job_def.name, "run_id": r.run_id, "success": r.success} for r in results],
        "success": all(r.success for r in results) and not failed,
        "selected": [k.to_user_string() for k in selected_keys],
        "assets": summary_assets,
        "checks": checks,
        "failed_blocking_checks": failed,
        "step_failures": step_failures,
    }


def _check_specs(definitions: dg.Definitions) -> Sequence[dg.AssetCheckSpec]:
    specs: list[dg.AssetCheckSpec] = []
    for item in list(definitions.assets or []) + list(definitions.asset_checks or []):
        specs.extend(getattr(item, "check_specs", []))
    return specs


# -- deployments made outside a run (secure-ml deploy / rollback) ----------------------------------
def report_deployment(settings: Settings, target: str) -> str | None:
    """Record what is live on ``target`` as a ``deployment`` materialization on the instance under
    DAGSTER_HOME (a runless event), so the asset and its freshness follow real deployments however
    they were made. Returns the deployed version, or None when nothing is live there."""
    from resources.release import ReleaseResource

    built = build_resources(settings)
    custody, release_resource = built["custody"], built["release"]
    assert isinstance(release_resource, ReleaseResource)
    service = release_resource.release(custody.actor(None))
    if service.registry.current_deployment(target) is None:
        return None
    output = release.deployment_output(custody, None, service, target)
    with dg.DagsterInstance.get() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key="deployment", metadata=output.metadata,
            tags={"dagster/data_version": output.data_version.value} if output.data_version else None))
    return str(output.metadata["deployed_version"])
