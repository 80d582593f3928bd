"""The serving request parser: request body bytes to validated instances, or one error with its status.

    rows = parse_instances(body, model.spec, max_batch=256)   # RequestError(status, message) otherwise

Any route (``/v1/predict`` today, an Open Inference Protocol route later) that takes instances calls
this one parser, so every route refuses the same inputs the same way: not JSON, nested too deep for
the parser (5,000 levels), numbers too large for a float, the wrong shape, too many instances, or
instances that do not match the model's preprocessing (secure_ml.release.serving.model.FeatureSpec).
"""

from __future__ import annotations

import json
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
