"""The chain of custody as Dagster resources: the encrypted store, the audit log, the actor.

Assets seal what they produce (``custody.output(frame)``), which encrypts it into the store and
returns a ``dg.Output`` whose metadata and data version carry the plaintext SHA-256. Downstream
assets receive their inputs through :class:`EncryptedIOManager`, which loads by the digest
recorded on the upstream materialization and never by a path.

Many models (docs/ARCHITECTURE.md, "Many models"): the stages' asset bodies are written once, for
unprefixed keys; each further model gets copies prefixed with its name (assets/_per_model.py). A body
finds its model from the asset key it is running for (:func:`current_model`): ``custody.settings()``
then acts for that model (its spec's schema, training, thresholds, promotion), and
``custody.recorded(instance, TRAINED)`` reads that model's ``NAME/trained_model`` (:func:`model_key`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from secure_ml.custody.audit import AuditLog
from secure_ml.custody.store import ArtifactRef, ArtifactStore
from secure_ml.settings import Settings


def current_model() -> str | None:
    """The model whose asset or check is running now (its key prefix); None for the default model or
    outside a step."""
    key: dg.AssetKey | None = None
    try:
        key = dg.AssetExecutionContext.get().asset_key
    except Exception:  # not in an asset's body: maybe a check's
        try:
            specs = dg.AssetCheckExecutionContext.get().check_specs
            key = specs[0].asset_key if specs else None
        except Exception:
            key = None
    return key.path[0] if key is not None and len(key.path) > 1 else None


def model_key(key: dg.AssetKey, model: str | None = None) -> dg.AssetKey:
    """``key`` as the running model names it: ``trained_model`` -> ``breast_cancer/trained_model``."""
    model = model if model is not None else current_model()
    if model is None or len(key.path) > 1:
        return key
    return dg.AssetKey([model, *key.path])


#: The tag every asset carries with its model's name (assets/_per_model.py sets it).
MODEL_TAG = "secure_ml/model"


def model_selection(model: str) -> dg.AssetSelection:
    """Every asset of ``model`` (its checks come with them)."""
    return dg.AssetSelection.tag(MODEL_TAG, model)


def model_asset_key(name: str, model: str, default: str) -> dg.AssetKey:
    """The key of stage asset ``name`` for ``model``: ``dataset`` or ``breast_cancer/dataset``."""
    return dg.AssetKey(name) if model == default else dg.AssetKey([model, name])


def op_name(graph: Any, key: dg.AssetKey, selection: dg.AssetSelection | None = None) -> str:
    """The op that computes ``key`` in a run of ``selection`` (default: every asset). Each model's copy of a
    stage shares its op's name, which Dagster numbers within one job (``dataset``, ``dataset_2``), and a run
    of a subset names its ops from the subset's own assets; so run configuration for an asset (the drop a
    ``dataset`` ingests) is addressed through this, over exactly the run's selection, never by stage name."""
    job = dg.define_asset_job("__secure_ml_probe", selection=selection or dg.AssetSelection.all()).resolve(
        asset_graph=graph)
    return str(job.asset_layer.get_op_output_handle(key).node_handle.name)


# The newest checkpoint this process signed, per log: the next one re-verifies only what came after.
_LAST_CHECKPOINT: dict[str, Any] = {}

#: Run tags every run carries (the Runs page and the timeline filter on them). The launcher sets what
#: it knows (CLI, sensors, schedule: source, drop); the run's first step adds the rest (UI runs too).
TRIGGER_TAG = "secure_ml/trigger"         # source: cli, landing, schedule, automation, ui
DROP_TAG = "secure_ml/drop"               # the drop's file name in the landing area
DROP_SHA_TAG = "secure_ml/drop_sha256"    # the drop's content digest
IDENTITY_TAG = "secure_ml/identity"       # who the run acts as (verified; informational, never a claim)
_LABELLED: set[str] = set()               # runs this process already labelled


@dataclass(frozen=True)
class Sealed:
    """An artifact already encrypted into the store; what an asset hands to the IO manager."""

    ref: ArtifactRef

    @property
    def sha256(self) -> str:
        return self.ref.sha256


class CustodyResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Encrypted artifact store and audit log under ``home`` (``$SECURE_ML_HOME``)."""

    home: str
    env: str = "local"
    config_dir: str = ""

    def settings(self) -> Settings:
        """Fresh settings per call (the environment as it is now), with this resource's home,
        environment and configuration directory: the one factory, Settings.from_env."""
        return Settings.from_env(home=self.home, env=self.env, config_dir=self.config_dir).for_model(current_model())

    def actor(self, context: Any = None) -> str:
        tags = getattr(getattr(context, "run", None), "tags", None)
        if tags is None:  # a step context (the IO manager's) has the run as dagster_run
            tags = getattr(getattr(context, "dagster_run", None), "tags", None)
        from secure_ml.governance.authn import run_actor

        # The signer of the run request, never a name in a tag (once a trust policy exists).
        actor = run_actor(self.settings(), tags)
        if context is not None:
            self.label_run(context, {IDENTITY_TAG: actor})
        return actor

    def label_run(self, context: Any, tags: dict[str, str]) -> None:
        """Add the tags the run lacks (once per run and process): who acts, the source (``ui`` when no
        launcher said), and the drop and model the run works on, from the latest recorded data."""
        run = getattr(context, "run", None) or getattr(context, "dagster_run", None)
        instance = getattr(context, "instance", None)
        if run is None or instance is None or run.run_id in _LABELLED:
            return
        _LABELLED.add(run.run_id)
        wanted = {TRIGGER_TAG: "ui", **tags}
        keys = _step_keys(context)
        prefix = list(next(iter(keys)).path[:-1]) if keys else []  # another model's assets: its key prefix
        ingesting = any(k.path[-1] == "dataset" for k in keys)  # it tags the drop it resolves itself
        if not ingesting and (DROP_SHA_TAG not in run.tags or MODEL_TAG not in run.tags):
            wanted.update(self._data_tags(instance, prefix))
        self.tag_run(context, wanted)

    @staticmethod
    def tag_run(context: Any, tags: dict[str, str]) -> None:
        """Add those of ``tags`` the run does not carry yet (a launcher's tags are never overwritten)."""
        run = getattr(context, "run", None) or getattr(context, "dagster_run", None)
        instance = getattr(context, "instance", None)
        if run is None or instance is None:
            return
        stored = instance.get_run_by_id(run.run_id)
        current = stored.tags if stored is not None else run.tags
        missing = {k: str(v) for k, v in tags.items() if v and k not in current}
        if missing:
            instance.add_run_tags(run.run_id, missing)

    def _data_tags(self, instance: dg.DagsterInstance, prefix: list[str] | None = None) -> dict[str, str]:
        """The drop (name, digest) and model of the latest accepted validated dataset, else of the latest
        dataset (of the model whose keys carry ``prefix``)."""
        out: dict[str, str] = {}
        for key in ("validated_dataset", "dataset"):
            records = instance.fetch_materializations(dg.AssetKey([*(prefix or []), key]), limit=1).records
            meta = records[0].asset_materialization.metadata if records and records[0].asset_materialization else {}
            value = {k: getattr(v, "value", v) for k, v in meta.items()}
            if key == "validated_dataset" and value:
                out.setdefault(MODEL_TAG, str(value.get("schema") or ""))
                out.setdefault(DROP_TAG, str(value.get("source") or ""))
            elif value and (not out.get(DROP_TAG) or out.get(DROP_TAG) == value.get("source")):
                out.setdefault(DROP_TAG, str(value.get("source") or ""))
                out.setdefault(DROP_SHA_TAG, str(value.get("source_sha256") or ""))
        return {k: v for k, v in out.items() if v}

    def store(self, context: Any = None) -> ArtifactStore:
        return self.settings().artifact_store(actor=self.actor(context))

    def audit(self) -> AuditLog:
        return self.settings().audit_log()

    def record(self, context: Any, action: str, **fields: Any) -> None:
        """Audit a security decision, tagged with the Dagster run it happened in."""
        details = dict(fields.pop("details", {}) or {})
        # Asset-check contexts have no run_id attribute, only .run.
        run_id = getattr(context, "run_id", None) or getattr(getattr(context, "run", None), "run_id", None)
        if run_id:
            details["run_id"] = run_id
        self.audit().record(self.actor(context), action, details=details, **fields)

    # -- sealing outputs ------------------------------------------------------------------
    def seal(self, context: Any, value: Any, **details: Any) -> Sealed:
        store = self.store(context)
        if isinstance(value, pd.DataFrame):
            ref = store.put_dataframe(value, details=details)
        elif isinstance(value, Path):
            ref = store.put_tree(value, details=details)
        elif isinstance(value, bytes):
            ref = store.put_bytes(value, details=details)
        else:
            ref = store.put_json(value, details=details)
        return Sealed(ref)

    def output(self, context: Any, value: Any, *, metadata: dict[str, Any] | None = None) -> dg.Output[Sealed]:
        """Seal ``value`` and return the Output that records its digest as the data version.

        The Output also carries a signed checkpoint of the audit log's head, so the Dagster event
        log (PostgreSQL in production) anchors the audit log where its writer cannot rewrite it."""
        sealed = self.seal(context, value)
        return sealed_output(sealed, {**(metadata or {}), **self.checkpoint_metadata()})

    def checkpoint_metadata(self) -> dict[str, Any]:
        from secure_ml.custody import anchor
        from secure_ml.governance.authn import pipeline_signer

        settings = self.settings()
        signer = pipeline_signer(settings)
        if signer is None:
            return {}
        log = settings.audit_log()
        envelope = anchor.checkpoint(log, signer, previous=_LAST_CHECKPOINT.get(str(log.path)))
        _LAST_CHECKPOINT[str(log.path)] = anchor.verify_checkpoint(envelope, [signer.public_key])  # type: ignore[attr-defined]
        return {anchor.METADATA_KEY: dg.MetadataValue.json(json.loads(envelope))}

    # -- reading what upstream recorded ---------------------------------------------------
    def recorded(self, instance: dg.DagsterInstance, asset_key: dg.AssetKey,
                 partition: str | None = None) -> dict[str, Any]:
        """Metadata of the latest materialization of ``asset_key`` (values unwrapped); an unprefixed key
        names the running model's asset."""
        asset_key = model_key(asset_key)
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition else None),
            limit=1,
        ).records
        if not records:
            raise dg.Failure(f"{asset_key.to_user_string()} has never been materialized")
        materialization = records[0].asset_materialization
        assert materialization is not None
        return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}


def _step_keys(context: Any) -> set[dg.AssetKey]:
    try:
        return set(context.assets_def.keys) if getattr(context, "has_assets_def", False) else set()
    except Exception:  # a check or IO-manager context: no asset of its own
        return set()


def sealed_output(sealed: Sealed, metadata: dict[str, Any] | None = None) -> dg.Output[Sealed]:
    """The Output for an already sealed artifact: digest in metadata and as the data version."""
    return dg.Output(
        sealed,
        data_version=dg.DataVersion(sealed.sha256),
        metadata={**digest_metadata(sealed.ref), **(metadata or {})},
    )


def digest_metadata(ref: ArtifactRef) -> dict[str, Any]:
    return {
        "sha256": ref.sha256,
        "size_bytes": ref.size,
        "artifact_kind": ref.kind,
        "stored_at": ref.location,
        "key_id": ref.key_id,
    }


class EncryptedIOManager(dg.ConfigurableIOManager):  # type: ignore[type-arg]
    """Loads inputs by the digest recorded on the upstream materialization; never pickles."""

    custody: dg.ResourceDependency[CustodyResource]

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not isinstance(obj, Sealed):
            # Assets must seal explicitly so the digest is also the data version.
            raise dg.Failure(f"{context.asset_key.to_user_string()} returned an unsealed value; use custody.output()")

    def load_input(self, context: dg.InputContext) -> Any:
        key = context.asset_key
        partition = context.asset_partition_key if context.has_asset_partitions else None
        recorded = self.custody.recorded(context.instance, key, partition)
        digest, kind = recorded["sha256"], recorded["artifact_kind"]
        step = context.step_context if hasattr(context, "step_context") else None
        if recorded.get("classification"):
            # Classified data is decrypted only for an identity cleared to read it (audited either way).
            from secure_ml.errors import PolicyDenied
            from secure_ml.governance.access import AccessPolicy

            try:
                AccessPolicy.from_settings(self.custody.settings()).require(
                    self.custody.actor(step), "data.read", classification=str(recorded["classification"]),
                    audit=self.custody.audit(), subject=f"sha256:{digest}")
            except PolicyDenied as exc:
                raise dg.Failure(description=f"reading {key.to_user_string()}: {exc.explain()}") from None
        store = self.custody.store(step)
        if kind == "parquet":
            return store.get_dataframe(digest)
        if kind == "json":
            return store.get_json(digest)
        if kind == "bytes":
            return store.get_bytes(digest)
        return recorded  # trees are materialised on demand by the asset that needs the files


def resources_for(settings: Settings, built: dict[str, Any]) -> dict[str, Any]:
    """The custody resource and the encrypted IO manager (every other resource builds on these)."""
    custody = CustodyResource(home=str(settings.home), env=settings.env, config_dir=settings.config_override)
    return {"custody": custody, "io_manager": EncryptedIOManager(custody=custody)}


def verdict(
    custody: CustodyResource,
    context: Any,
    *,
    check: str,
    subject: str,
    passed: bool,
    reason: str,
    metadata: dict[str, Any] | None = None,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    """An audited check result whose metadata says, in words, why it passed or failed."""
    custody.record(context, f"check.{check}", subject=subject, outcome="pass" if passed else "fail",
                   details={"reason": reason})
    return dg.AssetCheckResult(
        passed=passed,
        severity=severity,
        metadata={"reason": reason, "subject": subject, **(metadata or {})},
    )
