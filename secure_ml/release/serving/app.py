"""The model server's HTTP app (Starlette): authentication, limits and extraction defences around the model.

    app = create_app(model, tokens, rate_per_minute=120, daily_budget=10_000,
                     output=OutputPolicy(decimals=2), on_event=audit_writer)
    serve(app, host="127.0.0.1", port=8765)          # or: secure-ml serve

Endpoints: ``GET /healthz`` (without a valid token only ``{"status": "ok"}``; with one, also the
version and the model digest), ``GET /openapi.json`` (the request contract), ``POST /v1/predict`` with
``{"instances": [{feature: value, ...}, ...]}`` -> ``{"predictions": [{"probability", "label"}]}``.

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from secure_ml.release.serving.extraction import ExtractionDetector, OutputPolicy
from secure_ml.release.serving.limits import AuthFailures, AuthSummary, DailyBudget, RateLimiter
from secure_ml.release.serving.model import LoadedModel
from secure_ml.release.serving.requests import RequestError, openapi_document, parse_instances
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
                 throttle_divisor: int = 10) -> None:
        self.model, self.tokens = model, tokens
        self.limiter = RateLimiter(rate_per_minute)
        self.throttled = RateLimiter(max(1, rate_per_minute // throttle_divisor))
        self.budget = DailyBudget(daily_budget) if daily_budget else None
        self.failures = auth_failures
        self.detector = detector
        self._on_event = on_event

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
        flagged = self.detector is not None and self.detector.flagged(client)
        allowed, wait = (self.throttled if flagged else self.limiter).allow(client)
        if not allowed:
            self.note(client, "serve.rate_limit", "deny", retry_after=round(wait, 2), throttled=flagged)
            return None, Refusal(429, "rate limit exceeded", {"Retry-After": _seconds(wait)})
        return client, None

    def charge(self, client: str, rows: list[dict[str, Any]]) -> Refusal | None:
        """The daily budget, then the extraction detector, for rows about to be answered."""
        if self.budget is not None:
            allowed, left = self.budget.charge(client, len(rows))
            if not allowed:
                self.note(client, "serve.budget", "deny", asked=len(rows), left_today=left)
                return Refusal(429, f"daily query budget exhausted ({left} instances left today)",
                               {"Retry-After": "3600"})
        if self.detector is not None:
            verdict = self.detector.observe(client, rows)
            if verdict is not None:
                self.note(client, "serve.extraction", "throttle", **verdict.details())
        return None


def _seconds(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


def create_app(model: LoadedModel, tokens: TokenStore, *, rate_per_minute: int = 120, max_batch: int = 256,
               max_body_bytes: int = 1 << 20, on_event: EventSink | None = None, daily_budget: int | None = None,
               output: OutputPolicy | None = None, detector: ExtractionDetector | None = None,
               auth_failures: AuthFailures | None = None) -> Any:
    """A Starlette app serving ``model``. ``on_event(client, action, outcome, details)`` sees every denial
    (authentication failures as one summary per address per window)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    output = output or OutputPolicy()
    guard = Guard(model, tokens, rate_per_minute=rate_per_minute, daily_budget=daily_budget,
                  auth_failures=auth_failures or AuthFailures(), detector=detector, on_event=on_event)
    document = openapi_document(model.spec, max_batch=max_batch)

    def refuse(refusal: Refusal) -> JSONResponse:
        return JSONResponse({"error": refusal.error}, status_code=refusal.status, headers=refusal.headers)

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

    async def healthz(request: Request) -> JSONResponse:
        # Unauthenticated callers learn only that the server is up, not which model it serves.
        if guard.client_of(request.headers.get("authorization", "")) is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "version": model.version, "model_digest": model.model_digest})

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(document)

    async def predict(request: Request) -> JSONResponse:
        address = request.client.host if request.client else "unknown"
        client, refusal = guard.admit(address, request.headers.get("authorization", ""))
        if refusal is not None or client is None:
            return refuse(refusal or Refusal(401, "a valid bearer token is required", {}))
        body = await read_body(request)
        if body is None:
            return JSONResponse({"error": f"body over {max_body_bytes} bytes"}, status_code=413)
        try:
            rows = parse_instances(body, model.spec, max_batch=max_batch)
        except RequestError as exc:
            if exc.status == 422:
                guard.note(client, "serve.input", "deny", reason=str(exc))
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        refusal = guard.charge(client, rows)
        if refusal is not None:
            return refuse(refusal)
        probabilities = model.predict(rows)
        if not all(math.isfinite(p) for p in probabilities):
            # Fail closed on an answer the model cannot give (never a 500, never NaN on the wire).
            guard.note(client, "serve.predict", "fail", reason="the model answered a non-finite probability")
            return JSONResponse({"error": "the model cannot answer for these values"}, status_code=422)
        return JSONResponse({
            "model_digest": model.model_digest,
            "version": model.version,
            "predictions": [output.render(p, model.threshold) for p in probabilities],
        })

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        guard.write_summaries(guard.failures.drain(force=True))   # the open window's summaries at shutdown

    app = Starlette(routes=[Route("/healthz", healthz, methods=["GET"]),
                            Route("/openapi.json", openapi, methods=["GET"]),
                            Route("/v1/predict", predict, methods=["POST"])], lifespan=lifespan)
    app.state.guard = guard
    return app


def serve(app: Any, *, host: str, port: int) -> None:  # pragma: no cover - exercised by the CLI
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False, date_header=False)
