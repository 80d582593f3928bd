"""The validation stage: a drop becomes a validated, screened, PII-handled, split dataset.

``validated_dataset`` runs every control once and reports each as its own blocking check, so the
UI shows which control failed and why, and nothing downstream runs on a rejected drop:

- ``expectations_pass``: the Great Expectations suite built from the dataset's schema file;
- ``poisoning_score_under_threshold``: outliers, label consistency (reference neighbourhood and
  confident learning) and shift against the last accepted version;
- ``no_unhandled_pii``: every personal identifier found is dropped, hashed or redacted by a rule.

A drop that passes all three becomes the reference the next drop is screened against
(``accepted: true`` in the materialization metadata); before any drop was accepted, the schema's
bundled trusted sample is the reference.
"""


from typing import Any

import dagster as dg
import pandas as pd

from resources import CustodyResource, verdict
from secure_ml.data import pii, splitting
from secure_ml.data import validation as gx_validation
from secure_ml.data.poisoning import PoisoningReport, ScreeningConfig, screen
from secure_ml.data.schema import Schema, load_reference, load_schema, select_schema
from secure_ml.errors import Error

DATA = "data"
FORMAT = "secure-ml-validated/1"
VALIDATED = dg.AssetKey("validated_dataset")
DATASET = dg.AssetKey("dataset")
EXPECTATIONS, POISONING, PII = "expectations_pass", "poisoning_score_under_threshold", "no_unhandled_pii"


@dg.asset(
    ins={"dataset": dg.AssetIn()},
    group_name=DATA,
    kinds={"great_expectations", "pandas", "json"},
    owners=["team:data-stewards"],
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(EXPECTATIONS, asset=VALIDATED, blocking=True,
                          description="Every expectation of the dataset's schema (Great Expectations) holds."),
        dg.AssetCheckSpec(POISONING, asset=VALIDATED, blocking=True,
                          description="The poisoning screen's drop score is under the configured threshold."),
        dg.AssetCheckSpec(PII, asset=VALIDATED, blocking=True,
                          description="Every personal identifier found is dropped, hashed or redacted by a rule."),
    ],
)
def validated_dataset(context: dg.AssetExecutionContext, dataset: pd.DataFrame, custody: CustodyResource):  # type: ignore[no-untyped-def]
    """The accepted drop after schema validation (Great Expectations), poisoning screening against the
    last accepted version, and PII handling, split into seeded stratified train/test Parquet sets
    (encrypted). Guarded by: expectations pass, poisoning score under threshold, no unhandled PII."""
    settings = custody.settings()
    upstream = custody.recorded(context.instance, DATASET)
    dataset_sha = str(upstream["sha256"])
    subject = f"sha256:{dataset_sha}"
    source = str(upstream.get("source", ""))
    try:
        config = settings.load_config("validation")
        schema = load_schema(select_schema(source, config.get("schemas") or {}, settings.config_dir))
        screening = ScreeningConfig.from_mapping(config.get("poisoning"))
        rules, max_values = pii.rules_from_config(config)
        split_config = dict(config.get("split") or {})
        test_fraction = float(split_config.get("test_fraction", 0.2))
        seed = int(split_config.get("seed", 0))
        lookback = int((config.get("reference") or {}).get("lookback", 50))
    except (Error, TypeError, ValueError) as exc:
        reason = exc.explain() if isinstance(exc, Error) else f"validation.yaml: {exc}"
        custody.record(context, "validation.configure", subject=subject, outcome="fail", details={"reason": reason})
        raise dg.Failure(description=reason) from None

    # PII first: nothing below (GE examples, metadata, the stored sets) may see raw identifiers.
    plan = pii.plan_handling(pii.detect(dataset, max_values=max_values), rules)
    key_id = ""
    key = None
    if any(action == "hash" for action in plan.actions().values()):
        key_id, key = pii.pseudonym_key(settings)
    frame = pii.apply(dataset, plan, key)
    del key
    for finding, rule in plan.handled:
        custody.record(context, "pii.handle", subject=subject, details={
            "column": finding.column, "kind": finding.kind, "action": rule.action, "by": finding.by})
    for finding in plan.unhandled:
        custody.record(context, "pii.unhandled", subject=subject, outcome="fail", details={
            "column": finding.column, "kind": finding.kind, "by": finding.by})

    result = gx_validation.validate(frame, schema, extra_columns=pii.handled_columns(plan), redact=pii.redact_text)
    custody.record(context, "validation.expectations", subject=subject,
                   outcome="pass" if result.success else "fail",
                   details={"schema": schema.dataset, **{k: v for k, v in result.summary().items() if k != "success"}})

    reference_note, report, screen_error = _screen(context, custody, frame, schema, screening, lookback)

    kept = [c for c in [*schema.columns, *pii.handled_columns(plan)] if c in frame.columns]
    train_sha = test_sha = None
    train_rows = test_rows = 0
    if schema.label in frame.columns:
        in_test = splitting.assign_test(frame, schema.label, test_fraction=test_fraction, seed=seed)
        # one set in memory at a time: the split never doubles the dataset
        part = frame.loc[~in_test, kept].reset_index(drop=True)
        train_sha, train_rows = custody.seal(context, part, role="validated_train", dataset=dataset_sha).sha256, len(part)
        part = frame.loc[in_test, kept].reset_index(drop=True)
        test_sha, test_rows = custody.seal(context, part, role="validated_test", dataset=dataset_sha).sha256, len(part)
        del part

    passed = {
        EXPECTATIONS: result.success,
        POISONING: report is not None and not report.blocked,
        PII: not plan.unhandled,
    }
    accepted = all(passed.values()) and train_sha is not None
    poisoning_summary: dict[str, Any] = report.summary() if report else {"error": screen_error}
    poisoning_summary["reference"] = reference_note
    record = {
        "format": FORMAT,
        "accepted": accepted,
        "train_sha256": train_sha,
        "test_sha256": test_sha,
        "label": schema.label,
        "features": schema.features,
        "numeric": schema.numeric,
        "categorical": schema.categorical,
        "protected": list(schema.protected),
        "dataset_sha256": dataset_sha,
        "dvc_version": upstream.get("dvc_version"),
        "source": source,
        "schema": {"dataset": schema.dataset, "sha256": schema.digest()},
        "pii": {**plan.summary(), "hmac_key_id": key_id},
        "poisoning": poisoning_summary,
        "validation": result.summary(),
        "split": {"test_fraction": test_fraction, "seed": seed, "train_rows": train_rows, "test_rows": test_rows,
                  "stratified_by": schema.label, "method": "keyed hash of row content, per class"},
    }
    metadata: dict[str, Any] = {
        "accepted": accepted,
        "schema": schema.dataset,
        "source": source,
        "dataset_sha256": dataset_sha,
        "dvc_version": str(upstream.get("dvc_version") or ""),
        "train_sha256": train_sha or "",
        "test_sha256": test_sha or "",
        "rows": len(frame),
        "train_rows": train_rows,
        "test_rows": test_rows,
        "expectations": dg.MetadataValue.md(result.markdown()),
        "poisoning": dg.MetadataValue.md(_poisoning_table(report, reference_note, screen_error)),
        "drop_score": float(report.drop_score) if report else float("nan"),
        "reference": reference_note,
        "pii": dg.MetadataValue.json(record["pii"]),
    }
    if upstream.get("classification"):
        metadata["classification"] = str(upstream["classification"])  # derived data keeps its sensitivity
    custody.record(context, "validation.accept" if accepted else "validation.reject", subject=subject,
                   outcome="ok" if accepted else "fail",
                   details={"train_sha256": train_sha, "test_sha256": test_sha, "checks": passed})
    yield custody.output(context, record, metadata=metadata)
    yield _expectations_check(custody, context, subject, result, schema)
    yield _poisoning_check(custody, context, subject, report, screen_error, reference_note)
    yield _pii_check(custody, context, subject, plan)


# -- the reference and the screen ----------------------------------------------------------------------
def _screen(context: Any, custody: CustodyResource, frame: pd.DataFrame, schema: Schema,
            config: ScreeningConfig, lookback: int) -> tuple[str, PoisoningReport | None, str]:
    """(reference description, report or None, why it could not screen)."""
    needed = [schema.label, *schema.features]
    missing = [c for c in needed if c not in frame.columns]
    not_numeric = [c for c in schema.numeric if c in frame.columns and not pd.api.types.is_numeric_dtype(frame[c])]
    if missing or not_numeric:
        why = (f"missing columns {missing}" if missing else "") + \
              (f"{'; ' if missing else ''}non-numeric numeric features {not_numeric}" if not_numeric else "")
        return "not used", None, f"not screened: the drop does not match its schema ({why})"
    try:
        reference, note = _reference(context, custody, schema, lookback)
        report = screen(frame, reference, label=schema.label,
                        numeric=schema.numeric, categorical=schema.categorical, config=config)
    except Error as exc:
        return "unusable", None, f"not screened: {exc.explain()}"
    except KeyError as exc:
        return "unusable", None, f"not screened: the reference lacks column {exc}"
    return note, report, ""


def _reference(context: Any, custody: CustodyResource, schema: Schema, lookback: int) -> tuple[pd.DataFrame | None, str]:
    """The last accepted version of this dataset (decrypted, digest-checked), else the bundled sample."""
    records = context.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=VALIDATED),
                                                      limit=max(lookback, 1)).records
    for record in records:
        materialization = record.asset_materialization
        if materialization is None:
            continue
        meta = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        if meta.get("accepted") is True and meta.get("schema") == schema.dataset and meta.get("train_sha256"):
            store = custody.store(context)
            reference = pd.concat([store.get_dataframe(str(meta["train_sha256"])),
                                   store.get_dataframe(str(meta["test_sha256"]))], ignore_index=True)
            return reference, (f"last accepted version: dataset sha256:{str(meta.get('dataset_sha256'))[:16]}… "
                               f"(run {record.run_id[:8]})")
    bundled = load_reference(schema)
    if bundled is not None and schema.reference_file is not None:
        return bundled, f"bundled trusted sample {schema.reference_file.name} (no accepted version yet)"
    return None, "none: first version of this dataset, screened on its own"


# -- the three checks -----------------------------------------------------------------------------------
def _named(name: str, result: dg.AssetCheckResult) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=name, asset_key=VALIDATED, passed=result.passed,
                               severity=result.severity, metadata=result.metadata)


def _expectations_check(custody: CustodyResource, context: Any, subject: str,
                        result: gx_validation.ValidationResult, schema: Schema) -> dg.AssetCheckResult:
    summary = result.summary()
    if result.success:
        reason = f"all {summary['expectations']} expectations of schema {schema.dataset} passed on {result.rows} rows"
    else:
        shown = "; ".join(o.describe() for o in result.failures[:3])
        more = f" (and {len(result.failures) - 3} more)" if len(result.failures) > 3 else ""
        reason = (f"{summary['failed']} of {summary['expectations']} expectations of schema {schema.dataset} "
                  f"failed: {shown}{more}")
    return _named(EXPECTATIONS, verdict(custody, context, check=EXPECTATIONS, subject=subject,
                                        passed=result.success, reason=reason, metadata={
                                            "failed": summary["failed"], "expectations": summary["expectations"],
                                            "table": dg.MetadataValue.md(result.markdown())}))


def _poisoning_check(custody: CustodyResource, context: Any, subject: str, report: PoisoningReport | None,
                     error: str, reference: str) -> dg.AssetCheckResult:
    if report is None:
        return _named(POISONING, verdict(custody, context, check=POISONING, subject=subject, passed=False,
                                         reason=error, metadata={"reference": reference}))
    worst = max(report.detectors, key=lambda d: d.ratio)
    if report.blocked:
        reason = (f"drop score {report.drop_score:.3g} is over the threshold {report.threshold:g}: "
                  + "; ".join(report.reasons()))
    else:
        reason = (f"drop score {report.drop_score:.3g} is under the threshold {report.threshold:g} "
                  f"(highest: {worst.name} {worst.score:.3g} of limit {worst.limit:g})")
    metadata = {
        "drop_score": float(report.drop_score),
        "threshold": float(report.threshold),
        "reference": reference,
        "table": dg.MetadataValue.md(_poisoning_table(report, reference, "")),
        "detectors": dg.MetadataValue.json(report.summary()["detectors"]),
    }
    if report.subsampled:
        metadata["subsampled"] = report.subsampled
    return _named(POISONING, verdict(custody, context, check=POISONING, subject=subject,
                                     passed=not report.blocked, reason=reason, metadata=metadata))


def _pii_check(custody: CustodyResource, context: Any, subject: str, plan: pii.Plan) -> dg.AssetCheckResult:
    if plan.unhandled:
        reason = ("unhandled PII: " + "; ".join(f.describe() for f in plan.unhandled)
                  + ". Add a rule to pii.rules in validation.yaml (drop, hash or redact)")
    elif plan.handled:
        reason = "all PII handled: " + "; ".join(f"{f.column} ({f.kind}) {r.action}" for f, r in plan.handled)
    else:
        reason = "no personal identifiers found"
    return _named(PII, verdict(custody, context, check=PII, subject=subject, passed=not plan.unhandled,
                               reason=reason, metadata={"pii": dg.MetadataValue.json(plan.summary())}))


def _poisoning_table(report: PoisoningReport | None, reference: str, error: str) -> str:
    if report is None:
        return f"**Not screened.** {error}"
    lines = [
        f"**Drop score {report.drop_score:.3g}** (threshold {report.threshold:g}; "
        f"{'BLOCKED' if report.blocked else 'under threshold'}). Reference: {reference}.",
        "",
        "| detector | score | limit | rows flagged | first rows (most suspicious first) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for d in report.detectors:
        flag = "**" if d.over else ""
        first = ", ".join(map(str, d.indices[:15])) + (" …" if len(d.indices) > 15 else "")
        lines.append(f"| {flag}{d.name}{flag} | {d.score:.3g} | {d.limit:g} | {d.count} | {first} |")
    if report.subsampled:
        lines += ["", f"_{report.subsampled}._"]
    return "\n".join(lines)
