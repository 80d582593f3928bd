"""Open Inference Protocol v2 documents: model metadata and inference responses for a served model.

    model_metadata(model)                                  # GET /v2/models/{name}
    infer_response(model, probabilities, request, output)  # POST /v2/models/{name}/infer

A model takes one input per feature (numeric: FP64, string: BYTES; shape ``[-1]``) and answers two
outputs of shape ``[N]``: ``probability`` (FP64) and ``label`` (INT64). Answers go through the
server's :class:`~secure_ml.release.serving.extraction.OutputPolicy`, the same as ``/v1/predict``:
rounded probabilities, or the label alone (then ``probability`` is not an output).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from secure_ml.release.serving.extraction import OutputPolicy
from secure_ml.release.serving.model import LoadedModel
from secure_ml.release.serving.requests import RequestError, V2Request

SERVER = {"name": "secure-ml", "version": "1", "extensions": []}
PLATFORM = "secure-ml_safetensors"


def outputs_of(output: OutputPolicy) -> list[dict[str, Any]]:
    label = {"name": "label", "datatype": "INT64", "shape": [-1]}
    return [label] if output.label_only else [{"name": "probability", "datatype": "FP64", "shape": [-1]}, label]


def model_metadata(model: LoadedModel, output: OutputPolicy) -> dict[str, Any]:
    inputs = [{"name": name, "datatype": "FP64" if name in model.spec.numeric else "BYTES", "shape": [-1]}
              for name in model.spec.order]
    return {"name": model.name, "versions": [model.version] if model.version else [], "platform": PLATFORM,
            "inputs": inputs, "outputs": outputs_of(output), "parameters": {"model_digest": model.model_digest}}


def infer_response(model: LoadedModel, probabilities: Sequence[float], request: V2Request,
                   output: OutputPolicy) -> dict[str, Any]:
    """The v2 response; RequestError(422) when an output the policy withholds is asked for."""
    served = {o["name"] for o in outputs_of(output)}
    withheld = [name for name in request.outputs if name not in served]
    if withheld and request.outputs != ("probability", "label"):
        raise RequestError(422, f"output {withheld[0]!r} is not served (answers are labels only)")
    rendered = [output.render(p, model.threshold) for p in probabilities]
    tensors = {"probability": "FP64", "label": "INT64"}
    answer: dict[str, Any] = {
        "model_name": model.name, "model_version": model.version,
        "parameters": {"model_digest": model.model_digest},
        "outputs": [{"name": name, "datatype": tensors[name], "shape": [len(rendered)],
                     "data": [r[name] for r in rendered]} for name in request.outputs if name in served],
    }
    if request.id is not None:
        answer["id"] = request.id
    return answer
