"""The model server's Open Inference Protocol v2 REST routes, driven by a real v2 client (Triton's).

Touches: two models deployed through the real gate and loaded by secure_ml.release.served (the one
verification chain, each pinned by digest), a real uvicorn server on loopback, NVIDIA's
``tritonclient.http`` for health, readiness, metadata and inference (one input per column, INT64 /
FP64 / BYTES, as MLServer's pandas codec sends them), and raw HTTP for the refusals a correct
client cannot send: wrong datatypes, shapes that disagree with their data, missing or unknown
columns, the binary extension, undeployed models and versions, missing or wrong tokens, the
daily budget across /v1 and /v2.
Does not touch: the gRPC protocol, TLS (terminated in front of the server), Kubernetes.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from _release_fixtures import Keys, make_keys, make_model_dir, publish, release_for, trust
from tritonclient.utils import InferenceServerException

from secure_ml.errors import BadInput, VerificationError
from secure_ml.release import served, serving
from secure_ml.settings import Settings, init_home

pytestmark = pytest.mark.slow  # deploys two models through the release workflow, then serves them

ROWS = [{"age": 41, "credit_amount": 2500.0, "sex": "female", "purpose": "car"},
        {"age": 23, "credit_amount": 9100.5, "sex": "male", "purpose": "education"},
        {"age": 67, "credit_amount": 700.0, "sex": "female", "purpose": "other"}]


class Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")


def columns(rows: list[dict[str, Any]], **override: Any) -> dict[str, Any]:
    """A v2 request body, one input per column, the way MLServer's pandas codec encodes a DataFrame."""
    types = {"age": "INT64", "credit_amount": "FP64", "sex": "BYTES", "purpose": "BYTES"}
    inputs = [{"name": n, "datatype": t, "shape": [len(rows), 1], "data": [r[n] for r in rows]}
              for n, t in types.items()]
    return {"parameters": {"content_type": "pd"}, "inputs": inputs, **override}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two versions deployed through the gate; both served, each under its own name, pinned by digest."""
    root = tmp_path_factory.mktemp("v2")
    keys = make_keys(root / "keys")
    settings = Settings.from_env({"SECURE_ML_HOME": str(root / "home"), "SECURE_ML_ACTOR": "test-engineer"})
    init_home(settings)
    release = release_for(settings, keys)
    records = []
    for seed, version in ((0, "v1"), (1, "v2")):
        published = publish(settings, make_model_dir(root / f"m{seed}", seed=seed), keys, root / f"p{seed}")
        release.register(published.digest, published.evidence, actor="bob")
        release.approve(version, identity="carol")
        records.append(release.deploy(actor="dave"))
    first = records[0]
    listed = served.deployed_models(settings)
    older = served.DeployedModel("credit_v1", first.version, Path(first.location), first.model_digest)
    models = served.load_deployed([*listed, older], trust=trust(keys))
    return {"settings": settings, "keys": keys, "listed": listed, "older": older, "models": models}


@pytest.fixture(scope="module")
def server(deployed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    tokens = serving.TokenStore(tmp_path_factory.mktemp("tokens") / "tokens.json")
    secret = tokens.issue("frontend")
    app = serving.create_app(deployed["models"], tokens, rate_per_minute=10_000, max_batch=8)
    with Server(app) as running:
        yield running, secret


def test_the_deployed_list_names_the_local_deployment(deployed: dict[str, Any]) -> None:
    [model] = deployed["listed"]
    assert model.name == "german_credit" and model.version == "v2"
    assert [m.name for m in deployed["models"]] == ["german_credit", "credit_v1"]
    assert deployed["models"][0].model_digest == model.digest != deployed["models"][1].model_digest


def test_a_real_v2_client_sees_health_metadata_and_predictions(deployed: dict[str, Any],
                                                               server: tuple[Server, str]) -> None:
    running, secret = server
    auth = {"Authorization": f"Bearer {secret}"}
    client = triton.InferenceServerClient(url=f"127.0.0.1:{running.port}")
    assert client.is_server_live() and client.is_server_ready()            # probes carry no token
    assert client.is_model_ready("german_credit", headers=auth)
    assert client.is_model_ready("credit_v1", model_version="v1", headers=auth)
    metadata = client.get_model_metadata("german_credit", headers=auth)
    assert metadata["versions"] == ["v2"] and metadata["parameters"]["model_digest"] == deployed["listed"][0].digest
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {
        "age": "FP64", "credit_amount": "FP64", "sex": "BYTES", "purpose": "BYTES"}

    def infer(name: str) -> tuple[np.ndarray, np.ndarray]:
        inputs = []
        for column, datatype, values in (("age", "INT64", np.array([[r["age"]] for r in ROWS], dtype=np.int64)),
                                         ("credit_amount", "FP64", np.array([[r["credit_amount"]] for r in ROWS])),
                                         ("sex", "BYTES", np.array([[r["sex"].encode()] for r in ROWS], dtype=object)),
                                         ("purpose", "BYTES", np.array([[r["purpose"].encode()] for r in ROWS],
                                                                       dtype=object))):
            tensor = triton.InferInput(column, list(values.shape), datatype)
            tensor.set_data_from_numpy(values, binary_data=False)
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("probability", "label")]
        result = client.infer(name, inputs, outputs=outputs, headers=auth, request_id="r-1")
        assert result.get_response()["model_name"] == name and result.get_response()["id"] == "r-1"
        return result.as_numpy("probability"), result.as_numpy("label")

    probability, label = infer("german_credit")
    older, _ = infer("credit_v1")
    expected = deployed["models"][0].predict([deployed["models"][0].spec.validate(r, i) for i, r in enumerate(ROWS)])
    assert probability.shape == (3,) and np.allclose(probability, expected)
    assert list(label) == [int(p >= deployed["models"][0].threshold) for p in expected]
    assert not np.allclose(probability, older)                                # each name its own model
    # The same rows on /v1/predict (the default model) give the same answers.
    status, v1 = running.request("POST", "/v1/predict", {"instances": ROWS}, token=secret)
    assert status == 200 and np.allclose([p["probability"] for p in v1["predictions"]], probability)


def test_an_undeployed_model_or_version_is_a_404_naming_it(server: tuple[Server, str]) -> None:
    running, secret = server
    client = triton.InferenceServerClient(url=f"127.0.0.1:{running.port}")
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("breast_cancer", headers={"Authorization": f"Bearer {secret}"})
    assert raised.value.status() == "404" and "'breast_cancer' is not deployed" in raised.value.message()
    assert not client.is_model_ready("breast_cancer", headers={"Authorization": f"Bearer {secret}"})
    status, body = running.request("POST", "/v2/models/german_credit/versions/v9/infer", columns(ROWS), token=secret)
    assert status == 404 and "no deployed version 'v9'" in body["error"]


V2_PATHS = [("GET", "/v2"), ("GET", "/v2/models/german_credit"), ("GET", "/v2/models/german_credit/ready"),
            ("POST", "/v2/models/german_credit/infer"), ("GET", "/v2/models/breast_cancer/ready"),
            ("POST", "/v2/models/credit_v1/versions/v1/infer")]


@pytest.mark.parametrize(("method", "path"), V2_PATHS)
@pytest.mark.parametrize("token", [None, "not-a-token"])
def test_v2_paths_refuse_a_missing_or_wrong_token(server: tuple[Server, str], method: str, path: str,
                                                  token: str | None) -> None:
    running, _ = server
    status, body = running.request(method, path, columns(ROWS) if method == "POST" else None, token=token)
    # 401 before any model lookup: without a token nobody learns which models are deployed.
    assert status == 401 and body == {"error": "a valid bearer token is required"}


def _mutate(body: dict[str, Any], name: str, **changes: Any) -> dict[str, Any]:
    for tensor in body["inputs"]:
        if tensor["name"] == name:
            tensor.update(changes)
    return body


BAD = [
    ("wrong datatype for a number", lambda b: _mutate(b, "age", datatype="BYTES", data=["41", "23", "67"]), 422,
     "input 'age' has datatype 'BYTES'; it takes INT64 or FP64"),
    ("wrong datatype for a string", lambda b: _mutate(b, "sex", datatype="FP64"), 422,
     "input 'sex' has datatype 'FP64'; it takes BYTES"),
    ("value unlike its datatype", lambda b: _mutate(b, "age", data=[41, 23.5, 67]), 422,
     "input 'age' is INT64 but holds a float"),
    ("shape disagrees with data", lambda b: _mutate(b, "credit_amount", shape=[4, 1]), 422,
     "input 'credit_amount': shape [4, 1] holds 4 values, its data has 3"),
    ("shape of two columns", lambda b: _mutate(b, "age", shape=[3, 2]), 422, "shape must be [N] or [N, 1]"),
    ("columns of different lengths", lambda b: _mutate(b, "purpose", shape=[2], data=["car", "car"]), 422,
     "input 'purpose' has 2 rows, input 'age' has 3"),
    ("missing column", lambda b: {**b, "inputs": [t for t in b["inputs"] if t["name"] != "purpose"]}, 422,
     "missing input 'purpose'"),
    ("unknown column", lambda b: {**b, "inputs": [*b["inputs"], {"name": "salary", "datatype": "FP64",
                                                                  "shape": [3], "data": [1, 2, 3]}]}, 422,
     "unknown input 'salary'"),
    ("column twice", lambda b: {**b, "inputs": [*b["inputs"], b["inputs"][0]]}, 422, "input 'age' is given twice"),
    ("unseen category", lambda b: _mutate(b, "purpose", data=["car", "yacht", "car"]), 422,
     "instance 1: field 'purpose' has unseen category 'yacht'"),
    ("binary extension", lambda b: _mutate(b, "age", parameters={"binary_data_size": 24}), 400,
     "binary tensor data is not supported"),
    ("unknown output", lambda b: {**b, "outputs": [{"name": "logits"}]}, 422, "unknown output 'logits'"),
    ("too many rows", lambda b: _mutate(b, "age", shape=[9], data=list(range(9))), 413, "at most 8 rows"),
    ("no inputs", lambda b: {"inputs": []}, 422, 'body must be {"inputs"'),
]


@pytest.mark.parametrize(("name", "mutate", "status", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_v2_requests_are_refused_naming_what_is_wrong(server: tuple[Server, str], name: str, mutate: Any,
                                                          status: int, message: str) -> None:
    running, secret = server
    code, body = running.request("POST", "/v2/models/german_credit/infer", mutate(columns(ROWS)), token=secret)
    assert code == status and message in body["error"], body


def test_a_real_v2_client_gets_the_refusal_as_its_error(server: tuple[Server, str]) -> None:
    running, secret = server
    client = triton.InferenceServerClient(url=f"127.0.0.1:{running.port}")
    age = triton.InferInput("age", [1], "FP32")
    age.set_data_from_numpy(np.array([41.0], dtype=np.float32), binary_data=False)
    with pytest.raises(InferenceServerException) as raised:   # FP32 is a number: the missing columns are named
        client.infer("german_credit", [age], headers={"Authorization": f"Bearer {secret}"})
    assert raised.value.status() == "422" and "missing input 'credit_amount'" in raised.value.message()


def test_the_daily_budget_and_the_audit_cover_v2(deployed: dict[str, Any], tmp_path: Path) -> None:
    tokens = serving.TokenStore(tmp_path / "tokens.json")
    secret = tokens.issue("frontend")
    events: list[Any] = []
    app = serving.create_app(deployed["models"], tokens, daily_budget=5, on_event=lambda *e: events.append(e))
    with Server(app) as running:
        assert running.request("POST", "/v2/models/credit_v1/infer", columns(ROWS), token=secret)[0] == 200
        status, body = running.request("POST", "/v1/predict", {"instances": ROWS}, token=secret)
        assert status == 429 and "daily query budget exhausted (2 instances left today)" in body["error"]
        status, _ = running.request("POST", "/v2/models/german_credit/infer",
                                    _mutate(columns(ROWS), "sex", datatype="INT64"), token=secret)
    assert status == 422
    assert ("frontend", "serve.budget", "deny") in [e[:3] for e in events]
    denied = [e for e in events if e[1] == "serve.input"]
    assert denied and denied[0][3]["model"] == "german_credit" and "'sex'" in denied[0][3]["reason"]


def test_loading_is_all_or_nothing_and_pinned(deployed: dict[str, Any], tmp_path: Path) -> None:
    older = deployed["older"]
    copy = tmp_path / "copy"
    shutil.copytree(older.directory, copy)
    (copy / "model" / "MODEL_CARD.md").write_text("# changed after signing\n")
    tampered = served.DeployedModel("tampered", older.version, copy, older.digest)
    with pytest.raises(VerificationError):
        served.load_deployed([deployed["listed"][0], tampered], trust=trust(deployed["keys"]))
    other = served.DeployedModel("credit_v1", older.version, older.directory, deployed["listed"][0].digest)
    with pytest.raises(VerificationError, match="not the expected"):
        served.load_deployed([other], trust=trust(deployed["keys"]))
    with pytest.raises(BadInput, match="named twice"):
        served.check_names([older, older])
    with pytest.raises(BadInput, match="must be 1-63 lowercase"):
        served.check_names([served.DeployedModel("../x", "v1", older.directory, older.digest)])


def test_the_serve_command_loads_every_model_it_is_given(deployed: dict[str, Any]) -> None:
    from argparse import Namespace

    from secure_ml.cli.cmd_release import _served_models

    from secure_ml.security.verification import TrustPolicy

    settings, keys, older = deployed["settings"], deployed["keys"], deployed["older"]
    # Without --model the server trusts what config/security.yaml trusts: here, the test's signing key.
    [configured] = TrustPolicy.from_config(settings.load_config("security"), settings.home).public_keys
    configured.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(keys.public, configured)
    none = Namespace(model=None, model_dir=None, digest=None, public_key=None)
    assert [(m.name, m.version) for m in _served_models(settings, none, "german_credit")] == [("german_credit", "v2")]
    pinned = Namespace(model=[["credit_v1", str(older.directory), f"sha256:{older.digest}"]], model_dir=None,
                       digest=None, public_key=keys.public)
    [model] = _served_models(settings, pinned, "german_credit")
    assert (model.name, model.version, model.model_digest) == ("credit_v1", "v1", older.digest)
    with pytest.raises(BadInput, match="needs a directory and a digest"):
        _served_models(settings, Namespace(model=[["x", str(older.directory), older.digest]], model_dir=None,
                                           digest=None, public_key=keys.public), "german_credit")
    with pytest.raises(BadInput, match="need --public-key"):
        _served_models(settings, Namespace(model=None, model_dir=older.directory, digest=f"sha256:{older.digest}",
                                           public_key=None), "german_credit")


def test_the_rate_limit_covers_every_v2_path(deployed: dict[str, Any], tmp_path: Path) -> None:
    from _asgi import call

    tokens = serving.TokenStore(tmp_path / "tokens.json")
    secret = tokens.issue("frontend")
    app = serving.create_app(deployed["models"], tokens, rate_per_minute=3)
    codes = [call(app, "GET", "/v2/models/german_credit", token=secret)[0],
             call(app, "GET", "/v2/models/credit_v1/ready", token=secret)[0],
             call(app, "POST", "/v2/models/german_credit/infer", body=columns(ROWS), token=secret)[0]]
    status, body, headers = call(app, "POST", "/v2/models/german_credit/infer", body=columns(ROWS), token=secret)
    assert codes == [200, 200, 200] and status == 429 and body["error"] == "rate limit exceeded"
    assert int(headers["retry-after"]) >= 1
