"""The model server's HTTP app (Starlette): authentication, limits and extraction defences around the models.

    app = create_app([credit, cancer], tokens, rate_per_minute=120, daily_budget=10_000,
                     output=OutputPolicy(decimals=2), on_event=audit_writer,
                     detectors={"credit": ExtractionDetector(credit.spec)})
    serve(app, host="127.0.0.1", port=8765)          # or: secure-ml serve

Endpoints: ``GET /healthz`` (without a valid token only ``{"status": "ok"}``; with one, also the
version and the model digest), ``GET /openapi.json`` (the /v1 contract), ``POST /v1/predict`` with
``{"instances": [{feature: value, ...}, ...]}`` -> ``{"predictions": [{"probability", "label"}]}`` for
the first (default) model; and the Open Inference Protocol v2 REST routes for every model:
``GET /v2/health/live``, ``GET /v2/health/ready`` (both open, like /healthz: probes carry no token),
``GET /v2``, ``GET /v2/models/{name}[/versions/{v}]``, ``GET .../ready`` and ``POST .../infer``
(secure_ml.release.serving.requests.parse_v2_infer, secure_ml.release.serving.oip). An unknown
model or version is a 404 naming it, but only after the token is checked, so callers without one
cannot list what is deployed.

Every request to a protected route goes through ``Guard.admit``, shared by any route that serves the
model: a missing or wrong token gets 401, counted per client address and summarised once per window
in the audit log, and 429 once the address is over its failure limit for the window (a valid token
from that address still works: clients behind one NAT are not locked out by a guesser);
a token over its rate 429 with Retry-After (a tenth of the rate once the extraction detector flags
it); a request over the token's daily budget 429. Bodies are read to at most ``max_body_bytes`` and
parsed by secure_ml.release.serving.requests; no input yields a 500 (tests/test_serving_abuse.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from secure_ml.errors import ConfigurationError
from secure_ml.release.serving.extraction import ExtractionDetector, OutputPolicy
from secure_ml.release.serving.limits import AuthFailures, AuthSummary, DailyBudget, RateLimiter
from secure_ml.release.serving.model import LoadedModel
from secure_ml.release.serving import oip
from secure_ml.release.serving.requests import RequestError, openapi_document, parse_instances, parse_v2_infer
from secure_ml.release.serving.tokens import TokenStore

EventSink = Callable[[str, str, str, dict[str, Any]], None]


@dataclass
class Refusal:
    status: int
    error: str
    headers: dict[str, str]


class Guard:
    """Authentication, limits and extraction defences for one server, callable from any route."""

    def __init__(self, model: LoadedModel, tokens: TokenStore, *, rate_per_minute: int, daily_budget: int | None,
                 auth_failures: AuthFailures, detector: ExtractionDetector | None, on_event: EventSink | None,
                 throttle_divisor: int = 10, detectors: Mapping[str, ExtractionDetector] | None = None) -> None:
        self.model, self.tokens = model, tokens
        # One detector per model (each knows its own training distribution); the first is the default's.
        self.detectors = dict(detectors or {})
        if detector is not None:
            self.detectors.setdefault(model.name, detector)
        self.limiter = RateLimiter(rate_per_minute)
        self.throttled = RateLimiter(max(1, rate_per_minute // throttle_divisor))
        self.budget = DailyBudget(daily_budget) if daily_budget else None
        self.failures = auth_failures
        self._on_event = on_event

    @property
    def detector(self) -> ExtractionDetector | None:
        """The default model's extraction detector."""
        return self.detectors.get(self.model.name)

    def flagged(self, client: str) -> bool:
        """Flagged by any model's detector: extracting one model throttles the token everywhere."""
        return any(d.flagged(client) for d in self.detectors.values())

    def note(self, client: str, action: str, outcome: str, **details: Any) -> None:
        if self._on_event is not None:
            self._on_event(client, action, outcome, details)

    def write_summaries(self, summaries: list[AuthSummary]) -> None:
        for summary in summaries:
            # Never the token: only how many failures, from where, in which window.
            self.note(f"anonymous@{summary.address}", "serve.auth", "deny", **summary.details())

    def client_of(self, authorization: str) -> str | None:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        return self.tokens.authenticate(token) if scheme.lower() == "bearer" and token else None

    def admit(self, address: str, authorization: str) -> tuple[str | None, Refusal | None]:
        """(client name, None) for an authenticated request within its rate, else (None, Refusal)."""
        client = self.client_of(authorization)
        if client is None:
            # Guessing is limited per address; a valid token behind the same address (NAT) still works.
            blocked, wait, ended = self.failures.blocked(address)
            self.write_summaries(ended)
            if blocked:
                return None, Refusal(429, "too many authentication failures", {"Retry-After": _seconds(wait)})
            self.write_summaries(self.failures.fail(address))
            return None, Refusal(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
        flagged = self.flagged(client)
        allowed, wait = (self.throttled if flagged else self.limiter).allow(client)
        if not allowed:
            self.note(client, "serve.rate_limit", "deny", retry_after=round(wait, 2), throttled=flagged)
            return None, Refusal(429, "rate limit exceeded", {"Retry-After": _seconds(wait)})
        return client, None

    def charge(self, client: str, rows: list[dict[str, Any]], model: str | None = None) -> Refusal | None:
        """The daily budget (across models), then the model's extraction detector, for rows about to be answered."""
        if self.budget is not None:
            allowed, left = self.budget.charge(client, len(rows))
            if not allowed:
                self.note(client, "serve.budget", "deny", asked=len(rows), left_today=left)
                return Refusal(429, f"daily query budget exhausted ({left} instances left today)",
                               {"Retry-After": "3600"})
        detector = self.detectors.get(self.model.name if model is None else model)
        if detector is not None:
            verdict = detector.observe(client, rows)
            if verdict is not None:
                self.note(client, "serve.extraction", "throttle", model=model or self.model.name, **verdict.details())
        return None


def _seconds(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


def create_app(model: LoadedModel | Sequence[LoadedModel], tokens: TokenStore, *, rate_per_minute: int = 120,
               max_batch: int = 256, max_body_bytes: int = 1 << 20, on_event: EventSink | None = None,
               daily_budget: int | None = None, output: OutputPolicy | None = None,
               detector: ExtractionDetector | None = None, auth_failures: AuthFailures | None = None,
               detectors: Mapping[str, ExtractionDetector] | None = None) -> Any:
    """A Starlette app serving ``model`` (or several: the first is /v1/predict's). ``on_event(client, action,
    outcome, details)`` sees every denial (authentication failures as one summary per address per window)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    served = [model] if isinstance(model, LoadedModel) else list(model)
    if not served or len({m.name for m in served}) != len(served):
        raise ConfigurationError("the server needs at least one model, each under its own name")
    models = {m.name: m for m in served}
    default = served[0]
    output = output or OutputPolicy()
    guard = Guard(default, tokens, rate_per_minute=rate_per_minute, daily_budget=daily_budget,
                  auth_failures=auth_failures or AuthFailures(), detector=detector, on_event=on_event,
                  detectors=detectors)
    document = openapi_document(default.spec, max_batch=max_batch)

    def refuse(refusal: Refusal) -> JSONResponse:
        return JSONResponse({"error": refusal.error}, status_code=refusal.status, headers=refusal.headers)

    def admit(request: Request) -> tuple[str | None, JSONResponse | None]:
        address = request.client.host if request.client else "unknown"
        client, refusal = guard.admit(address, request.headers.get("authorization", ""))
        if refusal is not None or client is None:
            return None, refuse(refusal or Refusal(401, "a valid bearer token is required", {}))
        return client, None

    def find(request: Request) -> LoadedModel | JSONResponse:
        """The model the path names (and its version, when the path names one), or a 404 naming it."""
        name = str(request.path_params["name"])
        found = models.get(name)
        if found is None:
            return JSONResponse({"error": f"model {name[:64]!r} is not deployed"}, status_code=404)
        version = request.path_params.get("version")
        if version is not None and version != found.version:
            return JSONResponse({"error": f"model {name!r} has no deployed version {str(version)[:64]!r}"},
                                status_code=404)
        return found

    async def read_body(request: Request) -> bytes | None:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return None
        return bytes(body)

    async def answer(request: Request, served_model: LoadedModel, client: str,
                     parse: Callable[[bytes], list[dict[str, Any]]]) -> list[float] | JSONResponse:
        """Body, the one parser, the budget and the detector, then the model: probabilities or a refusal."""
        body = await read_body(request)
        if body is None:
            return JSONResponse({"error": f"body over {max_body_bytes} bytes"}, status_code=413)
        try:
            rows = parse(body)
        except RequestError as exc:
            if exc.status == 422:
                guard.note(client, "serve.input", "deny", reason=str(exc), model=served_model.name)
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        refusal = guard.charge(client, rows, served_model.name)
        if refusal is not None:
            return refuse(refusal)
        probabilities = served_model.predict(rows)
        if not all(math.isfinite(p) for p in probabilities):
            # Fail closed on an answer the model cannot give (never a 500, never NaN on the wire).
            guard.note(client, "serve.predict", "fail", reason="the model answered a non-finite probability",
                       model=served_model.name)
            return JSONResponse({"error": "the model cannot answer for these values"}, status_code=422)
        return probabilities

    async def healthz(request: Request) -> JSONResponse:
        # Unauthenticated callers learn only that the server is up, not which model it serves.
        if guard.client_of(request.headers.get("authorization", "")) is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "version": default.version, "model_digest": default.model_digest})

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(document)

    async def predict(request: Request) -> JSONResponse:
        client, refused = admit(request)
        if refused is not None or client is None:
            return refused or refuse(Refusal(401, "a valid bearer token is required", {}))
        result = await answer(request, default, client, lambda body: parse_instances(body, default.spec,
                                                                                      max_batch=max_batch))
        if isinstance(result, JSONResponse):
            return result
        return JSONResponse({
            "model_digest": default.model_digest,
            "version": default.version,
            "predictions": [output.render(p, default.threshold) for p in result],
        })

    # -- Open Inference Protocol v2 ------------------------------------------------------------
    async def v2_live(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def v2_ready(request: Request) -> JSONResponse:
        # Every model was verified and loaded before the app existed: up means ready.
        return JSONResponse({"ready": True})

    async def v2_server(request: Request) -> JSONResponse:
        _, refused = admit(request)
        return refused or JSONResponse(oip.SERVER)

    async def v2_model(request: Request) -> JSONResponse:
        _, refused = admit(request)
        if refused is not None:
            return refused
        found = find(request)
        return found if isinstance(found, JSONResponse) else JSONResponse(oip.model_metadata(found, output))

    async def v2_model_ready(request: Request) -> JSONResponse:
        _, refused = admit(request)
        if refused is not None:
            return refused
        found = find(request)
        return found if isinstance(found, JSONResponse) else JSONResponse({"name": found.name, "ready": True})

    async def v2_infer(request: Request) -> JSONResponse:
        client, refused = admit(request)
        if refused is not None or client is None:
            return refused or refuse(Refusal(401, "a valid bearer token is required", {}))
        found = find(request)
        if isinstance(found, JSONResponse):
            return found
        parsed: list[Any] = []

        def parse(body: bytes) -> list[dict[str, Any]]:
            parsed.append(parse_v2_infer(body, found.spec, max_batch=max_batch))
            return list(parsed[0].rows)

        result = await answer(request, found, client, parse)
        if isinstance(result, JSONResponse):
            return result
        try:
            return JSONResponse(oip.infer_response(found, result, parsed[0], output))
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        guard.write_summaries(guard.failures.drain(force=True))   # the open window's summaries at shutdown

    model_routes = []
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        model_routes += [Route(prefix, v2_model, methods=["GET"]),
                         Route(f"{prefix}/ready", v2_model_ready, methods=["GET"]),
                         Route(f"{prefix}/infer", v2_infer, methods=["POST"])]
    app = Starlette(routes=[Route("/healthz", healthz, methods=["GET"]),
                            Route("/openapi.json", openapi, methods=["GET"]),
                            Route("/v1/predict", predict, methods=["POST"]),
                            Route("/v2/health/live", v2_live, methods=["GET"]),
                            Route("/v2/health/ready", v2_ready, methods=["GET"]),
                            Route("/v2", v2_server, methods=["GET"]),
                            *model_routes], lifespan=lifespan)
    app.state.guard = guard
    app.state.models = models
    return app


def serve(app: Any, *, host: str, port: int) -> None:  # pragma: no cover - exercised by the CLI
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False, date_header=False)
