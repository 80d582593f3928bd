"""Model formats other than pickle, recognised by their bytes and checked for what runs code on load.

    kind = identify(blob)                      # "npy" | "hdf5" | "gguf" | "safetensors" | "onnx" | "json" | "text" | None
    problems, pickle_at = check_npy(blob)      # an object array's pickle starts at pickle_at
    problems = keras_config_problems(config)   # Lambda layers, custom objects (.keras config.json, .h5 model_config)
    problems = check_hdf5(blob)                # a Keras .h5: its model_config
    problems = check_onnx(blob)                # external-data paths that leave the model's folder
    problems = check_gguf(blob)                # a chat template that reaches Python internals

Each check returns what blocks, in words, and raises UnreadableFormat (a BadInput) when the bytes
claim a format they do not hold: a file nothing can read blocks.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from secure_ml.errors import BadInput
from secure_ml.security.scan_archive import Blob

MAX_IN_MEMORY = 256 << 20   # JSON, ONNX protobuf: read whole, so bounded
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class UnreadableFormat(BadInput):
    """Bytes that claim a format (by magic) but cannot be read as it."""


def identify(blob: Blob) -> str | None:
    head = blob.head(4096)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(_HDF5_MAGIC) or _hdf5_superblock_at(blob) is not None:
        return "hdf5"
    if head.startswith(b"GGUF"):
        return "gguf"
    if len(head) >= 10 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= blob.length - 8:
        return "safetensors"
    if head[:1] == b"\x08" and blob.length <= MAX_IN_MEMORY and _onnx_model(blob.read()) is not None:
        return "onnx"
    if b"\0" not in head:
        whole = blob.length <= MAX_IN_MEMORY
        try:
            text = (blob.read() if whole else head).decode("utf-8")
        except UnicodeDecodeError as exc:
            if whole or exc.start < len(head) - 3:
                return None
            text = head[:exc.start].decode("utf-8")  # a large file's head may cut a character in two
        if whole and text.lstrip()[:1] in ("{", "["):
            try:
                json.loads(text)
                return "json"
            except (ValueError, RecursionError):
                pass
        return "text"
    return None


def _hdf5_superblock_at(blob: Blob) -> int | None:
    # HDF5 looks for its superblock at 0, 512, 1024, 2048, ... (a user block may come first).
    offset = 512
    while offset + 8 <= min(blob.length, 1 << 20):
        with blob.open() as region:
            region.seek(offset)
            if region.read(8) == _HDF5_MAGIC:
                return offset
        offset *= 2
    return None


# -- numpy --------------------------------------------------------------------------------------
def check_npy(blob: Blob) -> tuple[list[str], int | None]:
    """(problems, offset of an object array's pickle): the header is parsed by numpy, never run."""
    import numpy as np
    from numpy.lib import format as npformat

    with blob.open() as region:
        try:
            version = npformat.read_magic(region)
            if version == (1, 0):
                shape, _fortran, dtype = npformat.read_array_header_1_0(region)
            elif version == (2, 0):
                shape, _fortran, dtype = npformat.read_array_header_2_0(region)
            else:
                shape, _fortran, dtype = npformat._read_array_header(region, version)  # noqa: SLF001 - v3
        except Exception as exc:  # noqa: BLE001 - numpy's complaint about a bad header, whatever its type
            raise UnreadableFormat(f"{blob.where}: not a readable .npy header ({str(exc)[:160]})") from None
        data_at = region.tell()
    if dtype.hasobject:
        return [], data_at  # an object array is a pickle: the caller walks it
    needed = int(np.prod(shape, dtype=np.uint64)) * dtype.itemsize if shape else dtype.itemsize
    if needed > blob.length - data_at:
        raise UnreadableFormat(f"{blob.where}: .npy header promises {needed} bytes but {blob.length - data_at} follow")
    return [], None


# -- Keras ---------------------------------------------------------------------------------------
_KERAS_MODULES = ("keras", "keras.", "tf_keras", "tensorflow.keras", "keras_core", "keras_nlp", "keras_hub")
_KERAS2_LAYERS = frozenset({
    "InputLayer", "Dense", "Dropout", "Flatten", "Reshape", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU",
    "Softmax", "Conv1D", "Conv2D", "Conv3D", "Conv2DTranspose", "SeparableConv2D", "DepthwiseConv2D",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
    "BatchNormalization", "LayerNormalization", "Embedding", "LSTM", "GRU", "SimpleRNN", "Bidirectional",
    "TimeDistributed", "Add", "Concatenate", "Multiply", "Average", "Subtract", "Dot", "Maximum", "Minimum",
    "ZeroPadding2D", "UpSampling2D", "Cropping2D", "RepeatVector", "Permute", "Masking", "GaussianNoise",
    "SpatialDropout1D", "SpatialDropout2D", "MultiHeadAttention", "Attention", "Sequential", "Functional", "Model",
    "GlorotUniform", "Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "HeUniform", "HeNormal",
    "Orthogonal", "GlorotNormal", "TruncatedNormal", "L1", "L2", "L1L2", "VarianceScaling", "Adam", "SGD",
    "RMSprop", "DTypePolicy", "Policy", "InputSpec", "Normalization", "Rescaling",
})


def keras_config_problems(config: Any) -> list[str]:
    """Lambda layers (marshalled Python bytecode) and custom objects (code outside Keras)."""
    problems: list[str] = []
    for node in _dicts(config):
        class_name = node.get("class_name")
        if not isinstance(class_name, str):
            continue
        name = (node.get("config") or {}).get("name", "") if isinstance(node.get("config"), dict) else ""
        label = f"{class_name} {name!r}" if name else class_name
        if class_name in ("Lambda", "__lambda__", "TFOpLambda") or "function_type" in (node.get("config") or {}):
            problems.append(f"Keras {label}: a Lambda layer runs Python code stored in the model")
        elif isinstance(node.get("module"), str) and not node["module"].startswith(_KERAS_MODULES):
            problems.append(f"Keras {label}: custom object from module {node['module']!r} (code outside Keras)")
        elif isinstance(node.get("registered_name"), str) and ">" in node["registered_name"]:
            problems.append(f"Keras {label}: custom object {node['registered_name']!r} (code outside Keras)")
        elif "module" not in node and class_name not in _KERAS2_LAYERS and "config" in node:
            problems.append(f"Keras {label}: not a known Keras class (a custom object needs code outside Keras)")
    return problems


def _dicts(value: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    if depth > 200:
        raise UnreadableFormat("Keras config nested more than 200 levels")
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _dicts(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _dicts(item, depth + 1)


def check_hdf5(blob: Blob) -> list[str]:
    """A Keras .h5 model keeps its architecture as JSON in the root's ``model_config`` attribute."""
    import h5py

    try:
        with blob.open() as region, h5py.File(region, "r") as h5:
            raw = h5.attrs.get("model_config")
            if raw is None:
                return []  # weights only: no architecture, nothing that runs
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            config = json.loads(text)
    except UnreadableFormat:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py's and json's complaints alike: cannot be read
        raise UnreadableFormat(f"{blob.where}: HDF5 file cannot be read ({str(exc)[:160]})") from None
    return keras_config_problems(config)


# -- ONNX: protobuf wire format, just the fields that name external data -------------------------
def _varint(data: bytes, index: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if index >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[index]
        index += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, index
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    fields, index = [], 0
    while index < len(data):
        key, index = _varint(data, index)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, index = _varint(data, index)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if index + width > len(data):
                raise ValueError("truncated fixed field")
            value, index = data[index:index + width], index + width
        elif wire == 2:
            size, index = _varint(data, index)
            if index + size > len(data):
                raise ValueError("truncated length-delimited field")
            value, index = data[index:index + size], index + size
        else:
            raise ValueError(f"wire type {wire}")
        fields.append((number, wire, value))
    return fields


def _onnx_model(data: bytes) -> list[tuple[int, int, Any]] | None:
    try:
        fields = _fields(data)
    except ValueError:
        return None
    numbers = {(n, w) for n, w, _ in fields}
    return fields if (1, 0) in numbers and (7, 2) in numbers else None


def check_onnx(blob: Blob) -> list[str]:
    """External-data locations must stay inside the model's folder (no absolute paths, no ``..``)."""
    if blob.length > MAX_IN_MEMORY:
        raise UnreadableFormat(f"{blob.where}: ONNX protobuf over {MAX_IN_MEMORY} bytes")
    fields = _onnx_model(blob.read())
    if fields is None:
        raise UnreadableFormat(f"{blob.where}: not a readable ONNX model")
    problems: list[str] = []
    try:
        for number, wire, value in fields:
            if wire == 2 and number == 7:
                _graph(value, problems, 0)
            elif wire == 2 and number == 25:   # FunctionProto.node
                for n, w, v in _fields(value):
                    if n == 7 and w == 2:
                        _node(v, problems, 1)
            elif wire == 2 and number == 20:   # TrainingInfoProto: initialization, algorithm graphs
                for n, w, v in _fields(value):
                    if n in (1, 2) and w == 2:
                        _graph(v, problems, 1)
    except ValueError as exc:
        raise UnreadableFormat(f"{blob.where}: ONNX protobuf is malformed ({exc})") from None
    return problems


def _graph(data: bytes, problems: list[str], depth: int) -> None:
    if depth > 32:
        raise ValueError("graphs nested more than 32 deep")
    for number, wire, value in _fields(data):
        if wire != 2:
            continue
        if number == 1:
            _node(value, problems, depth)
        elif number == 5:
            _tensor(value, problems)
        elif number == 15:
            for n, w, v in _fields(value):
                if n in (1, 2) and w == 2:
                    _tensor(v, problems)


def _node(data: bytes, problems: list[str], depth: int) -> None:
    for number, wire, value in _fields(data):
        if number == 5 and wire == 2:   # AttributeProto
            for n, w, v in _fields(value):
                if w == 2 and n in (5, 10):
                    _tensor(v, problems)
                elif w == 2 and n in (6, 11):
                    _graph(v, problems, depth + 1)
                elif w == 2 and n in (22, 23):
                    for n2, w2, v2 in _fields(v):
                        if n2 in (1, 2) and w2 == 2:
                            _tensor(v2, problems)


def _tensor(data: bytes, problems: list[str]) -> None:
    for number, wire, value in _fields(data):
        if number == 13 and wire == 2:  # external_data: StringStringEntryProto
            entry = {n: v for n, w, v in _fields(value) if w == 2}
            if entry.get(1) == b"location":
                problem = _location_problem(entry.get(2, b""))
                if problem:
                    problems.append(problem)


def _location_problem(raw: bytes) -> str | None:
    try:
        location = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "ONNX external data location is not UTF-8"
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    # A location outside the model's folder makes the loader read (or a converter write) any file.
    if not location or "\0" in location or posix.is_absolute() or windows.is_absolute() or windows.drive \
            or ".." in posix.parts or ".." in windows.parts or location.startswith("~"):
        return f"ONNX external data location {location[:120]!r} leaves the model's folder"
    return None


# -- GGUF ----------------------------------------------------------------------------------------
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_GGUF_ITEMS = 50_000_000


def gguf_metadata(blob: Blob) -> dict[str, Any]:
    """The GGUF key/value header: strings kept, numbers and arrays skipped (only their size read)."""
    with blob.open() as region:
        reader = io.BufferedReader(region, 1 << 16)

        def take(size: int) -> bytes:
            data = reader.read(size)
            if len(data) != size:
                raise UnreadableFormat(f"{blob.where}: GGUF header truncated")
            return data

        if take(4) != b"GGUF":
            raise UnreadableFormat(f"{blob.where}: not GGUF")
        (version,) = struct.unpack("<I", take(4))
        if version not in (1, 2, 3):
            raise UnreadableFormat(f"{blob.where}: GGUF version {version} is not known")
        count = (lambda: struct.unpack("<I", take(4))[0]) if version == 1 else (lambda: struct.unpack("<Q", take(8))[0])

        def string() -> str:
            size = count()
            if size > blob.length:
                raise UnreadableFormat(f"{blob.where}: GGUF string longer than the file")
            try:
                return take(size).decode("utf-8")
            except UnicodeDecodeError:
                raise UnreadableFormat(f"{blob.where}: GGUF string is not UTF-8") from None

        def value(kind: int) -> Any:
            if kind in _GGUF_FIXED:
                take(_GGUF_FIXED[kind])
                return None
            if kind == 8:
                return string()
            if kind == 9:
                (item_kind,) = struct.unpack("<I", take(4))
                items = count()
                if items > _MAX_GGUF_ITEMS or item_kind == 9:
                    raise UnreadableFormat(f"{blob.where}: GGUF array too large or nested")
                if item_kind in _GGUF_FIXED:
                    size = items * _GGUF_FIXED[item_kind]
                    if size > blob.length:
                        raise UnreadableFormat(f"{blob.where}: GGUF array longer than the file")
                    take(size)
                    return None
                for _ in range(items):
                    value(item_kind)
                return None
            raise UnreadableFormat(f"{blob.where}: GGUF value type {kind} is not known")

        _tensors, entries = count(), count()
        if entries > 1_000_000:
            raise UnreadableFormat(f"{blob.where}: GGUF header claims {entries} entries")
        metadata: dict[str, Any] = {}
        for _ in range(entries):
            key = string()
            (kind,) = struct.unpack("<I", take(4))
            metadata[key] = value(kind)
    return metadata


def check_gguf(blob: Blob) -> list[str]:
    metadata = gguf_metadata(blob)
    problems = []
    for key, text in metadata.items():
        if key.startswith("tokenizer.chat_template") and isinstance(text, str):
            problems += [f"GGUF {key}: {p}" for p in chat_template_problems(text)]
    return problems


def chat_template_problems(template: str) -> list[str]:
    """A Jinja chat template may format messages; reaching Python internals (``__class__``,
    ``attr()``, ``_``-names) or other templates is how template injection runs code."""
    from jinja2 import TemplateSyntaxError, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        tree = ImmutableSandboxedEnvironment().parse(template)
    except (TemplateSyntaxError, RecursionError) as exc:
        return [f"chat template cannot be parsed ({str(exc)[:120]})"]
    problems: list[str] = []
    for node in tree.find_all((nodes.Getattr, nodes.Const, nodes.Filter, nodes.Import, nodes.FromImport,
                               nodes.Include, nodes.Extends)):
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            problems.append(f"chat template reads attribute {node.attr!r}")
        elif isinstance(node, nodes.Const) and isinstance(node.value, str) and "__" in node.value:
            problems.append(f"chat template holds a dunder string {node.value[:40]!r}")
        elif isinstance(node, nodes.Filter) and node.name == "attr":
            problems.append("chat template uses the attr() filter")
        elif isinstance(node, (nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
            problems.append("chat template loads another template")
    return sorted(set(problems))
