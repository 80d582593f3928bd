"""Property-based fuzzing of the parsers we own: the safetensors header, the pickle walker, the
archive unpacker and format checks behind the foreign scan. Nothing may escape but secure_ml's
own errors, and the foreign scan itself never raises: whatever it cannot read is a finding.

Touches: our parsers over bytes hypothesis makes (random, and real files with bytes flipped,
cut or appended). Does not touch: third-party scanners (external=False), the network.
Short runs here; `make fuzz` runs the long profile (SECURE_ML_FUZZ_PROFILE=long).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_ml.errors import Error
from secure_ml.security.scan_archive import Blob
from secure_ml.security.scan_findings import SEVERITIES
from secure_ml.security.scan_formats import check_gguf, check_onnx, identify
from secure_ml.security.scan_foreign import scan_foreign_file
from secure_ml.security.scan_pickle import walk_pickle
from secure_ml.security.scan_safetensors import read_safetensors_header_from
from tests import scan_corpus

settings.register_profile("quick", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("medium", max_examples=1_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("SECURE_ML_FUZZ_PROFILE", "quick"))

SEEDS = [
    scan_corpus.proto0_global(), scan_corpus.proto2_global(), scan_corpus.proto4_stack_global(),
    scan_corpus.memo_stack_global(), scan_corpus.inst_opcode(), scan_corpus.benign_pickle(),
    scan_corpus.torch_zip(scan_corpus.proto2_global()), scan_corpus.tar_of({"a.pkl": scan_corpus.proto0_global()}),
    scan_corpus.object_npy(scan_corpus.proto2_global()), scan_corpus.onnx_model("w.bin"),
    scan_corpus.gguf(scan_corpus.BENIGN_TEMPLATE), scan_corpus.keras_zip([scan_corpus.dense()]),
    scan_corpus.zip_of({"x.npy": scan_corpus.npy_header("<f4", (2,)) + b"\0" * 8}),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real file with bytes flipped, a cut, or junk appended; gzip/xz/bz2 wrappers too."""
    import bz2
    import gzip
    import lzma

    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    data += draw(st.binary(max_size=32))
    wrap = draw(st.sampled_from([None, gzip.compress, bz2.compress, lzma.compress]))
    return wrap(bytes(data)) if wrap else bytes(data)


def scan_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "file"
        path.write_bytes(data)
        findings = scan_foreign_file(path, external=False)
    assert all(f.severity in SEVERITIES for f in findings)
    # The scan blocks on any reader's crash (fail closed), but our readers must only raise our errors.
    assert [f.why for f in findings if f.rule == "scanner-error"] == []


@given(st.one_of(st.binary(max_size=2048), mutated()))
def test_foreign_scan_never_raises(data: bytes) -> None:
    scan_bytes(data)


@given(st.one_of(st.binary(max_size=512), mutated()))
def test_pickle_walker_raises_only_our_errors(data: bytes) -> None:
    try:
        stream = walk_pickle(data)
    except Error:
        return
    assert 0 <= stream.start < stream.end <= len(data)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
tensor_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I64", "U8", "BOOL", "X9"]) | json_values,
    "shape": st.lists(st.integers(-2, 8), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 64), min_size=2, max_size=2) | json_values,
})


@given(st.dictionaries(st.text(max_size=6), tensor_entries | json_values, max_size=5), st.binary(max_size=128),
       st.integers(-4, 4))
def test_safetensors_header_parser_returns_problems_never_raises(header: dict[str, object], tail: bytes,
                                                                  skew: int) -> None:
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", max(0, len(raw) + skew)) + raw + tail
    table, problems = read_safetensors_header_from(io.BytesIO(data), len(data))
    assert isinstance(table, dict) and all(isinstance(p, str) for p in problems)


@given(st.binary(max_size=1024))
def test_safetensors_header_parser_on_raw_bytes(data: bytes) -> None:
    table, problems = read_safetensors_header_from(io.BytesIO(data), len(data))
    assert isinstance(table, dict) and isinstance(problems, list)


@given(st.one_of(st.binary(max_size=512), mutated()))
def test_format_checks_raise_only_our_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(data)
        blob = Blob.of_file(path)
        identify(blob)
        for check in (check_onnx, check_gguf):
            try:
                check(blob)
            except Error:
                pass
