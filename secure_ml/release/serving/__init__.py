"""The local model server: serves only a verified model directory, to authenticated, limited clients.

    tokens = TokenStore(tokens_path(home))
    secret = tokens.issue("frontend")                 # shown once; only its SHA-256 is stored
    model = load_deployment(location, trust=trust)    # the verification chain, pinned to the receipt's digest
    app = create_app(model, tokens, rate_per_minute=120, daily_budget=10_000,
                     output=OutputPolicy(decimals=2), detector=ExtractionDetector(model.spec))
    serve(app, host="127.0.0.1", port=8765)           # or: secure-ml serve

One concern per module: ``model`` (verified loading, the input contract, the health probe),
``tokens`` (hashed bearer tokens), ``limits`` (rate, daily budget, authentication failures),
``requests`` (the /v1 and Open Inference Protocol v2 request parsers and the OpenAPI document),
``oip`` (v2 metadata and responses), ``extraction`` (output precision and the extraction detector),
``app`` (the Starlette app and the Guard every route calls).
"""

from secure_ml.release.serving.app import Guard, create_app, serve
from secure_ml.release.serving.extraction import ExtractionDetector, ExtractionVerdict, OutputPolicy
from secure_ml.release.serving.limits import AuthFailures, DailyBudget, RateLimiter
from secure_ml.release.serving.model import (
    ALLOWED_FILES,
    FeatureSpec,
    LoadedModel,
    Predictor,
    health_probe,
    load_deployment,
    load_verified,
)
from secure_ml.release.serving.requests import (
    RequestError,
    V2Request,
    openapi_document,
    parse_instances,
    parse_json,
    parse_v2_infer,
)
from secure_ml.release.serving.tokens import TokenStore, tokens_path

__all__ = [
    "ALLOWED_FILES", "AuthFailures", "DailyBudget", "ExtractionDetector", "ExtractionVerdict", "FeatureSpec",
    "Guard", "LoadedModel", "OutputPolicy", "Predictor", "RateLimiter", "RequestError", "TokenStore",
    "create_app", "health_probe", "load_deployment", "load_verified", "openapi_document", "parse_instances",
    "parse_json", "parse_v2_infer", "serve", "tokens_path", "V2Request",
]
