"""Schema and quality validation with Great Expectations 1.x, from a per-dataset schema file.

    schema = load_schema(path)
    result = validate(frame, schema)                 # a GE suite built from the schema, run in memory
    result.success, result.failures                 # what failed, in words
    result.markdown()                               # a table of expectations and failures (Dagster UI)

    suite = build_suite(schema)                     # the gx.ExpectationSuite itself, to inspect or export

The suite checks, per the schema: the exact column set (plus ``extra_columns`` the caller allows,
e.g. pseudonymised PII), the row-count bounds, and for each column its dtype, nulls, numeric range
and allowed categories. Great Expectations runs in an ephemeral context (nothing written to disk)
with its analytics switched off before it is imported; the context is built once per process.

Values quoted from the data (GE's unexpected examples) pass through ``redact`` first, so a failure
table never carries an e-mail address or a card number into the UI or the audit log.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from secure_ml.data import deferred_imports
from secure_ml.data.schema import Schema

# No telemetry: GE reads this when it is first imported.
os.environ["GX_ANALYTICS_ENABLED"] = "false"

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}
MAX_EXAMPLES = 5


@dataclass
class ExpectationOutcome:
    expectation: str
    column: str
    passed: bool
    observed: str
    unexpected: int | None = None
    examples: list[str] = field(default_factory=list)
    error: str = ""

    def describe(self) -> str:
        """One line for a failure: what was expected of which column, and what was found."""
        what = self.expectation.removeprefix("expect_").replace("_", " ")
        where = f"column {self.column!r}: " if self.column else ""
        if self.error:
            return f"{where}{what}: could not be evaluated ({self.error})"
        found = f"{self.unexpected} unexpected values" if self.unexpected else f"observed {self.observed}"
        sample = f" e.g. {', '.join(self.examples[:3])}" if self.examples else ""
        return f"{where}{what}: {found}{sample}"


@dataclass
class ValidationResult:
    outcomes: list[ExpectationOutcome]
    rows: int

    @property
    def success(self) -> bool:
        return all(o.passed for o in self.outcomes)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.passed]

    def summary(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "expectations": len(self.outcomes),
            "passed": len(self.outcomes) - len(self.failures),
            "failed": len(self.failures),
            "failures": [o.describe() for o in self.failures[:20]],
        }

    def markdown(self, *, limit: int = 200) -> str:
        """Failures first, then the rest: a table a person can read in the Dagster UI."""
        ordered = self.failures + [o for o in self.outcomes if o.passed]
        lines = [
            f"**{len(self.outcomes) - len(self.failures)} of {len(self.outcomes)} expectations passed** "
            f"on {self.rows} rows.",
            "",
            "| result | expectation | column | observed | unexpected | examples |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for o in ordered[:limit]:
            examples = ", ".join(o.examples) if o.examples else ""
            observed = o.error and f"error: {o.error}" or o.observed
            lines.append("| " + " | ".join(_cell(v) for v in (
                "PASS" if o.passed else "**FAIL**", o.expectation, o.column or "(table)", observed,
                "" if o.unexpected is None else str(o.unexpected), examples)) + " |")
        if len(ordered) > limit:
            lines.append(f"| … | {len(ordered) - limit} more | | | | |")
        return "\n".join(lines)


def _cell(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:120]


def _gx() -> dict[str, Any]:
    """Great Expectations, its ephemeral context and our dtype expectation; built once per process."""
    with _LOCK:
        if _STATE:
            return _STATE
        deferred_imports.defer_iri_grammar()  # a third of GE's import, for a check GE never makes
        deferred_imports.defer_modules(deferred_imports.GE_UNUSED)  # altair: charts we never draw
        # The import builds ~300k objects that live as long as the process: collecting during it only
        # costs time. (Not gc.freeze() afterwards: it would also pin the drop's frame if it ever became
        # cyclic garbage.)
        collecting = gc.isenabled()
        gc.disable()
        try:
            import great_expectations as gx
            import great_expectations.expectations as gxe
            from great_expectations.data_context.types.base import ProgressBarsConfig
        finally:
            if collecting:
                gc.enable()

        class ExpectColumnDtypeInList(gxe.ExpectColumnValuesToBeInTypeList):  # type: ignore[misc]
            """The column's pandas dtype name is one of ``type_list``.

            GE 1.24's own type check compares numpy type objects and does not recognise pandas 3's
            ``str`` dtype; comparing dtype names is exact and works for every pandas dtype.
            """

            def _validate_pandas(self, actual_column_type: Any, expected_types_list: Any) -> dict[str, Any]:
                name = str(actual_column_type)
                passed = expected_types_list is None or name in expected_types_list
                return {"success": passed, "result": {"observed_value": name}}

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        datasource = context.data_sources.add_pandas("secure_ml_drops")
        asset = datasource.add_dataframe_asset("drop")
        _STATE.update(gx=gx, gxe=gxe, dtype=ExpectColumnDtypeInList, context=context,
                      batch_definition=asset.add_batch_definition_whole_dataframe("whole"))
        return _STATE


def build_suite(schema: Schema, *, extra_columns: Sequence[str] = (), name: str = "") -> Any:
    """The gx.ExpectationSuite for ``schema`` (``extra_columns`` are allowed beside its columns)."""
    state = _gx()
    gx, gxe, dtype = state["gx"], state["gxe"], state["dtype"]
    expectations: list[Any] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[*schema.columns, *extra_columns], exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=schema.min_rows, max_value=schema.max_rows),
    ]
    for column in schema.columns.values():
        expectations.append(dtype(column=column.name, type_list=list(column.dtypes)))
        if not column.nullable:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column.name))
        if column.min is not None or column.max is not None:
            expectations.append(gxe.ExpectColumnValuesToBeBetween(
                column=column.name, min_value=column.min, max_value=column.max))
        if column.allowed is not None:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(column=column.name, value_set=list(column.allowed)))
    return gx.ExpectationSuite(name=name or f"{schema.dataset}-schema", expectations=expectations)


def validate(frame: pd.DataFrame, schema: Schema, *, extra_columns: Sequence[str] = (),
             redact: Callable[[str], str] | None = None) -> ValidationResult:
    """Run the schema's suite on ``frame``; never raises for bad data, only reports it."""
    state = _gx()
    suite = build_suite(schema, extra_columns=extra_columns)
    batch = state["batch_definition"].get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES})
    redact = redact or (lambda text: text)
    present = {str(c) for c in frame.columns}
    outcomes = [_outcome(r, redact, present) for r in result.results]
    return ValidationResult(outcomes=outcomes, rows=len(frame))


def _exception(info: Any) -> str:
    """GE reports exceptions either flat or keyed by metric; the first message, one line."""
    if not isinstance(info, dict):
        return ""
    if "raised_exception" in info:
        if not info.get("raised_exception"):
            return ""
        return (str(info.get("exception_message") or "exception").strip().splitlines() or ["exception"])[0][:160]
    for value in info.values():
        found = _exception(value)
        if found:
            return found
    return ""


def _outcome(result: Any, redact: Callable[[str], str], present: set[str]) -> ExpectationOutcome:
    config = result.expectation_config
    details = dict(result.result or {})
    column = str(config.kwargs.get("column") or "")
    error = _exception(result.exception_info)
    if column and column not in present:
        error = "the column is missing"
    observed = details.get("observed_value")
    mismatched = (details.get("details") or {}).get("mismatched") if isinstance(details.get("details"), dict) else None
    if mismatched:
        observed = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in mismatched.items() if v)
    elif isinstance(observed, list):
        observed = ", ".join(map(str, observed))
    if observed is None and "unexpected_percent" in details:
        observed = f"{details['unexpected_percent']:.3g}% unexpected"
    examples = [redact(str(v))[:40] for v in (details.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]]
    return ExpectationOutcome(
        expectation=config.type,
        column=column,
        passed=bool(result.success),
        observed="" if observed is None else redact(str(observed))[:200],
        unexpected=details.get("unexpected_count"),
        examples=examples,
        error=redact(error) if not result.success else "",
    )
