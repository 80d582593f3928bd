"""The local model server: serves only a verified model directory, to authenticated, rate-limited clients.

    tokens = TokenStore(home / "serving" / "tokens.json")
    secret = tokens.issue("frontend")              # shown once; only its SHA-256 is stored
    model = load_deployment(location, trust=trust)   # the verification chain, pinned to the receipt's digest
    app = create_app(model, tokens, rate_per_minute=120)
    uvicorn.run(app, host="127.0.0.1", port=8765)  # or: secure-ml serve

What it refuses: a model directory that fails the verification chain
(secure_ml.security.verification: signature against trusted signers, files hashing to the pinned
digest, attestation and its subjects when present), that holds any file other than the model's
safetensors and JSON/Markdown files (nothing is ever unpickled), or symlinks. Requests without a
valid bearer token (401), over the client's rate (429, with Retry-After), over the body or batch
size (413), and instances that do not match the model's preprocessing (unknown or missing
features, wrong types, non-finite numbers, unseen categories: 422, naming the field).

Endpoints: ``GET /healthz`` (no auth; version and digest), ``POST /v1/predict`` with
``{"instances": [{feature: value, ...}, ...]}`` -> ``{"predictions": [{"probability", "label"}]}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import atomic_write
from secure_ml.errors import BadInput, ConfigurationError, IntegrityError, VerificationError
from secure_ml.release.deployed import ATTESTATION_FILE, RECEIPT_FILE, SIGNATURE_FILE, HealthResult
from secure_ml.security import verification
from secure_ml.security.verification import TrustPolicy
from secure_ml.training.predictor import load_predictor

ALLOWED_FILES = re.compile(r"^(model\.safetensors|config\.json|preprocessing\.json|training_record\.json|MODEL_CARD\.md)$")
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")


# -- tokens ----------------------------------------------------------------------------------------
def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Bearer tokens for the server, stored as SHA-256 hashes (0600); the secret is shown once."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _load(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            tokens = data["tokens"]
            if not isinstance(tokens, list):
                raise TypeError
            return [{"name": str(t["name"]), "sha256": str(t["sha256"]), "created": str(t.get("created", ""))}
                    for t in tokens]
        except (ValueError, KeyError, TypeError):
            raise ConfigurationError(f"token file {self.path} is malformed") from None

    def issue(self, name: str) -> str:
        if not _TOKEN_NAME.match(name or ""):
            raise BadInput(f"token name must be 1-64 letters, digits or _.@:- (got {name[:70]!r})")
        tokens = [t for t in self._load() if t["name"] != name]
        secret = secrets.token_urlsafe(32)
        tokens.append({"name": name, "sha256": _hash_token(secret),
                       "created": datetime.now(UTC).isoformat(timespec="seconds")})
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_write(self.path, mode=0o600) as out:
            out.write(json.dumps({"tokens": tokens}, indent=1).encode())
        return secret

    def revoke(self, name: str) -> bool:
        tokens = self._load()
        kept = [t for t in tokens if t["name"] != name]
        with atomic_write(self.path, mode=0o600) as out:
            out.write(json.dumps({"tokens": kept}, indent=1).encode())
        return len(kept) != len(tokens)

    def names(self) -> list[str]:
        return [t["name"] for t in self._load()]

    def authenticate(self, token: str) -> str | None:
        """The client name for ``token``, or None. Compares every stored hash in constant time."""
        presented = _hash_token(token)
        found: str | None = None
        for entry in self._load():
            if hmac.compare_digest(presented, entry["sha256"]):
                found = entry["name"]
        return found


# -- rate limiting -----------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket per client: ``per_minute`` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ConfigurationError("rate limit must be at least 1 request a minute")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be)."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return True, 0.0
            self._buckets[client] = (tokens, now)
            return False, (1.0 - tokens) / self.rate


# -- the model ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSpec:
    """What an instance must look like, from the model's preprocessing.json."""

    numeric: dict[str, tuple[float, float]]          # name -> (mean, scale)
    categorical: dict[str, tuple[str, ...]]          # name -> known categories, in encoding order
    order: tuple[str, ...]

    @classmethod
    def from_preprocessing(cls, prep: Mapping[str, Any]) -> FeatureSpec:
        try:
            numeric_raw = prep.get("numeric") or {}
            means = prep.get("means") or prep.get("mean") or {}
            scales = prep.get("scales") or prep.get("stds") or prep.get("std") or prep.get("scale") or {}
            numeric: dict[str, tuple[float, float]] = {}
            if isinstance(numeric_raw, Mapping):
                for name, spec in numeric_raw.items():
                    spec = spec if isinstance(spec, Mapping) else {}
                    numeric[str(name)] = (float(spec.get("mean", means.get(name, 0.0))),
                                          float(spec.get("std", spec.get("scale", scales.get(name, 1.0)))) or 1.0)
            else:
                for name in numeric_raw:
                    numeric[str(name)] = (float(means.get(name, 0.0)), float(scales.get(name, 1.0)) or 1.0)
            categorical_raw = prep.get("categorical") or prep.get("categories") or {}
            categorical = {str(name): tuple(str(c) for c in (spec.get("categories", []) if isinstance(spec, Mapping)
                                                              else spec))
                           for name, spec in dict(categorical_raw).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"the model's preprocessing.json is not usable ({exc})") from None
        order = tuple(str(f) for f in (prep.get("features") or [*numeric, *categorical]))
        if not numeric and not categorical:
            raise IntegrityError("the model's preprocessing.json names no features")
        return cls(numeric, categorical, order)

    def validate(self, instance: Any, index: int) -> dict[str, Any]:
        where = f"instance {index}"
        if not isinstance(instance, Mapping):
            raise BadInput(f"{where} is not an object")
        known = set(self.numeric) | set(self.categorical)
        unknown = sorted(set(map(str, instance)) - known)
        if unknown:
            raise BadInput(f"{where}: unknown field {unknown[0]!r}")
        missing = sorted(known - set(map(str, instance)))
        if missing:
            raise BadInput(f"{where}: missing field {missing[0]!r}")
        for name in self.numeric:
            value = instance[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise BadInput(f"{where}: field {name!r} must be a finite number")
        for name, categories in self.categorical.items():
            value = instance[name]
            if not isinstance(value, str):
                raise BadInput(f"{where}: field {name!r} must be a string")
            if value not in categories:
                raise BadInput(f"{where}: field {name!r} has unseen category {value[:40]!r}")
        return dict(instance)

    def example(self) -> dict[str, Any]:
        """One representative instance (means, first categories), for health checks."""
        return {**{n: m for n, (m, _) in self.numeric.items()},
                **{n: c[0] for n, c in self.categorical.items() if c}}


Predictor = Callable[[list[dict[str, Any]]], list[float]]


@dataclass
class LoadedModel:
    directory: Path
    model_digest: str
    version: str
    spec: FeatureSpec
    predict: Predictor
    threshold: float = 0.5
    details: dict[str, Any] = field(default_factory=dict)


def load_verified(model_dir: Path | str, *, trust: TrustPolicy, expected_digest: str, bundle: bytes | Path,
                  envelope: bytes | Path | None = None, version: str = "") -> LoadedModel:
    """Load ``model_dir`` only after the verification chain passes: signature against ``trust``, files
    hashing to ``expected_digest``, and the attestation with its subjects when one is given."""
    model_dir = Path(model_dir)
    verified = verification.verify_model(model_dir, bundle, envelope, trust=trust, expected_digest=expected_digest)
    strays = [n for n in verified.files if not ALLOWED_FILES.match(n)]
    if strays:
        # Only safetensors and JSON are ever loaded: anything else (a pickle by any name) is refused.
        raise VerificationError(f"model directory holds an unexpected file: {strays[0]}")
    try:
        prep = json.loads((model_dir / "preprocessing.json").read_text())
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError as exc:
        raise VerificationError(f"model directory lacks {Path(str(exc.filename)).name}") from None
    except ValueError:
        raise VerificationError("the model's config.json or preprocessing.json is not JSON") from None
    spec = FeatureSpec.from_preprocessing(prep)
    threshold = float(config.get("threshold", 0.5)) if isinstance(config, Mapping) else 0.5
    details = {"signer": verified.signer, "method": verified.method, **verified.attestation}
    # The training stage's loader is the one loader (safetensors: no code runs on load).
    return LoadedModel(model_dir, verified.model_digest, version, spec, load_predictor(model_dir), threshold, details)


def load_deployment(location: Path | str, *, trust: TrustPolicy, expected_digest: str | None = None) -> LoadedModel:
    """Load a deployed directory (model/, model.sig, attestation, DEPLOYMENT.json) after the chain passes.

    The digest is pinned to the receipt's (and to ``expected_digest`` when given). An attestation the
    receipt names must be there: removing it does not downgrade the check to signature-only.
    """
    location = Path(location)
    try:
        receipt = json.loads((location / RECEIPT_FILE).read_text())
    except (FileNotFoundError, ValueError):
        raise VerificationError(f"{location} is not a deployment (no readable {RECEIPT_FILE})") from None
    digest = str(receipt.get("model_digest", ""))
    if expected_digest is not None and digest != expected_digest:
        raise VerificationError(f"deployment {location.name} is {digest[:16]}…, not the expected {expected_digest[:16]}…")
    bundle = location / str(receipt.get("signature_file") or SIGNATURE_FILE)
    if not bundle.is_file():
        raise VerificationError(f"deployment {location.name} has no signature bundle")
    named = receipt.get("attestation_file")
    envelope = location / str(named or ATTESTATION_FILE)
    if named and not envelope.is_file():
        raise VerificationError(f"deployment {location.name} lacks its attestation {envelope.name}")
    return load_verified(location / "model", trust=trust, expected_digest=digest, bundle=bundle,
                         envelope=envelope if envelope.is_file() else None, version=str(receipt.get("version", "")))


def health_probe(location: Path | str, *, trust: TrustPolicy) -> HealthResult:
    """Load a deployment the way the server does and predict one row: healthy only if that works."""
    model = load_deployment(location, trust=trust)
    example = model.spec.example()
    probabilities = model.predict([model.spec.validate(example, 0)])
    if len(probabilities) != 1 or not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probabilities):
        return HealthResult(False, f"the model answered {probabilities!r} for a representative row, "
                                   "not one probability in [0, 1]")
    return HealthResult(True, f"predicted {probabilities[0]:.4f} for a representative row",
                        {"probability": probabilities[0]})


# -- the app -----------------------------------------------------------------------------------------
def create_app(model: LoadedModel, tokens: TokenStore, *, rate_per_minute: int = 120, max_batch: int = 256,
               max_body_bytes: int = 1 << 20, on_event: Callable[[str, str, str, dict[str, Any]], None] | None = None) -> Any:
    """A Starlette app serving ``model``. ``on_event(client, action, outcome, details)`` sees every denial."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    limiter = RateLimiter(rate_per_minute)

    def note(client: str, action: str, outcome: str, **details: Any) -> None:
        if on_event is not None:
            on_event(client, action, outcome, details)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": model.version, "model_digest": model.model_digest})

    async def predict(request: Request) -> JSONResponse:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        client = tokens.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if client is None:
            note("anonymous", "serve.auth", "deny", reason="missing or invalid bearer token")
            return JSONResponse({"error": "a valid bearer token is required"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        allowed, wait = limiter.allow(client)
        if not allowed:
            note(client, "serve.rate_limit", "deny", retry_after=round(wait, 2))
            return JSONResponse({"error": "rate limit exceeded"}, status_code=429,
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            return JSONResponse({"error": f"body over {max_body_bytes} bytes"}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return JSONResponse({"error": f"body over {max_body_bytes} bytes"}, status_code=413)
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            return JSONResponse({"error": "body must be {\"instances\": [ {...}, ... ]}"}, status_code=422)
        if len(instances) > max_batch:
            return JSONResponse({"error": f"at most {max_batch} instances per request"}, status_code=413)
        try:
            rows = [model.spec.validate(item, i) for i, item in enumerate(instances)]
        except BadInput as exc:
            note(client, "serve.input", "deny", reason=str(exc))
            return JSONResponse({"error": str(exc)}, status_code=422)
        probabilities = model.predict(rows)
        return JSONResponse({
            "model_digest": model.model_digest,
            "version": model.version,
            "predictions": [{"probability": p, "label": int(p >= model.threshold)} for p in probabilities],
        })

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"]),
                             Route("/v1/predict", predict, methods=["POST"])])


def serve(app: Any, *, host: str, port: int) -> None:  # pragma: no cover - exercised by the CLI
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False, date_header=False)


def tokens_path(home: Path) -> Path:
    return Path(home) / "serving" / "tokens.json"
