"""The serving request parser: request body bytes to validated instances, or one error with its status.

    rows = parse_instances(body, model.spec, max_batch=256)   # /v1/predict; RequestError(status, message)
    request = parse_v2_infer(body, model.spec, max_batch=256)  # /v2/models/{name}/infer: .rows, .outputs, .id

Both routes end in the one row check, ``FeatureSpec.validate`` (secure_ml.release.serving.model), so
every route refuses the same inputs the same way: not JSON, nested too deep for the parser (5,000
levels), numbers too large for a float, the wrong shape, too many instances, or instances that do
not match the model's preprocessing. An Open Inference Protocol v2 request carries tabular rows as
one named input per column, as MLServer's pandas codec sends them: numeric columns INT64 or FP64
(any INT/UINT/FP width), string columns BYTES, each of shape ``[N]`` or ``[N, 1]`` with its data
flat or nested row-major. Its own refusals, each naming the input: an unknown, repeated or missing
column, a datatype the column does not take, a shape that disagrees with its data or with the other
columns, a value of the wrong type for its datatype, and the binary tensor extension (JSON only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from secure_ml.errors import BadInput
from secure_ml.release.serving.model import FeatureSpec


class RequestError(BadInput):
    """A request the server refuses, with the HTTP status that says why (400, 413 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``, or RequestError(400). Deep nesting and huge integers included."""
    try:
        return json.loads(body)
    except RecursionError:
        # json's parser recurses per nesting level: thousands of levels must be a 400, not a 500.
        raise RequestError(400, "body is nested too deeply") from None
    except ValueError:   # not JSON, not UTF-8, or an integer over Python's digit limit
        raise RequestError(400, "body is not JSON") from None


def parse_instances(body: bytes, spec: FeatureSpec, *, max_batch: int) -> list[dict[str, Any]]:
    """Validated rows from ``{"instances": [{feature: value, ...}, ...]}``."""
    payload = parse_json(body)
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise RequestError(422, 'body must be {"instances": [ {...}, ... ]}')
    if len(instances) > max_batch:
        raise RequestError(413, f"at most {max_batch} instances per request")
    try:
        return [spec.validate(item, i) for i, item in enumerate(instances)]
    except BadInput as exc:
        raise RequestError(422, str(exc)) from None


NUMERIC_DATATYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
                               "FP16", "FP32", "FP64"})
V2_OUTPUTS = ("probability", "label")
_V2_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_V2_INPUT_KEYS = frozenset({"name", "datatype", "shape", "data", "parameters"})


@dataclass(frozen=True)
class V2Request:
    """A validated Open Inference Protocol inference request: the rows, the outputs asked for, its id."""

    rows: list[dict[str, Any]]
    outputs: tuple[str, ...]
    id: str | None


def _flatten(data: Any, depth: int, name: str) -> list[Any]:
    """Row-major values of ``data`` nested at most ``depth`` lists deep (the shape's rank)."""
    if not isinstance(data, list):
        raise RequestError(422, f"input {name!r}: data must be a list")
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            if depth <= 1:
                raise RequestError(422, f"input {name!r}: data is nested deeper than its shape")
            flat.extend(_flatten(item, depth - 1, name))
        else:
            flat.append(item)
    return flat


def _typed_value(value: Any, datatype: str, name: str) -> Any:
    """``value`` if JSON gave the type ``datatype`` holds, else RequestError naming the input."""
    if datatype == "BYTES":
        ok = isinstance(value, str)
    elif datatype.startswith(("INT", "UINT")):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise RequestError(422, f"input {name!r} is {datatype} but holds a {type(value).__name__} "
                                f"({str(value)[:40]!r})")
    return value


def _column(tensor: Any, spec: FeatureSpec, max_batch: int) -> tuple[str, list[Any]]:
    """(column name, its values) from one v2 input tensor, checked against the model's features."""
    if not isinstance(tensor, Mapping):
        raise RequestError(422, "each input must be an object {name, datatype, shape, data}")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise RequestError(422, "each input needs a string name")
    shown = name[:40]
    unknown = sorted(set(map(str, tensor)) - _V2_INPUT_KEYS)
    if unknown:
        raise RequestError(422, f"input {shown!r}: unknown key {unknown[0][:40]!r}")
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise RequestError(422, f"input {shown!r}: parameters must be an object")
    if "binary_data_size" in parameters:
        # Only JSON tensors: the binary extension would be a second parser to keep safe.
        raise RequestError(400, f"input {shown!r}: binary tensor data is not supported; send the data as JSON")
    if name in spec.numeric:
        allowed = "INT64 or FP64"
    elif name in spec.categorical:
        allowed = "BYTES"
    else:
        raise RequestError(422, f"unknown input {shown!r} (the model takes {', '.join(spec.order)[:300]})")
    datatype = tensor.get("datatype")
    if not (datatype == "BYTES" if allowed == "BYTES" else datatype in NUMERIC_DATATYPES):
        raise RequestError(422, f"input {shown!r} has datatype {str(datatype)[:20]!r}; it takes {allowed}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or (len(shape) == 2 and shape[1] != 1)):
        raise RequestError(422, f"input {shown!r}: shape must be [N] or [N, 1] (one column), not {str(shape)[:40]}")
    if shape[0] > max_batch:
        raise RequestError(413, f"at most {max_batch} rows per request (input {shown!r} has {shape[0]})")
    values = _flatten(tensor.get("data"), len(shape), shown)
    if len(values) != shape[0]:
        raise RequestError(422, f"input {shown!r}: shape {shape} holds {shape[0]} values, its data has {len(values)}")
    return name, [_typed_value(v, str(datatype), shown) for v in values]


def parse_v2_infer(body: bytes, spec: FeatureSpec, *, max_batch: int) -> V2Request:
    """Validated rows from an Open Inference Protocol v2 request with one input per column."""
    payload = parse_json(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or not payload["inputs"]:
        raise RequestError(422, 'body must be {"inputs": [{"name", "datatype", "shape", "data"}, ...]}')
    unknown = sorted(set(payload) - _V2_REQUEST_KEYS)
    if unknown:
        raise RequestError(422, f"unknown request key {unknown[0][:40]!r}")
    request_id = payload.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 256):
        raise RequestError(422, "id must be a string of at most 256 characters")
    if not isinstance(payload.get("parameters", {}), dict):
        raise RequestError(422, "parameters must be an object")
    columns: dict[str, list[Any]] = {}
    for tensor in payload["inputs"]:
        name, values = _column(tensor, spec, max_batch)
        if name in columns:
            raise RequestError(422, f"input {name!r} is given twice")
        first = next(iter(columns.items()), None)
        if first is not None and len(values) != len(first[1]):
            raise RequestError(422, f"input {name!r} has {len(values)} rows, input {first[0]!r} has {len(first[1])}")
        columns[name] = values
    missing = [n for n in spec.order if n not in columns]
    if missing:
        raise RequestError(422, f"missing input {missing[0]!r}")
    rows = len(next(iter(columns.values())))
    if rows == 0:
        raise RequestError(422, "the inputs hold no rows")
    try:
        validated = [spec.validate({n: columns[n][i] for n in columns}, i) for i in range(rows)]
    except BadInput as exc:
        raise RequestError(422, str(exc)) from None
    return V2Request(validated, _requested_outputs(payload.get("outputs")), request_id)


def _requested_outputs(outputs: Any) -> tuple[str, ...]:
    if outputs is None:
        return V2_OUTPUTS
    if not isinstance(outputs, list) or not all(isinstance(o, Mapping) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise RequestError(422, "outputs must be a list of {name}")
    names = tuple(str(o["name"]) for o in outputs)
    for name in names:
        if name not in V2_OUTPUTS:
            raise RequestError(422, f"unknown output {name[:40]!r} (one of {', '.join(V2_OUTPUTS)})")
    return names


def openapi_document(spec: FeatureSpec, *, max_batch: int) -> dict[str, Any]:
    """The OpenAPI 3.0 document the server publishes at /openapi.json (what schemathesis tests against)."""
    properties: dict[str, Any] = {name: {"type": "number"} for name in spec.numeric}
    properties.update({name: {"type": "string", "enum": list(categories)}
                       for name, categories in spec.categorical.items()})
    instance = {"type": "object", "properties": properties, "required": list(properties),
                "additionalProperties": False}
    error = {"description": "refused", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
    prediction = {"type": "object", "properties": {"probability": {"type": "number"},
                                                   "label": {"type": "integer", "enum": [0, 1]}},
                  "required": ["label"]}
    return {
        "openapi": "3.0.3",
        "info": {"title": "secure-ml model server", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/healthz": {"get": {"summary": "up or not; version and digest only with a valid token",
                                 "responses": {"200": {"description": "up", "content": {"application/json": {
                                     "schema": {"type": "object", "properties": {"status": {"type": "string"}},
                                                "required": ["status"]}}}}}}},
            "/v1/predict": {"post": {
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["instances"], "additionalProperties": False,
                    "properties": {"instances": {"type": "array", "minItems": 1, "maxItems": max_batch,
                                                 "items": instance}}}}}},
                "responses": {
                    "200": {"description": "predictions", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["predictions"],
                        "properties": {"predictions": {"type": "array", "items": prediction}}}}}},
                    **{code: error for code in ("400", "401", "413", "422", "429")},
                }}},
        },
    }
