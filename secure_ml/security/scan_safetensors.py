"""The safetensors header, checked without loading a tensor.

    findings = check_safetensors(path, "model.safetensors", config=config_json)
    header, problems = read_safetensors_header(path, SafetensorsLimits(max_header_bytes=1 << 20))

Size bounds, dtypes, shapes times dtype sizes against the offsets, offsets contiguous and
non-overlapping, no bytes after the last tensor, no duplicate keys, and the shapes against
``config.json`` where it names them (``training_chain.safetensors``: every recorded state's).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from secure_ml.security.scan_findings import Finding

# secure_ml.training.chain's file (the security stage does not import training)
CHAIN_FILE = "training_chain.safetensors"

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class SafetensorsLimits:
    max_header_bytes: int = 16 * 1024 * 1024
    max_tensors: int = 100_000
    allowed_dtypes: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            # Two readers may pick different duplicates: one file, two models.
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_safetensors_header(path: Path, limits: SafetensorsLimits = SafetensorsLimits()) -> tuple[dict[str, Any], list[str]]:
    """(tensor table, problems): the header is read and checked without reading tensor data."""
    with path.open("rb") as handle:
        return read_safetensors_header_from(handle, path.stat().st_size, limits)


def read_safetensors_header_from(handle: BinaryIO, size: int,
                                 limits: SafetensorsLimits = SafetensorsLimits()) -> tuple[dict[str, Any], list[str]]:
    """The same check over ``size`` bytes of an open reader (an archive member, a region of a file)."""
    problems: list[str] = []
    raw_len = handle.read(8)
    if len(raw_len) < 8:
        return {}, [f"file is {size} bytes: too short for a safetensors header"]
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > limits.max_header_bytes:
        return {}, [f"header claims {header_len} bytes (limit {limits.max_header_bytes})"]
    if 8 + header_len > size:
        return {}, [f"header claims {header_len} bytes but the file has only {size - 8} after the length"]
    raw = handle.read(header_len)
    try:
        text = raw.decode("utf-8")
        if not text.lstrip().startswith("{"):
            raise ValueError("header is not a JSON object")
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return {}, [f"header is not valid JSON: {str(exc)[:160]}"]
    if not isinstance(header, dict):
        return {}, ["header is not a JSON object"]
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        problems.append("__metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        return {}, [f"header lists {len(header)} tensors (limit {limits.max_tensors})"]
    data_len = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
            problems.append(f"tensor {name!r}: entry must hold only dtype, shape, data_offsets")
            continue
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in limits.allowed_dtypes or dtype not in DTYPE_BYTES:
            problems.append(f"tensor {name!r}: dtype {str(dtype)[:40]!r} is not allowed")
            continue
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            problems.append(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            problems.append(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
            continue
        numel = 1
        for dim in shape:
            numel *= dim
        expected = numel * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            problems.append(f"tensor {name!r}: {dtype}{shape} needs {expected} bytes but its offsets span "
                            f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            problems.append(f"tensor {name!r} overlaps the tensor before it (offset {begin} < {position})")
        elif begin > position:
            problems.append(f"unaccounted bytes {position}..{begin} before tensor {name!r}")
        position = max(position, end)
    if position > data_len:
        problems.append(f"tensors end at byte {position} of the data but the file holds only {data_len}")
    elif position < data_len:
        # Hidden payloads (an appended zip, a second model) live in bytes no tensor claims.
        problems.append(f"{data_len - position} trailing bytes after the last tensor")
    return header, problems


def _expected_shapes(config: Any) -> dict[str, list[int]]:
    """Tensor shapes a model config implies: an explicit ``tensors`` table ({name: shape} or
    {name: {"shape": ...}}), or the training stage's ``tabular-mlp`` (inputs, hidden, outputs):
    ``layers.{3i}`` Linear blocks (Linear, ReLU, Dropout) and a final Linear."""
    if not isinstance(config, dict):
        return {}
    if config.get("architecture") == "tabular-mlp" and "tensors" not in config:
        try:
            width, hidden, outputs = int(config["inputs"]), [int(h) for h in config["hidden"]], int(config["outputs"])
        except (KeyError, TypeError, ValueError):
            return {}
        shapes: dict[str, list[int]] = {}
        for index, size in enumerate([*hidden, outputs]):
            shapes[f"layers.{3 * index}.weight"] = [size, width]
            shapes[f"layers.{3 * index}.bias"] = [size]
            width = size
        return shapes
    table = config.get("tensors") or config.get("tensor_shapes") or {}
    shapes = {}
    if isinstance(table, dict):
        for name, value in table.items():
            shape = value.get("shape") if isinstance(value, dict) else value
            if isinstance(shape, list):
                shapes[str(name)] = shape
    return shapes


def _chain_shapes(names: list[str], weights: dict[str, list[int]]) -> dict[str, list[int]]:
    """Shapes the training chain (secure_ml.training.chain) implies: per recorded epoch
    ``NNNNNN.model.<weight>`` as in config.json, ``NNNNNN.optim.<i>.exp_avg`` / ``exp_avg_sq`` as
    the i-th weight, ``NNNNNN.optim.<i>.step`` a scalar. A tensor outside that layout gets no shape,
    so it is reported as not in config.json."""
    order = list(weights)
    shapes: dict[str, list[int]] = {}
    for name in names:
        epoch, _, rest = name.partition(".")
        if len(epoch) != 6 or not epoch.isdigit():
            continue
        for weight, shape in weights.items():
            shapes[f"{epoch}.model.{weight}"] = shape
        parts = rest.split(".")
        if len(parts) == 3 and parts[0] == "optim" and parts[1].isdigit() and int(parts[1]) < len(order):
            if parts[2] in ("exp_avg", "exp_avg_sq"):
                shapes[name] = weights[order[int(parts[1])]]
            elif parts[2] == "step":
                shapes[name] = []
    return shapes


def check_safetensors(path: Path, where: str, *, config: Any = None,
                      limits: SafetensorsLimits = SafetensorsLimits()) -> list[Finding]:
    header, problems = read_safetensors_header(path, limits)
    findings = [Finding("model", "high", where, "safetensors-header", f"invalid safetensors file: {p}")
                for p in problems]
    expected = _expected_shapes(config)
    if header and expected:
        actual = {name: info.get("shape") for name, info in header.items() if isinstance(info, dict)}
        if Path(where).name == CHAIN_FILE:  # the recorded training states: every one must fit config.json too
            expected = _chain_shapes(sorted(actual), expected)
        for name in sorted(set(expected) | set(actual)):
            if name not in actual:
                findings.append(Finding("model", "high", where, "safetensors-shape",
                                        f"config.json names tensor {name!r} but the weights do not hold it"))
            elif name not in expected:
                findings.append(Finding("model", "high", where, "safetensors-shape",
                                        f"tensor {name!r} is not in config.json"))
            elif list(actual[name]) != list(expected[name]):
                findings.append(Finding("model", "high", where, "safetensors-shape",
                                        f"tensor {name!r} has shape {actual[name]} but config.json says {expected[name]}"))
    return findings
