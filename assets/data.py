"""The data stage: drops from the landing area become encrypted, provenanced datasets."""

import dagster as dg
import pydantic

from resources import CustodyResource, sealed_output, verdict
from secure_ml import ingest
from secure_ml.errors import Error

DATA = "data"


class DropConfig(dg.Config):
    drop: str = pydantic.Field(
        default="", description="File name in the landing area; empty takes the newest complete drop."
    )


@dg.asset(group_name=DATA, kinds={"pandas", "parquet"}, owners=["team:data-stewards"], code_version="1")
def dataset(context: dg.AssetExecutionContext, config: DropConfig, custody: CustodyResource) -> dg.Output:
    """A data drop from the landing area, encrypted at rest, with its provenance record (source,
    sha256, size, rows, who, when). Guarded by: ciphertext authentic, digest matches provenance."""
    try:
        path = ingest.resolve_drop(custody.settings().landing_dir, config.drop)
        frame, source = ingest.read_drop(path)
    except Error as exc:
        custody.record(context, "ingest", subject=config.drop or "newest drop", outcome="deny",
                       details={"reason": exc.explain()})
        raise dg.Failure(exc.explain()) from None
    actor = custody.actor(context)
    sealed = custody.seal(context, frame, role="dataset", source=source.name)
    record = ingest.provenance(source, frame, actor=actor, artifact_sha256=sealed.sha256)
    provenance = custody.seal(context, record, role="provenance")
    custody.record(context, "ingest", subject=f"sha256:{sealed.sha256}",
                   details={"source": source.name, "source_sha256": source.sha256, "rows": len(frame)})
    context.log.info(f"ingested {source.name}: {len(frame)} rows, sha256 {sealed.sha256[:16]}…")
    return sealed_output(sealed, {
        "provenance_sha256": provenance.sha256,
        "source": source.name,
        "source_sha256": source.sha256,
        "source_bytes": source.size,
        "rows": len(frame),
        "columns": len(frame.columns),
        "actor": actor,
        "ingested_at": record["ingested_at"],
    })


@dg.asset_check(asset=dataset, blocking=True)
def dataset_ciphertext_authentic(context: dg.AssetCheckExecutionContext, custody: CustodyResource) -> dg.AssetCheckResult:
    """Every AES-GCM chunk of the stored dataset authenticates and it decrypts to the recorded digest."""
    digest = custody.recorded(context.instance, dataset.key)["sha256"]
    try:
        size = custody.store(context).verify(digest)
    except Error as exc:
        return verdict(custody, context, check="dataset_ciphertext_authentic", subject=f"sha256:{digest}",
                       passed=False, reason=exc.explain())
    return verdict(custody, context, check="dataset_ciphertext_authentic", subject=f"sha256:{digest}",
                   passed=True, reason=f"{size} bytes authenticated; digest matches", metadata={"bytes": size})


@dg.asset_check(asset=dataset, blocking=True)
def dataset_digest_matches_provenance(context: dg.AssetCheckExecutionContext, custody: CustodyResource) -> dg.AssetCheckResult:
    """The provenance record is itself authentic and names exactly the digest the dataset was stored under."""
    recorded = custody.recorded(context.instance, dataset.key)
    digest = recorded["sha256"]
    try:
        record = custody.store(context).get_json(recorded["provenance_sha256"])
    except Error as exc:
        return verdict(custody, context, check="dataset_digest_matches_provenance", subject=f"sha256:{digest}",
                       passed=False, reason=f"provenance record unreadable: {exc.explain()}")
    claimed = record.get("artifact_sha256")
    passed = claimed == digest and record.get("source", {}).get("sha256") == recorded["source_sha256"]
    reason = (f"provenance names sha256:{digest[:16]}… from {record['source']['name']}" if passed else
              f"provenance names sha256:{str(claimed)[:16]}… but the dataset is sha256:{digest[:16]}…")
    return verdict(custody, context, check="dataset_digest_matches_provenance", subject=f"sha256:{digest}",
                   passed=passed, reason=reason)
