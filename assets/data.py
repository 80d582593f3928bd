"""The data stage: drops from the landing area become encrypted, provenanced, DVC-versioned datasets.

The order in ``dataset`` is the control: the drop's name is resolved safely, matched to an
approved source, and the acting identity's right to add data of that classification is decided
(and audited) before a byte of the drop is read; the bytes are then parsed strictly, so a bad
drop fails with one reason and leaves nothing behind but the audit entry.
"""

import io
from typing import Any

import dagster as dg
import pydantic

from resources import CustodyResource, Sealed, sealed_output, verdict
from resources.custody import DROP_SHA_TAG, DROP_TAG
from secure_ml.custody import crypto
from secure_ml.custody.integrity import sha256_bytes
from secure_ml.custody.store import ArtifactRef, ArtifactStore
from secure_ml.data import ingest
from secure_ml.data.versioning import DatasetVersions, DvcVersion
from secure_ml.errors import ConfigurationError, Error, IntegrityError
from secure_ml.governance.access import AccessPolicy
from secure_ml.governance.sources import ApprovedSource, ApprovedSources

DATA = "data"


class DropConfig(dg.Config):
    drop: str = pydantic.Field(
        default="", description="File name in the landing area; empty takes the newest settled drop."
    )


class _RunAudit:
    """The audit log as AccessPolicy.require wants it, with the Dagster run id in every entry."""

    def __init__(self, custody: CustodyResource, context: Any) -> None:
        self.custody, self.context = custody, context

    def record(self, actor: str, action: str, *, subject: str = "", outcome: str = "ok",
               details: dict[str, Any] | None = None) -> dict[str, Any]:
        self.custody.record(self.context, action, subject=subject, outcome=outcome, details=details)
        return {}


@dg.asset(group_name=DATA, kinds={"pandas", "parquet", "dvc"}, owners=["team:data-stewards"], code_version="2")
def dataset(context: dg.AssetExecutionContext, config: DropConfig, custody: CustodyResource) -> dg.Output[Sealed]:
    """A data drop (CSV or Parquet) from the landing area, accepted only from an approved source,
    encrypted at rest and versioned in DVC (ciphertext only), with an encrypted provenance record
    (source, sha256, size, rows, who, when, owner, classification, DVC version). Adding it needs
    data.add, reading it data.read, cleared for the source's classification (checked before any
    byte is read). The same bytes dropped again re-emit the existing version (`duplicate_of`).
    Guarded by: ciphertext authentic, digest matches provenance, source approved, access policy allows."""
    settings = custody.settings()
    actor = custody.actor(context)
    subject = f"drop:{config.drop or '(newest)'}"
    try:
        settle = _settle_seconds(settings)
        path = ingest.resolve_drop(settings.landing_dir, config.drop, settle_seconds=settle)
        subject = f"drop:{path.name}"
        approved = ApprovedSources.from_settings(settings).require(path.name)
        # Decided before any byte is read: whoever may not add data this sensitive never touches it.
        AccessPolicy.from_settings(settings).require(actor, "data.add", classification=approved.classification,
                                                     audit=_RunAudit(custody, context), subject=subject)
        raw, source = ingest.read_drop_bytes(path)
        custody.tag_run(context, {DROP_TAG: path.name, DROP_SHA_TAG: source.sha256})
        versions = DatasetVersions.from_settings(settings)
        existing = versions.find(source.sha256)
        if existing is not None and existing.meta.get("provenance_sha256"):
            return _reemit(context, custody, versions, existing, source, approved, actor)
        frame = ingest.parse_drop(raw, source)
        del raw
        return _accept(context, custody, versions, frame, source, approved, actor)
    except Error as exc:
        custody.record(context, "ingest.reject", subject=subject, outcome="deny",
                       details={"reason": exc.explain(), "error": type(exc).__name__})
        raise dg.Failure(description=exc.explain()) from None


def _settle_seconds(settings: Any) -> float:
    section = settings.load_config("pipeline").get("dataset") or {}
    try:
        return float(section.get("settle_seconds", ingest.SETTLE_SECONDS))
    except (TypeError, ValueError):
        raise ConfigurationError("pipeline.yaml dataset.settle_seconds must be a number of seconds") from None


def _accept(context: Any, custody: CustodyResource, versions: DatasetVersions, frame: Any,
            source: ingest.Source, approved: ApprovedSource, actor: str) -> dg.Output[Sealed]:
    """Seal, version and record a new drop; on any failure undo what this call wrote."""
    store = custody.store(context)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, engine="pyarrow")
    with buffer.getbuffer() as view:  # hashed and stored from the buffer: the Parquet bytes are held once
        digest = sha256_bytes(view)  # type: ignore[arg-type]
    created: list[str] = [] if store.exists(digest) else [digest]
    tracked = False
    try:
        buffer.seek(0)
        ref = store.put_stream(buffer, kind="parquet", details={"role": "dataset", "source": source.name})
        version = versions.track(source.sha256, store.path_for(ref.sha256))
        tracked = True
        record = ingest.provenance(source, frame, actor=actor, artifact_sha256=ref.sha256,
                                   approved=approved.summary(), dvc=version.summary())
        prov = store.put_json(record, details={"role": "provenance", "source": source.name})
        created.append(prov.sha256)
        version = versions.annotate(source.sha256, {
            "source": source.name, "dataset_sha256": ref.sha256, "provenance_sha256": prov.sha256,
            "approved_source": approved.name, "classification": approved.classification,
            "rows": int(len(frame)), "actor": actor, "ingested_at": record["ingested_at"],
        })
    except Exception as exc:
        if tracked:
            versions.forget(source.sha256)
        for written in created:  # nothing half-ingested: only what this call created is removed
            store.path_for(written).unlink(missing_ok=True)
        reason = exc.explain() if isinstance(exc, Error) else f"{type(exc).__name__} while storing the drop"
        raise IntegrityError(f"drop {source.name!r} was not ingested: {reason}") from None
    custody.record(context, "ingest", subject=f"sha256:{ref.sha256}",
                   details={"source": source.name, "source_sha256": source.sha256, "rows": int(len(frame)),
                            "approved_source": approved.name, "classification": approved.classification,
                            "dvc_version": version.version})
    context.log.info(f"ingested {source.name} from {approved.name}: {len(frame)} rows, "
                     f"sha256 {ref.sha256[:16]}…, DVC {version.version}")
    return sealed_output(Sealed(ref), _metadata(
        source.name, source.sha256, approved, int(len(frame)), len(frame.columns), version.version, actor,
        prov.sha256))


def _reemit(context: Any, custody: CustodyResource, versions: DatasetVersions, existing: DvcVersion,
            source: ingest.Source, approved: ApprovedSource, actor: str) -> dg.Output[Sealed]:
    """The same bytes again: re-emit the version they already are, with the same data version."""
    meta = existing.meta
    digest, provenance_sha256 = str(meta["dataset_sha256"]), str(meta["provenance_sha256"])
    store = custody.store(context)
    # The store copy must still verify; if it was lost or damaged, DVC brings it back.
    size = versions.restore_into_store(source.sha256, store, digest)
    record = store.get_json(provenance_sha256)
    original = f"{record['source']['name']} (ingested {record['ingested_at']} by {record['actor']})"
    custody.record(context, "ingest.duplicate", subject=f"sha256:{digest}",
                   details={"source": source.name, "source_sha256": source.sha256, "duplicate_of": original,
                            "dvc_version": existing.version})
    context.log.info(f"{source.name} has the same bytes as {original}: not processed again")
    ref = _ref_for(store, digest, size)
    metadata = _metadata(source.name, source.sha256, approved, int(record["rows"]), len(record["columns"]),
                         existing.version, actor, provenance_sha256)
    return sealed_output(Sealed(ref), {**metadata, "duplicate_of": original})


def _ref_for(store: ArtifactStore, digest: str, size: int) -> ArtifactRef:
    path = store.path_for(digest)
    with path.open("rb") as sealed:
        key_id = crypto.peek_key_id(sealed)
    return ArtifactRef(digest, size, "parquet", key_id, str(path.relative_to(store.root)))


def _metadata(source: str, source_sha256: str, approved: ApprovedSource, rows: int, columns: int,
              dvc_version: str, actor: str, provenance_sha256: str) -> dict[str, Any]:
    return {
        "dagster/row_count": rows,
        "source": source,
        "approved_source": approved.name,
        "owner": approved.owner,
        "classification": approved.classification,
        "rows": rows,
        "columns": columns,
        "dvc_version": dvc_version,
        "actor": actor,
        "source_sha256": source_sha256,
        "provenance_sha256": provenance_sha256,
    }


# -- blocking checks ------------------------------------------------------------------------------
@dg.asset_check(asset=dataset, blocking=True)
def ciphertext_authentic(context: dg.AssetCheckExecutionContext, custody: CustodyResource) -> dg.AssetCheckResult:
    """Every AES-GCM chunk of the stored dataset authenticates and it decrypts to the recorded digest."""
    digest = custody.recorded(context.instance, dataset.key)["sha256"]
    try:
        size = custody.store(context).verify(digest)
    except Error as exc:
        return verdict(custody, context, check="ciphertext_authentic", subject=f"sha256:{digest}",
                       passed=False, reason=exc.explain())
    return verdict(custody, context, check="ciphertext_authentic", subject=f"sha256:{digest}",
                   passed=True, reason=f"{size} bytes authenticated; digest matches", metadata={"bytes": size})


@dg.asset_check(asset=dataset, blocking=True)
def provenance_matches(context: dg.AssetCheckExecutionContext, custody: CustodyResource) -> dg.AssetCheckResult:
    """The provenance record is itself authentic and names exactly the digest the dataset was stored under."""
    recorded = custody.recorded(context.instance, dataset.key)
    digest = recorded["sha256"]
    try:
        record = custody.store(context).get_json(recorded["provenance_sha256"])
    except Error as exc:
        return verdict(custody, context, check="provenance_matches", subject=f"sha256:{digest}",
                       passed=False, reason=f"provenance record unreadable: {exc.explain()}")
    claimed = record.get("artifact_sha256")
    passed = claimed == digest and record.get("source", {}).get("sha256") == recorded["source_sha256"]
    reason = (f"provenance names sha256:{digest[:16]}… from {record['source']['name']}" if passed else
              f"provenance names sha256:{str(claimed)[:16]}… but the dataset is sha256:{digest[:16]}…")
    return verdict(custody, context, check="provenance_matches", subject=f"sha256:{digest}",
                   passed=passed, reason=reason)


@dg.asset_check(asset=dataset, blocking=True)
def source_approved(context: dg.AssetCheckExecutionContext, custody: CustodyResource) -> dg.AssetCheckResult:
    """The drop matches an approved source in today's configuration, with the owner and classification
    it was ingested under, and its authenticated provenance record names that approval."""
    recorded = custody.recorded(context.instance, dataset.key)
    subject = f"sha256:{recorded['sha256']}"
    name = str(recorded.get("source", ""))
    try:
        record = custody.store(context).get_json(recorded["provenance_sha256"])
        approved = ApprovedSources.from_settings(custody.settings()).match(name)
    except (Error, KeyError) as exc:
        reason = exc.explain() if isinstance(exc, Error) else f"materialization lacks {exc}"
        return verdict(custody, context, check="source_approved", subject=subject, passed=False, reason=reason)
    if approved is None:
        reason = f"{name} matches no approved source in the sources configuration"
        return verdict(custody, context, check="source_approved", subject=subject, passed=False, reason=reason)
    if not record.get("approved_source"):
        reason = f"the provenance record of {name} names no approved source"
        return verdict(custody, context, check="source_approved", subject=subject, passed=False, reason=reason)
    was = (recorded.get("approved_source"), recorded.get("owner"), recorded.get("classification"))
    now = (approved.name, approved.owner, approved.classification)
    if was != now:
        reason = (f"{name} was ingested as {was[0]} ({was[2]}, owner {was[1]}) but its approved source is "
                  f"now {now[0]} ({now[2]}, owner {now[1]}); re-ingest it under the current configuration")
        return verdict(custody, context, check="source_approved", subject=subject, passed=False, reason=reason)
    reason = f"{name} is from approved source {approved.name}, owned by {approved.owner}, {approved.classification}"
    return verdict(custody, context, check="source_approved", subject=subject, passed=True, reason=reason,
                   metadata={"approved_source": approved.name, "classification": approved.classification})


@dg.asset_check(asset=dataset, blocking=True)
def access_policy_allows(context: dg.AssetCheckExecutionContext, custody: CustodyResource) -> dg.AssetCheckResult:
    """The identity that ingested this version may add data of its classification under roles.yaml."""
    recorded = custody.recorded(context.instance, dataset.key)
    subject = f"sha256:{recorded['sha256']}"
    actor, classification = str(recorded.get("actor") or ""), recorded.get("classification")
    if not actor or not classification:
        return verdict(custody, context, check="access_policy_allows", subject=subject, passed=False,
                       reason="the materialization records no actor or classification")
    try:
        decision = AccessPolicy.from_settings(custody.settings()).decide(
            actor, "data.add", classification=str(classification))
    except Error as exc:
        return verdict(custody, context, check="access_policy_allows", subject=subject, passed=False,
                       reason=exc.explain())
    return verdict(custody, context, check="access_policy_allows", subject=subject, passed=decision.allowed,
                   reason=decision.reason, metadata={"actor": actor, "roles": ", ".join(decision.roles) or "none"})
