"""The local model server (secure_ml/release/serving.py) over real HTTP.

Touches: a real uvicorn server on a loopback port serving a real safetensors model that was
deployed through the gate; bearer-token auth with hashed tokens, per-client rate limits, input
validation against the model's preprocessing, body and batch limits, /healthz; and the loader's
refusals (a file changed after signing, a stray pickle, a symlink, a wrong pinned digest).
Does not touch: TLS (terminated in front of the server), the Kubernetes pod (tests/test_k8s.py).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _release_fixtures import Keys, make_keys, make_model_dir, publish, release_for, trust

from secure_ml.errors import BadInput, VerificationError
from secure_ml.release import serving
from secure_ml.release.deploy import Release
from secure_ml.settings import Settings

ROW = {"age": 41, "credit_amount": 2500.0, "sex": "female", "purpose": "car"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def deployed(settings: Settings, keys: Keys, tmp_path: Path) -> tuple[Release, Path]:
    release = release_for(settings, keys)
    published = publish(settings, make_model_dir(tmp_path / "m1"), keys, tmp_path)
    release.register(published.digest, published.evidence, actor="bob")
    release.approve("v1", identity="carol")
    record = release.deploy(actor="dave")
    return release, Path(record.location)


class Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                raw: bytes | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}"), dict(err.headers)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[tuple[Server, str, list[Any], Any, Any]]:
    """One deployment and one server for the HTTP tests (a deploy costs seconds)."""
    from secure_ml.settings import init_home

    root = tmp_path_factory.mktemp("served")
    settings = Settings.from_env({"SECURE_ML_HOME": str(root / "home"), "SECURE_ML_ACTOR": "test-engineer"})
    init_home(settings)
    release = release_for(settings, keys)
    published = publish(settings, make_model_dir(root / "m1"), keys, root)
    release.register(published.digest, published.evidence, actor="bob")
    release.approve("v1", identity="carol")
    location = Path(release.deploy(actor="dave").location)
    tokens = serving.TokenStore(serving.tokens_path(settings.home))
    secret = tokens.issue("frontend")
    model = serving.load_deployment(location, trust=trust(keys))
    events: list[Any] = []
    app = serving.create_app(model, tokens, rate_per_minute=1000, max_batch=4, max_body_bytes=4096,
                             on_event=lambda *e: events.append(e))
    with Server(app) as server:
        yield server, secret, events, model, tokens


@pytest.fixture
def running(served: tuple[Server, str, list[Any], Any, Any]) -> tuple[Server, str, list[Any]]:
    return served[0], served[1], served[2]


def test_health_and_an_authorised_prediction(running: tuple[Server, str, list[Any]]) -> None:
    server, secret, _ = running
    code, body, _ = server.request("GET", "/healthz")
    assert code == 200 and body == {"status": "ok"}      # no digest or version without a token
    code, body, _ = server.request("GET", "/healthz", token=secret)
    assert code == 200 and body["status"] == "ok" and body["version"] == "v1" and len(body["model_digest"]) == 64
    code, body, _ = server.request("POST", "/v1/predict", {"instances": [ROW, {**ROW, "sex": "male"}]}, token=secret)
    assert code == 200, body
    assert len(body["predictions"]) == 2
    assert all(0.0 <= p["probability"] <= 1.0 and p["label"] in (0, 1) for p in body["predictions"])


@pytest.mark.parametrize("token", [None, "", "not-the-token", "Bearer x"])
def test_requests_without_a_valid_token_are_refused(running: tuple[Server, str, list[Any]], token: str | None) -> None:
    server, _, events = running
    failures = server.app.state.guard.failures
    code, body, headers = server.request("POST", "/v1/predict", {"instances": [ROW]}, token=token)
    assert code == 401 and headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    # Counted per address, summarised once per window (tests/test_serving_abuse.py), never per request.
    summaries = failures.drain(force=True)
    assert [(s.address, s.failures) for s in summaries] == [("127.0.0.1", 1)]


def test_each_client_is_rate_limited(served: tuple[Server, str, list[Any], Any, Any]) -> None:
    _, _, _, model, tokens = served
    events: list[Any] = []
    app = serving.create_app(model, tokens, rate_per_minute=5, on_event=lambda *e: events.append(e))
    first, second = tokens.issue("client-a"), tokens.issue("client-b")
    with Server(app) as server:
        codes = [server.request("POST", "/v1/predict", {"instances": [ROW]}, token=first)[0] for _ in range(7)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
        status, _, headers = server.request("POST", "/v1/predict", {"instances": [ROW]}, token=first)
        assert status == 429 and int(headers.get("retry-after", headers.get("Retry-After", "0"))) >= 1
        assert any(e[:3] == ("client-a", "serve.rate_limit", "deny") for e in events)
        # Another client has its own budget.
        assert server.request("POST", "/v1/predict", {"instances": [ROW]}, token=second)[0] == 200


@pytest.mark.parametrize(("instances", "fragment"), [
    ([{**ROW, "shoe_size": 44}], "unknown field 'shoe_size'"),
    ([{k: v for k, v in ROW.items() if k != "age"}], "missing field 'age'"),
    ([{**ROW, "age": "41"}], "'age' must be a finite number"),
    ([{**ROW, "age": True}], "'age' must be a finite number"),
    ([{**ROW, "sex": "unknown"}], "unseen category 'unknown'"),
    ([{**ROW, "purpose": 3}], "'purpose' must be a string"),
    (["not an object"], "instance 0 is not an object"),
])
def test_instances_are_validated_against_the_preprocessing(running: tuple[Server, str, list[Any]],
                                                           instances: list[Any], fragment: str) -> None:
    server, secret, _ = running
    code, body, _ = server.request("POST", "/v1/predict", {"instances": instances}, token=secret)
    assert code == 422 and fragment in body["error"]


def test_malformed_and_oversized_bodies(running: tuple[Server, str, list[Any]]) -> None:
    server, secret, _ = running
    assert server.request("POST", "/v1/predict", raw=b"{not json", token=secret)[0] == 400
    assert server.request("POST", "/v1/predict", raw=b"NaN", token=secret)[0] == 422
    assert server.request("POST", "/v1/predict", {"instances": []}, token=secret)[0] == 422
    assert server.request("POST", "/v1/predict", {"instances": [ROW] * 5}, token=secret)[0] == 413
    assert server.request("POST", "/v1/predict", raw=b" " * 5000, token=secret)[0] == 413


def test_tokens_are_stored_hashed_and_private(settings: Settings, tmp_path: Path) -> None:
    tokens = serving.TokenStore(tmp_path / "serving" / "tokens.json")
    secret = tokens.issue("frontend")
    text = tokens.path.read_text()
    assert secret not in text and len(json.loads(text)["tokens"][0]["sha256"]) == 64
    assert stat.S_IMODE(tokens.path.stat().st_mode) == 0o600
    assert tokens.authenticate(secret) == "frontend" and tokens.authenticate(secret + "x") is None
    assert tokens.revoke("frontend") and tokens.authenticate(secret) is None
    with pytest.raises(BadInput):
        tokens.issue("../../etc")


def test_the_rate_limiter_refills() -> None:
    now = [0.0]
    limiter = serving.RateLimiter(60, clock=lambda: now[0])
    assert all(limiter.allow("a")[0] for _ in range(60))
    allowed, wait = limiter.allow("a")
    assert not allowed and 0 < wait <= 1.0
    now[0] += 1.0
    assert limiter.allow("a")[0]


# -- only a verified model directory is ever loaded ---------------------------------------------------
def test_a_file_changed_after_deploy_is_refused(deployed: tuple[Release, Path], keys: Keys) -> None:
    _, location = deployed
    path = location / "model" / "config.json"
    os.chmod(path, 0o600)
    path.write_text(json.dumps({"architecture": "mlp", "threshold": 0.0}))
    with pytest.raises(VerificationError, match="the model does not match its signature: config.json changed"):
        serving.load_deployment(location, trust=trust(keys))


def test_a_stray_pickle_is_refused(deployed: tuple[Release, Path], keys: Keys) -> None:
    _, location = deployed
    (location / "model" / "weights.bin").write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n")
    with pytest.raises(VerificationError, match="weights.bin"):
        serving.load_deployment(location, trust=trust(keys))


def test_a_symlink_is_refused(deployed: tuple[Release, Path], keys: Keys) -> None:
    _, location = deployed
    (location / "model" / "MODEL_CARD.md").unlink()
    (location / "model" / "MODEL_CARD.md").symlink_to("/etc/passwd")
    with pytest.raises(BadInput, match="symbolic link"):
        serving.load_deployment(location, trust=trust(keys))


def test_a_different_pinned_digest_or_key_is_refused(deployed: tuple[Release, Path], keys: Keys,
                                                     tmp_path: Path) -> None:
    _, location = deployed
    with pytest.raises(VerificationError, match="not the expected"):
        serving.load_deployment(location, expected_digest="0" * 64, trust=trust(keys))
    stranger = make_keys(tmp_path / "stranger", "stranger")
    with pytest.raises(VerificationError, match="not trusted"):
        serving.load_deployment(location, trust=trust(stranger))


def test_the_health_probe_passes_for_a_good_model(deployed: tuple[Release, Path], keys: Keys) -> None:
    _, location = deployed
    result = serving.health_probe(location, trust=trust(keys))
    assert result.healthy and 0.0 <= result.details["probability"] <= 1.0


def test_another_signed_model_or_a_removed_attestation_is_refused(deployed: tuple[Release, Path], keys: Keys,
                                                                  tmp_path: Path) -> None:
    """A different model, validly signed by the trusted key, fails the pin; dropping the attestation
    the receipt names does not downgrade the check to signature-only."""
    import shutil

    from _release_fixtures import sign

    _, location = deployed
    other = make_model_dir(tmp_path / "other", seed=99)
    bundle = sign(other, keys, tmp_path)
    (location / "attestation.dsse.json").unlink()
    with pytest.raises(VerificationError, match="lacks its attestation attestation.dsse.json"):
        serving.load_deployment(location, trust=trust(keys))
    for path in (location / "model").iterdir():
        os.chmod(path, 0o600)
    shutil.rmtree(location / "model")
    shutil.copytree(other, location / "model")
    os.chmod(location / "model.sig", 0o600)
    (location / "model.sig").write_bytes(bundle)
    receipt = json.loads((location / "DEPLOYMENT.json").read_text())
    del receipt["attestation_file"]
    os.chmod(location / "DEPLOYMENT.json", 0o600)
    (location / "DEPLOYMENT.json").write_text(json.dumps(receipt))
    with pytest.raises(VerificationError, match="hashes to sha256:.*not the pinned sha256:"):
        serving.load_deployment(location, trust=trust(keys))
