"""The validation stage: a drop becomes a validated, screened, PII-handled, split dataset.

``validated_dataset`` runs every control once and stores what each found in the sealed record
(``validation``, ``poisoning``, ``pii``); each control is its own blocking ``@dg.asset_check`` that
reads that record back from the store by the digest of the latest materialization and judges it, so
it can run alone, the UI shows which control failed and why, and nothing downstream runs on a
rejected drop:

- ``expectations_pass``: the Great Expectations suite built from the dataset's schema file;
- ``poisoning_below_limit``: outliers, label consistency (reference neighbourhood and
  confident learning) and shift against the last accepted version;
- ``no_unhandled_pii``: every personal identifier found is dropped, hashed or redacted by a rule.

A drop that passes all three becomes the reference the next drop is screened against
(``accepted: true`` in the materialization metadata) while it stays within the drift bounds of the
schema's pinned trusted sample (``reference`` in validation.yaml); before any drop was accepted, and
whenever the last accepted one drifted too far, the pinned sample is the reference. A data set with
neither has no yardstick: its first version is rejected unless a data steward signed that drop off
(``secure-ml data sign-off``; secure_ml/data/poisoning_reference.py).
"""


from typing import Any

import dagster as dg
import pandas as pd

from resources import CustodyResource, model_key, verdict
from resources.custody import MODEL_TAG
from resources.metadata import standard_metadata
from secure_ml.data import pii
from secure_ml.data.columns import class_names
from secure_ml.data import splitting
from secure_ml.data import validation as gx_validation
from secure_ml.governance import authn
from secure_ml.governance.access import AccessPolicy
from secure_ml.errors import BadInput, Error
from secure_ml.data.poisoning import PoisoningReport, ScreeningConfig, screen
from secure_ml.data.poisoning_reference import find_sign_off, find_signed_sign_off, reference_drift
from secure_ml.data.schema import Schema, load_reference, load_schema, select_schema

DATA = "data"
FORMAT = "secure-ml-validated/1"
VALIDATED = dg.AssetKey("validated_dataset")
DATASET = dg.AssetKey("dataset")
EXPECTATIONS, POISONING, PII = "expectations_pass", "poisoning_below_limit", "no_unhandled_pii"


@dg.asset(
    ins={"dataset": dg.AssetIn()},
    group_name=DATA,
    kinds={"great_expectations", "pandas", "json"},
    owners=["team:data-stewards"],
    code_version="1",
)
def validated_dataset(context: dg.AssetExecutionContext, dataset: pd.DataFrame,
                      custody: CustodyResource) -> dg.Output[Any]:
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
        bounds = _ReferenceBounds.from_config(config.get("reference"))
        custody.tag_run(context, {MODEL_TAG: schema.dataset})
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

    # The suite runs (in the warm worker, where there is one) while this process screens for poisoning.
    pending = gx_validation.submit(frame, schema, extra_columns=pii.handled_columns(plan))
    reference_note, report, screen_error = _screen(context, custody, frame, schema, screening, bounds, dataset_sha)
    result = pending.result(redact=pii.redact_text)
    custody.record(context, "validation.expectations", subject=subject,
                   outcome="pass" if result.success else "fail",
                   details={"schema": schema.dataset, "ran": result.ran,
                            **{k: v for k, v in result.summary().items() if k != "success"}})

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
    # What each check judges, stored with the record (the checks read it back by digest).
    poisoning_summary: dict[str, Any] = report.summary() if report else {"error": screen_error}
    poisoning_summary.update(reference=reference_note, reasons=report.reasons() if report else [],
                             table=_poisoning_table(report, reference_note, screen_error))
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
        "class_names": class_names(schema),
        "dataset_sha256": dataset_sha,
        "dvc_version": upstream.get("dvc_version"),
        "source": source,
        "schema": {"dataset": schema.dataset, "sha256": schema.digest()},
        "pii": {**plan.summary(), "hmac_key_id": key_id},
        "poisoning": poisoning_summary,
        "validation": {**result.summary(), "schema": schema.dataset, "rows": result.rows,
                       "table": result.markdown()},
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
    metadata.update(standard_metadata(schema, rows=len(frame), classification=upstream.get("classification"),
                                      pii_actions=plan.actions(), present=kept))
    if not accepted:
        raise _reject(context, custody, record, metadata, subject)
    custody.record(context, "validation.accept", subject=subject, outcome="ok",
                   details={"train_sha256": train_sha, "test_sha256": test_sha, "checks": passed})
    return custody.output(context, record, metadata=metadata)


def _reject(context: Any, custody: CustodyResource, record: dict[str, Any], metadata: dict[str, Any],
            subject: str) -> dg.Failure:
    """A rejected drop is never materialised, so nothing downstream can take it as input and the last
    accepted version stays the latest: its record is sealed as evidence, each check's verdict on it is
    reported against validated_dataset, an observation says it was rejected, and the step fails with
    the first failed check and its reason in one line (an expected denial: no retry)."""
    evidence = custody.seal(context, record, role="validated_rejected", dataset=record["dataset_sha256"])
    verdicts = {name: judge(record.get(part) if isinstance(record.get(part), dict) else {})
                for name, (part, judge) in JUDGES.items()}
    for name, (passed, reason, check_metadata) in verdicts.items():
        custody.record(context, f"check.{name}", subject=subject, outcome="pass" if passed else "fail",
                       details={"reason": reason})
        context.log_event(dg.AssetCheckEvaluation(
            asset_key=context.asset_key, check_name=name, passed=passed, blocking=True,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"reason": reason, "subject": subject, "rejected_record_sha256": evidence.sha256,
                      **check_metadata}))
    failed = [f"{name}: {reason}" for name, (passed, reason, _) in verdicts.items() if not passed] or [
        "the drop could not be split (no label column)"]
    context.log_event(dg.AssetObservation(asset_key=context.asset_key, metadata={
        **{k: v for k, v in metadata.items() if k not in ("train_sha256", "test_sha256")},
        "rejected_record_sha256": evidence.sha256, "rejected_because": failed[0]}))
    custody.record(context, "validation.reject", subject=subject, outcome="fail",
                   details={"record_sha256": evidence.sha256, "reasons": failed})
    return dg.Failure(description=f"drop rejected: {failed[0]}", allow_retries=False,
                      metadata={"rejected_record_sha256": evidence.sha256})


# -- the reference and the screen ----------------------------------------------------------------------
class _ReferenceBounds:
    """validation.yaml ``reference``: where the last accepted version is looked for, and how far it may drift."""

    KEYS = {"lookback", "max_psi", "max_label_shift"}

    def __init__(self, lookback: int = 50, max_psi: float = 0.25, max_label_shift: float = 0.10) -> None:
        self.lookback, self.max_psi, self.max_label_shift = lookback, max_psi, max_label_shift

    @classmethod
    def from_config(cls, raw: Any) -> "_ReferenceBounds":
        raw = dict(raw or {})
        unknown = set(raw) - cls.KEYS
        if unknown:
            raise ValueError(f"reference: unknown keys {sorted(unknown)}")
        bounds = cls(int(raw.get("lookback", 50)), float(raw.get("max_psi", 0.25)),
                     float(raw.get("max_label_shift", 0.10)))
        if bounds.max_psi <= 0 or not 0 < bounds.max_label_shift <= 1:
            raise ValueError("reference: max_psi > 0 and 0 < max_label_shift <= 1 are required")
        return bounds


def _screen(context: Any, custody: CustodyResource, frame: pd.DataFrame, schema: Schema,
            config: ScreeningConfig, bounds: _ReferenceBounds,
            dataset_sha: str) -> tuple[str, PoisoningReport | None, str]:
    """(reference description, report or None, why it could not screen)."""
    needed = [schema.label, *schema.features]
    missing = [c for c in needed if c not in frame.columns]
    not_numeric = [c for c in schema.numeric if c in frame.columns and not pd.api.types.is_numeric_dtype(frame[c])]
    if missing or not_numeric:
        why = (f"missing columns {missing}" if missing else "") + \
              (f"{'; ' if missing else ''}non-numeric numeric features {not_numeric}" if not_numeric else "")
        return "not used", None, f"not screened: the drop does not match its schema ({why})"
    try:
        reference, note = _reference(context, custody, schema, bounds)
        found = None
        if reference is None:
            settings = custody.settings()
            if authn.has_trust_policy(settings):  # only a signed data_signoff statement counts
                found = find_signed_sign_off(settings, dataset=schema.dataset, drop_sha256=dataset_sha)
            else:
                found = find_sign_off(settings.home, dataset=schema.dataset, drop_sha256=dataset_sha,
                                      policy=AccessPolicy.from_settings(settings), audit=settings.audit_log())
            if found.valid:
                record = found.record or {}
                proof = (f"signed statement, key {str(record['keyid'])[:16]}…" if record.get("signed")
                         else f"audit entry {record.get('audit_seq')}")
                note = f"none: first version of this dataset, accepted on the sign-off of {record['actor']} ({proof})"
        report = screen(frame, reference, label=schema.label, numeric=schema.numeric,
                        categorical=schema.categorical, config=config,
                        sign_off=found.record if found is not None else None)
        if found is not None and not found.valid:
            report.unguarded += (f" ({found.why}; after checking it: secure-ml data sign-off {schema.dataset} "
                                 f"--drop {dataset_sha} --reason '...')")
    except Error as exc:
        return "unusable", None, f"not screened: {exc.explain()}"
    except KeyError as exc:
        return "unusable", None, f"not screened: the reference lacks column {exc}"
    return note, report, ""


def _reference(context: Any, custody: CustodyResource, schema: Schema,
               bounds: _ReferenceBounds) -> tuple[pd.DataFrame | None, str]:
    """The last accepted version of this dataset (decrypted, digest-checked) while it stays within the
    drift bounds of the pinned sample, else the pinned sample (digest-checked; a tampered one raises)."""
    pinned = load_reference(schema)
    records = context.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=model_key(VALIDATED)),
                                                      limit=max(bounds.lookback, 1)).records
    for record in records:
        materialization = record.asset_materialization
        if materialization is None:
            continue
        meta = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        if meta.get("accepted") is True and meta.get("schema") == schema.dataset and meta.get("train_sha256"):
            store = custody.store(context)
            reference = pd.concat([store.get_dataframe(str(meta["train_sha256"])),
                                   store.get_dataframe(str(meta["test_sha256"]))], ignore_index=True)
            version = f"last accepted version: dataset sha256:{str(meta.get('dataset_sha256'))[:16]}… " \
                      f"(run {record.run_id[:8]})"
            if pinned is None or schema.reference_file is None:
                return reference, f"{version}; no pinned sample to bound its drift"
            drift = reference_drift(pinned, reference, label=schema.label, numeric=schema.numeric,
                                    categorical=schema.categorical, max_psi=bounds.max_psi,
                                    max_label_shift=bounds.max_label_shift)
            if drift.within:
                return reference, f"{version}, {drift.describe()}"
            # Accepted versions must not walk the yardstick away from the trusted sample step by step.
            return pinned, (f"bundled trusted sample {schema.reference_file.name}: the {version} "
                            f"{drift.describe()}")
    if pinned is not None and schema.reference_file is not None:
        return pinned, f"bundled trusted sample {schema.reference_file.name} (no accepted version yet)"
    return None, "none: first version of this dataset, no trusted reference"


# -- the three checks: each reads the stored record back by digest and judges it -------------------------
def _stored(context: Any, custody: CustodyResource, part: str) -> tuple[str, dict[str, Any]]:
    """(subject, the record's ``part``) of the latest validated_dataset, decrypted and digest-checked."""
    recorded = custody.recorded(context.instance, VALIDATED)
    record = custody.store(context).get_json(str(recorded["sha256"]))
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get(part), dict):
        raise BadInput(f"the stored validated_dataset record has no {part!r} section (format {FORMAT} expected)")
    return f"sha256:{record.get('dataset_sha256', '')}", record[part]


def _unjudged(custody: CustodyResource, context: Any, check: str, exc: Error) -> dg.AssetCheckResult:
    """Fail closed: a check that cannot read what it judges does not pass."""
    dataset = custody.recorded(context.instance, VALIDATED).get("dataset_sha256", "")
    return verdict(custody, context, check=check, subject=f"sha256:{dataset}", passed=False,
                   reason=f"cannot judge the stored validated_dataset: {exc.explain()}")


Judged = tuple[bool, str, dict[str, Any]]


def judge_expectations(summary: dict[str, Any]) -> Judged:
    """(passed, reason, metadata) for the record's ``validation`` section."""
    total, failed = int(summary.get("expectations") or 0), int(summary.get("failed") or 0)
    passed = summary.get("success") is True and failed == 0 and total > 0
    if passed:
        reason = f"all {total} expectations of schema {summary.get('schema')} passed on {summary.get('rows')} rows"
    else:
        failures = list(summary.get("failures") or [])
        more = f" (and {failed - 3} more)" if failed > 3 else ""
        reason = (f"{failed} of {total} expectations of schema {summary.get('schema')} failed: "
                  f"{'; '.join(failures[:3])}{more}")
    return passed, reason, {"failed": failed, "expectations": total,
                            "table": dg.MetadataValue.md(str(summary.get("table") or ""))}


def judge_poisoning(screened: dict[str, Any]) -> Judged:
    """(passed, reason, metadata) for the record's ``poisoning`` section."""
    reference = str(screened.get("reference") or "")
    if screened.get("error") or not isinstance(screened.get("blocked"), bool):
        return False, str(screened.get("error") or "the stored record has no poisoning verdict"), \
            {"reference": reference}
    score, threshold = float(screened["drop_score"]), float(screened["threshold"])
    detectors: dict[str, Any] = dict(screened.get("detectors") or {})
    reasons = "; ".join(screened.get("reasons") or [])
    blocked = screened["blocked"] or score > threshold
    if blocked and score <= threshold:   # unguarded first version, no sign-off
        reason = reasons
    elif blocked:
        reason = f"drop score {score:.3g} is over the threshold {threshold:g}: {reasons}"
    else:
        name, worst = max(detectors.items(), key=lambda item: float(item[1].get("ratio") or 0),
                          default=("none", {"score": 0.0, "limit": 0.0}))
        reason = (f"drop score {score:.3g} is under the threshold {threshold:g} "
                  f"(highest: {name} {float(worst['score']):.3g} of limit {float(worst['limit']):g})")
    metadata: dict[str, Any] = {"drop_score": score, "threshold": threshold, "reference": reference,
                                "table": dg.MetadataValue.md(str(screened.get("table") or "")),
                                "detectors": dg.MetadataValue.json(detectors)}
    if screened.get("subsampled"):
        metadata["subsampled"] = str(screened["subsampled"])
    if (detectors.get("label_subgroups") or {}).get("worst_subgroup"):
        metadata["worst_subgroup"] = str(detectors["label_subgroups"]["worst_subgroup"])
    sign_off = (screened.get("first_version") or {}).get("sign_off")
    if sign_off:
        metadata["sign_off"] = dg.MetadataValue.json(sign_off)
    return not blocked, reason, metadata


def judge_pii(summary: dict[str, Any]) -> Judged:
    """(passed, reason, metadata) for the record's ``pii`` section (a malformed one raises BadInput)."""
    try:
        found = {(f["column"], f["kind"]): pii.Finding(**f) for f in summary.get("found") or []}
        unhandled = [found[(f["column"], f["kind"])] for f in summary.get("unhandled") or []]
    except (KeyError, TypeError):
        raise BadInput("the stored PII summary is malformed") from None
    handled = summary.get("handled") or []
    if unhandled:
        reason = ("unhandled PII: " + "; ".join(f.describe() for f in unhandled)
                  + ". Add a rule to pii.rules in validation.yaml (drop, hash or redact)")
    elif handled:
        reason = "all PII handled: " + "; ".join(f"{h['column']} ({h['kind']}) {h['action']}" for h in handled)
    else:
        reason = "no personal identifiers found"
    return not unhandled, reason, {
        "pii": dg.MetadataValue.json({k: v for k, v in summary.items() if k != "hmac_key_id"})}


def _judge_pii_closed(summary: dict[str, Any]) -> Judged:
    try:
        return judge_pii(summary)
    except Error as exc:
        return False, f"cannot judge the PII record: {exc.explain()}", {}


#: check name -> (record section, judge): one implementation, used by the checks and by a rejection.
JUDGES = {EXPECTATIONS: ("validation", judge_expectations), POISONING: ("poisoning", judge_poisoning),
          PII: ("pii", _judge_pii_closed)}


def _check(context: Any, custody: CustodyResource, name: str) -> dg.AssetCheckResult:
    part, judge = JUDGES[name]
    try:
        subject, section = _stored(context, custody, part)
        passed, reason, metadata = (judge_pii if name == PII else judge)(section)
    except Error as exc:
        return _unjudged(custody, context, name, exc)
    return verdict(custody, context, check=name, subject=subject, passed=passed, reason=reason, metadata=metadata)


@dg.asset_check(asset=validated_dataset, blocking=True,
                description="Every expectation of the dataset's schema (Great Expectations) holds, as stored with "
                            "the validated record.")
def expectations_pass(context: dg.AssetCheckExecutionContext, custody: CustodyResource) -> dg.AssetCheckResult:
    return _check(context, custody, EXPECTATIONS)


@dg.asset_check(asset=validated_dataset, blocking=True,
                description="The poisoning screen's drop score, as stored with the validated record, is under the "
                            "configured threshold (and a first version without a reference was signed off).")
def poisoning_below_limit(context: dg.AssetCheckExecutionContext,
                                    custody: CustodyResource) -> dg.AssetCheckResult:
    return _check(context, custody, POISONING)


@dg.asset_check(asset=validated_dataset, blocking=True,
                description="Every personal identifier found (as stored with the validated record) is dropped, "
                            "hashed or redacted by a rule.")
def no_unhandled_pii(context: dg.AssetCheckExecutionContext, custody: CustodyResource) -> dg.AssetCheckResult:
    return _check(context, custody, PII)


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
