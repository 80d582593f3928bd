"""Fuzzing the parsers that take outside bytes (issue 15): nothing may escape but the project's errors.

Touches, with hypothesis (real code, no mocks): the CSV/Parquet drop reader (secure_ml.data.ingest),
the ciphertext header and chunk parser (secure_ml.custody.crypto: arbitrary bytes, and real
ciphertexts with bytes flipped, cut or inserted), the policy-input builder
(secure_ml.release.evidence: evaluation and scan reports of any shape) and the serving request
parser (secure_ml.release.serving.requests). Short runs here; ``FUZZ=1`` (``make fuzz``) runs 50x more.
Does not touch: the safetensors header or the model scanners (tests of secure_ml/security/scan*).
"""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from _release_fixtures import CATEGORICAL, NUMERIC
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_ml.custody import crypto
from secure_ml.custody.keys import EnvKeyProvider
from secure_ml.data import ingest
from secure_ml.errors import Error
from secure_ml.release import evidence, serving

EXAMPLES = 5000 if os.environ.get("FUZZ") else 100
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
KEYS = EnvKeyProvider({"SECURE_ML_KEK": base64.b64encode(b"k" * 32).decode()})
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
                    | st.integers(min_value=10**308, max_value=10**330),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=25)


def source(name: str, data: bytes) -> ingest.Source:
    return ingest.Source(name, f"/landing/{name}", "0" * 64, len(data), name.rsplit(".", 1)[-1],
                         "2026-11-30T00:00:00+00:00")


# -- the CSV/Parquet reader ---------------------------------------------------------------------------
CSV_CELL = st.one_of(st.text(max_size=8), st.integers().map(str), st.floats().map(str),
                     st.sampled_from(['"', '""', "\n", "\r", ",", "\x00", "NaN", ""]))


@FUZZ
@given(data=st.binary(max_size=400))
def test_any_bytes_as_csv_or_parquet(data: bytes) -> None:
    for name in ("drop.csv", "drop.parquet"):
        try:
            ingest.parse_drop(data, source(name, data))
        except Error:
            pass


@FUZZ
@given(header=st.lists(st.text(min_size=0, max_size=6), min_size=1, max_size=5),
       rows=st.lists(st.lists(CSV_CELL, max_size=6), max_size=8))
def test_csv_like_text(header: list[str], rows: list[list[str]]) -> None:
    data = "\n".join(",".join(cells) for cells in [header, *rows]).encode("utf-8", "surrogatepass")
    try:
        frame = ingest.parse_drop(data, source("drop.csv", data))
    except Error:
        return
    assert len(frame.columns) >= 1


@FUZZ
@given(columns=st.dictionaries(st.text(min_size=1, max_size=6),
                               st.lists(st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=5),
                                                  st.none()), min_size=3, max_size=3), min_size=1, max_size=4),
       cut=st.integers(0, 64))
def test_parquet_tables_and_truncations(columns: dict[str, list[Any]], cut: int) -> None:
    table_columns = {}
    for name, values in columns.items():
        try:
            table_columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            table_columns[name] = pa.array([str(v) for v in values])
    buffer = io.BytesIO()
    pq.write_table(pa.table(table_columns), buffer)
    data = buffer.getvalue()
    for candidate in (data, data[: len(data) - cut]):
        try:
            ingest.parse_drop(candidate, source("drop.parquet", candidate))
        except Error:
            pass


# -- the ciphertext header and chunk parser ---------------------------------------------------------
def sealed(plaintext: bytes, chunk_size: int) -> bytes:
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(plaintext), out, KEYS, chunk_size=chunk_size)
    return out.getvalue()


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_as_ciphertext(data: bytes) -> None:
    for candidate in (data, crypto.MAGIC + data):
        try:
            crypto.decrypt_stream(io.BytesIO(candidate), io.BytesIO(), KEYS)
        except Error:
            pass
        try:
            crypto.read_header(io.BytesIO(candidate))
        except Error:
            pass


@FUZZ
@given(plaintext=st.binary(max_size=200), chunk_size=st.sampled_from([16, 64, 1024]),
       edits=st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]), st.integers(0, 10**6),
                                st.integers(0, 255)), min_size=1, max_size=3))
def test_edited_ciphertext_fails_or_is_unchanged(plaintext: bytes, chunk_size: int,
                                                 edits: list[tuple[str, int, int]]) -> None:
    original = sealed(plaintext, chunk_size)
    data = bytearray(original)
    for kind, where, value in edits:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= value or 1
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = bytes([value])
        elif kind == "delete" and at < len(data):
            del data[at]
    out = io.BytesIO()
    try:
        crypto.decrypt_stream(io.BytesIO(bytes(data)), out, KEYS)
    except Error:
        return
    # Accepted only if the bytes are (authentically) the ones sealed: never a partial or altered plaintext.
    assert out.getvalue() == plaintext


# -- the policy-input builder --------------------------------------------------------------------------
@FUZZ
@given(report=JSON)
def test_evaluation_and_scan_reports_of_any_shape(report: Any) -> None:
    for value in (report, {"metrics": report, "fairness": report, "robustness": report, "passed": report},
                  {"findings": report, "counts": report, "blocking": report}):
        if not isinstance(value, dict):
            continue
        try:
            built = [evidence.evaluation_evidence(value), evidence.scan_evidence(value)]
        except Error:
            continue
        json.dumps(built, allow_nan=True)   # what goes to the policy is plain JSON


# -- the serving request parser ------------------------------------------------------------------------
SPEC = serving.FeatureSpec({n: v for n, v in NUMERIC.items()}, {n: tuple(c) for n, c in CATEGORICAL.items()},
                           (*NUMERIC, *CATEGORICAL))


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps({"instances": v}).encode()),
                      JSON.map(lambda v: json.dumps({"instances": [v]}).encode())))
def test_the_request_parser(data: bytes) -> None:
    try:
        rows = serving.parse_instances(data, SPEC, max_batch=8)
    except serving.RequestError as exc:
        assert exc.status in (400, 413, 422) and "\n" not in str(exc)
        return
    assert 1 <= len(rows) <= 8 and all(set(row) == set(SPEC.order) for row in rows)


V2_TYPES = {"age": "INT64", "credit_amount": "FP64", "sex": "BYTES", "purpose": "BYTES"}
V2_TENSOR = st.fixed_dictionaries({"name": st.sampled_from([*V2_TYPES, "x"]),
                                   "datatype": st.sampled_from(["INT64", "FP64", "BYTES", "FP32", "BOOL"]),
                                   "shape": st.lists(st.integers(-1, 3), max_size=3), "data": JSON})


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps({"inputs": v}).encode()),
                      st.lists(V2_TENSOR, max_size=5).map(lambda v: json.dumps({"inputs": v}).encode())))
def test_the_v2_request_parser(data: bytes) -> None:
    try:
        request = serving.parse_v2_infer(data, SPEC, max_batch=8)
    except serving.RequestError as exc:
        assert exc.status in (400, 413, 422) and "\n" not in str(exc)
        return
    assert 1 <= len(request.rows) <= 8 and all(set(row) == set(SPEC.order) for row in request.rows)
