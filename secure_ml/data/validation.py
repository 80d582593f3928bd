"""Schema and quality validation with Great Expectations 1.x, from a per-dataset schema file.

    schema = load_schema(path)
    result = validate(frame, schema)                 # a GE suite built from the schema, run in memory
    result.success, result.failures                 # what failed, in words
    result.markdown()                               # a table of expectations and failures (Dagster UI)

    suite = build_suite(schema)                     # the gx.ExpectationSuite itself, to inspect or export
    warm()                                          # a worker process imports GE now; validate() hands it the job

The suite checks, per the schema: the exact column set (plus ``extra_columns`` the caller allows,
e.g. pseudonymised PII), the row-count bounds, and for each column its dtype, nulls, numeric range
and allowed categories. Great Expectations runs in an ephemeral context (nothing written to disk)
with its analytics switched off before it is imported; the context is built once per process.

Values quoted from the data (GE's unexpected examples) pass through ``redact`` first, so a failure
table never carries an e-mail address or a card number into the UI or the audit log.

Importing Great Expectations costs seconds of CPU, more than validating a small drop. A process that
knows it will validate soon (``secure-ml pipeline run`` before its ingest run) calls :func:`warm`: a
worker process (this interpreter, isolated mode, an environment of PATH and locale only, so no secret)
imports GE while the caller does other work, on the other core. :func:`validate` hands the next job
to it: the suite as data (:func:`suite_spec`) and the frame as an Arrow IPC stream; the worker runs
the same suite with the same code and sends back the raw outcomes, which are redacted and cut here,
as in-process ones are. A frame the Arrow round trip would not give back with the same columns and
dtypes, one over ``WORKER_MAX_CELLS`` (the copy would cost more than the import), or a worker that
fails, is validated in this process instead: the result never depends on where it ran.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from secure_ml.data import deferred_imports
from secure_ml.data.schema import Schema

# No telemetry: GE reads this when it is first imported.
os.environ["GX_ANALYTICS_ENABLED"] = "false"

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}
MAX_EXAMPLES = 5
#: rows x columns a warm worker is sent; a larger frame is validated in the caller's process.
WORKER_MAX_CELLS = 5_000_000
WORKER_TIMEOUT_S = 600.0
CODE_ROOT = Path(__file__).resolve().parents[2]
_HEADER = struct.Struct(">Q")


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
    #: where the suite ran: "worker" (a warm worker process) or "in-process"
    ran: str = "in-process"

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


def suite_spec(schema: Schema, *, extra_columns: Sequence[str] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The suite for ``schema`` as data: (expectation, keyword arguments) pairs, ``dtype`` for ours."""
    spec: list[tuple[str, dict[str, Any]]] = [
        ("ExpectTableColumnsToMatchSet", {"column_set": [*schema.columns, *extra_columns], "exact_match": True}),
        ("ExpectTableRowCountToBeBetween", {"min_value": schema.min_rows, "max_value": schema.max_rows}),
    ]
    for column in schema.columns.values():
        spec.append(("dtype", {"column": column.name, "type_list": list(column.dtypes)}))
        if not column.nullable:
            spec.append(("ExpectColumnValuesToNotBeNull", {"column": column.name}))
        if column.min is not None or column.max is not None:
            spec.append(("ExpectColumnValuesToBeBetween",
                         {"column": column.name, "min_value": column.min, "max_value": column.max}))
        if column.allowed is not None:
            spec.append(("ExpectColumnValuesToBeInSet", {"column": column.name, "value_set": list(column.allowed)}))
    return spec


def build_suite(schema: Schema, *, extra_columns: Sequence[str] = (), name: str = "") -> Any:
    """The gx.ExpectationSuite for ``schema`` (``extra_columns`` are allowed beside its columns)."""
    return _suite(suite_spec(schema, extra_columns=extra_columns), name or f"{schema.dataset}-schema")


def _suite(spec: Sequence[tuple[str, dict[str, Any]]], name: str) -> Any:
    state = _gx()
    gxe = state["gxe"]
    return state["gx"].ExpectationSuite(name=name, expectations=[
        state["dtype"](**kwargs) if kind == "dtype" else getattr(gxe, kind)(**kwargs) for kind, kwargs in spec])


def validate(frame: pd.DataFrame, schema: Schema, *, extra_columns: Sequence[str] = (),
             redact: Callable[[str], str] | None = None) -> ValidationResult:
    """Run the schema's suite on ``frame`` (in a warm worker, else here); never raises for bad data, only
    reports it."""
    return submit(frame, schema, extra_columns=extra_columns).result(redact)


def submit(frame: pd.DataFrame, schema: Schema, *, extra_columns: Sequence[str] = ()) -> Pending:
    """Hand the suite to the warm worker, if there is one that can take ``frame``, and return at once:
    the caller does other work while the worker validates; :meth:`Pending.result` gives the result (run
    here, then, where no worker took the job). The frame must not change until then."""
    return Pending(frame, suite_spec(schema, extra_columns=extra_columns), f"{schema.dataset}-schema")


class Pending:
    """A validation under way in the worker, or to be run here when its result is asked for."""

    def __init__(self, frame: pd.DataFrame, spec: list[tuple[str, dict[str, Any]]], name: str) -> None:
        self._frame, self._spec, self._name = frame, spec, name
        self._raw: list[ExpectationOutcome] | None = None
        self._ran = "worker"
        self._thread: threading.Thread | None = None
        job = _worker_job(frame, spec, name)
        if job is not None:
            self._thread = threading.Thread(target=self._ask, args=job, name="secure-ml-validation", daemon=True)
            self._thread.start()

    def _ask(self, worker: subprocess.Popen[bytes], message: bytes) -> None:
        self._raw = _answer(worker, message)

    def result(self, redact: Callable[[str], str] | None = None) -> ValidationResult:
        """The outcomes, every value quoted from the data passed through ``redact`` and cut."""
        if self._thread is not None:
            self._thread.join()
        if self._raw is None:
            self._raw, self._ran = _run_suite(self._frame, self._spec, self._name), "in-process"
        redact = redact or (lambda text: text)
        return ValidationResult(outcomes=[_finish(o, redact) for o in self._raw], rows=len(self._frame), ran=self._ran)


def _run_suite(frame: pd.DataFrame, spec: Sequence[tuple[str, dict[str, Any]]], name: str) -> list[ExpectationOutcome]:
    """The suite on ``frame``, in this process: raw outcomes (nothing redacted or cut yet)."""
    state = _gx()
    batch = state["batch_definition"].get_batch(batch_parameters={"dataframe": frame})
    try:
        result = batch.validate(_suite(spec, name),
                                result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES})
    finally:
        _forget(batch)
    present = {str(c) for c in frame.columns}
    return [_outcome(r, present) for r in result.results]


def _forget(batch: Any) -> None:
    """GE's execution engine keeps every batch it loaded, and so the frame, for the life of the process
    (10M rows: over a gigabyte through training): let it go once validated."""
    with contextlib.suppress(AttributeError):
        manager = batch.data.execution_engine.batch_manager
        manager.batch_data_cache.clear()
        manager.reset_batch_cache()


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


def _outcome(result: Any, present: set[str]) -> ExpectationOutcome:
    """One GE result as an outcome, raw: values quoted from the data are neither redacted nor cut."""
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
    unexpected = details.get("unexpected_count")
    return ExpectationOutcome(
        expectation=str(config.type),
        column=column,
        passed=bool(result.success),
        observed="" if observed is None else str(observed),
        unexpected=None if unexpected is None else int(unexpected),
        examples=[str(v) for v in (details.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]],
        error=error if not result.success else "",
    )


def _finish(outcome: ExpectationOutcome, redact: Callable[[str], str]) -> ExpectationOutcome:
    """What leaves validation: every value quoted from the data redacted first, then cut."""
    return replace(outcome, observed=redact(outcome.observed)[:200],
                   examples=[redact(v)[:40] for v in outcome.examples], error=redact(outcome.error))


# -- the warm worker -------------------------------------------------------------------------------
_WORKER: list[subprocess.Popen[bytes]] = []
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from secure_ml.data.validation import serve; serve()"


def warm() -> None:
    """Start a worker process that imports Great Expectations now; the next :func:`validate` in this
    process hands it its job (one job per worker). Idempotent; a worker nobody used ends with this process."""
    with _LOCK:
        for dead in [w for w in _WORKER if w.poll() is not None]:  # one that died waiting is replaced
            _WORKER.remove(dead)
        if _WORKER or _STATE:  # one is waiting, or GE is loaded here already
            return
        environ = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL", "TZ") if name in os.environ}
        _WORKER.append(subprocess.Popen(  # noqa: S603 - our interpreter, our module, no shell
            [sys.executable, "-I", "-c", _BOOT, str(CODE_ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env={**environ, "GX_ANALYTICS_ENABLED": "false"}, cwd=CODE_ROOT))


def _claim() -> subprocess.Popen[bytes] | None:
    with _LOCK:
        return _WORKER.pop() if _WORKER else None


def _end(worker: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        worker.kill()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        worker.communicate(timeout=5)


def discard_worker() -> None:
    """End the waiting worker, if any (a run that will not validate after all)."""
    worker = _claim()
    if worker is not None:
        _end(worker)


atexit.register(discard_worker)


def _worker_job(frame: pd.DataFrame, spec: Sequence[tuple[str, dict[str, Any]]],
                name: str) -> tuple[subprocess.Popen[bytes], bytes] | None:
    """The warm worker (claimed) and its job's bytes; None where there is none, or it cannot take this frame."""
    if frame.shape[0] * max(frame.shape[1], 1) > WORKER_MAX_CELLS:
        discard_worker()  # GE is loaded here now: a waiting worker would only hold memory
        return None
    worker = _claim()
    if worker is None:
        return None
    try:
        payload = _arrow(frame)
        header = json.dumps({"spec": spec, "name": name, "columns": [str(c) for c in frame.columns],
                             "dtypes": [str(t) for t in frame.dtypes]}).encode()
    except (TypeError, ValueError):
        payload = None
    if payload is None:
        _end(worker)
        return None
    return worker, _HEADER.pack(len(header)) + header + payload


def _answer(worker: subprocess.Popen[bytes], message: bytes) -> list[ExpectationOutcome] | None:
    """Send the job, wait for the raw outcomes; None where the worker refused it, failed or timed out."""
    try:
        out, _ = worker.communicate(message, timeout=WORKER_TIMEOUT_S)
        answer = json.loads(out) if worker.returncode == 0 and out else {}
        if "outcomes" not in answer:
            return None
        return [ExpectationOutcome(**o) for o in answer["outcomes"]]
    except (OSError, ValueError, TypeError, subprocess.SubprocessError):
        return None
    finally:
        _end(worker)


def _arrow(frame: pd.DataFrame) -> bytes | None:
    """``frame`` as an Arrow IPC stream (index kept); None where Arrow cannot represent it."""
    import pyarrow as pa

    try:
        table = pa.Table.from_pandas(frame, preserve_index=True)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def serve() -> None:
    """The worker: import GE, then take one job from stdin and answer on stdout (JSON). A frame that did
    not arrive with the caller's columns and dtypes is answered ``{"refused": ...}``: the caller then
    validates it itself."""
    _gx()
    stdin = sys.stdin.buffer
    size = _HEADER.unpack(stdin.read(_HEADER.size))[0]
    job = json.loads(stdin.read(size))
    import pyarrow as pa

    frame = pa.ipc.open_stream(stdin.read()).read_all().to_pandas()
    if [str(c) for c in frame.columns] != job["columns"] or [str(t) for t in frame.dtypes] != job["dtypes"]:
        answer: dict[str, Any] = {"refused": "the frame's columns or dtypes changed in transit"}
    else:
        answer = {"outcomes": [asdict(o) for o in _run_suite(frame, [tuple(x) for x in job["spec"]], job["name"])]}
    sys.stdout.buffer.write(json.dumps(answer).encode())
    sys.stdout.buffer.flush()
