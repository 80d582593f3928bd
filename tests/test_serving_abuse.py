"""The model server under abuse (issue 15): bad tokens, hostile bodies, budgets and output precision.

Touches: the real Starlette app (secure_ml.release.serving) called in-process over ASGI, serving a
real safetensors model in the training stage's format (loaded by the training stage's own loader),
writing to a real hash-chained audit log. Property-based tests (hypothesis) throw arbitrary bytes,
JSON values and instances at /v1/predict: only 200, 400, 413, 422 or 429 may come back.
Does not touch: the verification chain (tests/test_serving.py, tests/test_verification.py) or a real
socket (tests/test_serving.py runs uvicorn); throughput (bench/bench_serving.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from _asgi import call
from _release_fixtures import CATEGORICAL, NUMERIC, make_model_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_ml.release import serving
from secure_ml.settings import Settings
from secure_ml.training.predictor import load_predictor

pytestmark = pytest.mark.slow  # drives the server with hypothesis and schemathesis

ROW = {"age": 41, "credit_amount": 2500.0, "sex": "female", "purpose": "car"}
EXAMPLES = 2000 if os.environ.get("FUZZ") else 30
OK_STATUSES = {200, 400, 413, 422, 429}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> serving.LoadedModel:
    directory = make_model_dir(tmp_path_factory.mktemp("model") / "m")
    spec = serving.FeatureSpec.from_preprocessing(json.loads((directory / "preprocessing.json").read_text()))
    return serving.LoadedModel(directory, "ab" * 32, "v1", spec, load_predictor(directory))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[serving.TokenStore, str]:
    store = serving.TokenStore(tmp_path_factory.mktemp("tokens") / "tokens.json")
    return store, store.issue("frontend")


def audited_app(model: serving.LoadedModel, tokens: serving.TokenStore, settings: Settings,
                **kwargs: Any) -> tuple[Any, Any]:
    """The app wired to the audit log the way `secure-ml serve` wires it."""
    audit = settings.audit_log()

    def on_event(client: str, action: str, outcome: str, details: dict[str, Any]) -> None:
        audit.record(client, action, subject=model.version, outcome=outcome, details=details)

    return serving.create_app(model, tokens, on_event=on_event, **kwargs), audit


def audit_entries(settings: Settings) -> list[dict[str, Any]]:
    path = settings.home / "audit" / "audit.jsonl"
    candidates = [path] if path.exists() else sorted(settings.home.rglob("*.jsonl"))
    return [json.loads(line) for p in candidates for line in p.read_text().splitlines() if line.strip()]


# -- authentication failures: counted, limited, summarised ------------------------------------------
def test_300_bad_tokens_write_one_summary_and_are_limited(model: serving.LoadedModel,
                                                          tokens: tuple[serving.TokenStore, str],
                                                          settings: Settings) -> None:
    store, secret = tokens
    app, _ = audited_app(model, store, settings, auth_failures=serving.AuthFailures(window_s=3600, max_per_window=20))
    before = len(audit_entries(settings))
    codes = [call(app, "POST", "/v1/predict", body={"instances": [ROW]}, token=f"guess-{i}",
                  address="203.0.113.9")[0] for i in range(300)]
    assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}
    # The right token still works, from another address and from the guesser's (a shared NAT).
    assert call(app, "POST", "/v1/predict", body={"instances": [ROW]}, token=secret)[0] == 200
    assert call(app, "POST", "/v1/predict", body={"instances": [ROW]}, token=secret, address="203.0.113.9")[0] == 200
    assert call(app, "POST", "/v1/predict", body={"instances": [ROW]}, token="x", address="198.51.100.1")[0] == 401
    assert len(audit_entries(settings)) == before      # nothing written per request
    app.state.guard.write_summaries(app.state.guard.failures.drain(force=True))
    written = audit_entries(settings)[before:]
    assert [e["actor"] for e in written] == ["anonymous@198.51.100.1", "anonymous@203.0.113.9"]
    entry = written[1]
    assert entry["actor"] == "anonymous@203.0.113.9" and entry["action"] == "serve.auth"
    assert entry["details"]["failures"] == 20 and entry["details"]["refused_over_limit"] == 280
    assert "guess-" not in json.dumps(entry)            # never the presented token


def test_one_summary_per_address_per_window_and_bounded_addresses() -> None:
    now = [1000.0]
    failures = serving.AuthFailures(window_s=60, max_per_window=5, max_addresses=3, clock=lambda: now[0])
    for address in ["a", "b", "c", "d", "e", "a", "a"]:
        assert failures.fail(address) == []
    now[0] += 60
    ended = failures.fail("a")
    # d and e share the "other" counter: at most max_addresses + 1 entries per window.
    assert [(s.address, s.failures) for s in ended] == [("a", 3), ("b", 1), ("c", 1), ("other", 2)]
    assert failures.drain(force=True)[0].failures == 1 and failures.drain(force=True) == []


def test_an_address_over_the_limit_is_refused_until_the_window_ends() -> None:
    now = [0.0]
    failures = serving.AuthFailures(window_s=10, max_per_window=2, clock=lambda: now[0])
    failures.fail("x")
    failures.fail("x")
    blocked, wait, _ = failures.blocked("x")
    assert blocked and 0 < wait <= 10
    now[0] = 10.0
    blocked, _, ended = failures.blocked("x")
    assert not blocked and [(s.address, s.failures, s.refused) for s in ended] == [("x", 2, 1)]


def test_healthz_without_a_token_says_only_up(model: serving.LoadedModel,
                                              tokens: tuple[serving.TokenStore, str]) -> None:
    store, secret = tokens
    app = serving.create_app(model, store)
    assert call(app, "GET", "/healthz")[1] == {"status": "ok"}
    assert call(app, "GET", "/healthz", token="wrong")[1] == {"status": "ok"}
    body = call(app, "GET", "/healthz", token=secret)[1]
    assert body["model_digest"] == "ab" * 32 and body["version"] == "v1"


# -- extraction defences: budget and precision ------------------------------------------------------
def test_the_daily_budget_counts_instances_per_token(model: serving.LoadedModel,
                                                     tokens: tuple[serving.TokenStore, str]) -> None:
    store, secret = tokens
    events: list[Any] = []
    app = serving.create_app(model, store, daily_budget=5, on_event=lambda *e: events.append(e))
    assert call(app, "POST", "/v1/predict", body={"instances": [ROW] * 4}, token=secret)[0] == 200
    status, body, headers = call(app, "POST", "/v1/predict", body={"instances": [ROW] * 2}, token=secret)
    assert status == 429 and "daily query budget exhausted (1 instances left today)" in body["error"]
    assert int(headers["retry-after"]) > 0
    assert call(app, "POST", "/v1/predict", body={"instances": [ROW]}, token=secret)[0] == 200
    assert call(app, "POST", "/v1/predict", body={"instances": [ROW]}, token=secret)[0] == 429
    assert [e[1:3] for e in events].count(("serve.budget", "deny")) == 2


def test_the_budget_resets_each_day() -> None:
    day = ["2026-11-30"]
    budget = serving.DailyBudget(3, today=lambda: day[0])
    assert budget.charge("t", 3) == (True, 0) and budget.charge("t", 1) == (False, 0)
    day[0] = "2026-12-01"
    assert budget.charge("t", 1) == (True, 2)


@pytest.mark.parametrize(("config", "keys", "decimals"), [
    (None, {"probability", "label"}, None),
    ({"decimals": 2}, {"probability", "label"}, 2),
    ({"label_only": True}, {"label"}, None),
])
def test_output_precision(model: serving.LoadedModel, tokens: tuple[serving.TokenStore, str],
                          config: dict[str, Any] | None, keys: set[str], decimals: int | None) -> None:
    store, secret = tokens
    app = serving.create_app(model, store, output=serving.OutputPolicy.from_config(config))
    status, body, _ = call(app, "POST", "/v1/predict", body={"instances": [ROW, {**ROW, "age": 70}]}, token=secret)
    assert status == 200
    for prediction in body["predictions"]:
        assert set(prediction) == keys
        if decimals is not None:
            assert prediction["probability"] == round(prediction["probability"], decimals)


@pytest.mark.parametrize("config", [{"decimals": -1}, {"decimals": "2"}, {"label_only": "yes"}, {"digits": 2}])
def test_a_bad_output_policy_is_one_line(config: dict[str, Any]) -> None:
    from secure_ml.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="serving.output"):
        serving.OutputPolicy.from_config(config)


# -- no input yields a 500 -----------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "status"), [
    (b'{"instances": [{"age": ' + b"9" * 400 + b', "credit_amount": 1, "sex": "male", "purpose": "car"}]}', 422),
    (b'{"instances": [{"age": -' + b"9" * 400 + b', "credit_amount": 1, "sex": "male", "purpose": "car"}]}', 422),
    (b'{"instances": [{"age": ' + b"9" * 5000 + b', "credit_amount": 1, "sex": "male", "purpose": "car"}]}', 400),
    (b"[" * 5000 + b"]" * 5000, 400),
    (b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    (b'{"instances": [{"age": 1e999, "credit_amount": 1, "sex": "male", "purpose": "car"}]}', 422),
    (b"\xff\xfe\x00", 400),
    (b"", 400),
])
def test_huge_numbers_and_deep_nesting_are_refused_not_500(model: serving.LoadedModel,
                                                           tokens: tuple[serving.TokenStore, str],
                                                           raw: bytes, status: int) -> None:
    store, secret = tokens
    app = serving.create_app(model, store, max_body_bytes=1 << 16)
    code, body, _ = call(app, "POST", "/v1/predict", raw=raw, token=secret)
    assert code == status and isinstance(body["error"], str) and "\n" not in body["error"]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20)
FIELD_VALUE = st.one_of(st.integers(), st.floats(), st.text(max_size=10), st.none(), st.booleans(),
                        st.sampled_from([c for cs in CATEGORICAL.values() for c in cs]),
                        st.integers(min_value=10**300, max_value=10**320))
INSTANCE = st.fixed_dictionaries({name: FIELD_VALUE for name in [*NUMERIC, *CATEGORICAL]},
                                 optional={"extra": FIELD_VALUE})


@pytest.fixture(scope="module")
def fuzz_app(model: serving.LoadedModel, tokens: tuple[serving.TokenStore, str]) -> tuple[Any, str]:
    store, secret = tokens
    return serving.create_app(model, store, rate_per_minute=10**9, max_batch=8, max_body_bytes=1 << 14), secret


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=300))
def test_any_bytes_get_a_clean_answer(fuzz_app: tuple[Any, str], raw: bytes) -> None:
    app, secret = fuzz_app
    status, body, _ = call(app, "POST", "/v1/predict", raw=raw, token=secret)
    assert status in OK_STATUSES and (status == 200 or isinstance(body["error"], str))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=JSON)
def test_any_json_value_gets_a_clean_answer(fuzz_app: tuple[Any, str], value: Any) -> None:
    app, secret = fuzz_app
    for payload in (value, {"instances": value}, {"instances": [value]}):
        assert call(app, "POST", "/v1/predict", raw=json.dumps(payload).encode(), token=secret)[0] in OK_STATUSES


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(instances=st.lists(INSTANCE, min_size=1, max_size=10))
def test_near_valid_instances_are_answered_or_refused_by_field(fuzz_app: tuple[Any, str],
                                                               instances: list[dict[str, Any]]) -> None:
    app, secret = fuzz_app
    status, body, _ = call(app, "POST", "/v1/predict", body={"instances": instances}, token=secret)
    assert status in {200, 413, 422}, body
    if status == 200:
        assert all(0.0 <= p["probability"] <= 1.0 for p in body["predictions"])
    elif status == 422:
        assert body["error"].startswith("instance ")


def test_the_published_openapi_document_describes_the_contract(fuzz_app: tuple[Any, str]) -> None:
    app, _ = fuzz_app
    status, document, _ = call(app, "GET", "/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.")
    request = document["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    instance = request["properties"]["instances"]["items"]
    assert set(instance["required"]) == {*NUMERIC, *CATEGORICAL} and instance["additionalProperties"] is False
    assert instance["properties"]["sex"]["enum"] == CATEGORICAL["sex"]


# -- schemathesis against the published OpenAPI document -----------------------------------------------
def _schemathesis_app(tmp: Path) -> tuple[Any, str]:
    directory = make_model_dir(tmp / "m")
    spec = serving.FeatureSpec.from_preprocessing(json.loads((directory / "preprocessing.json").read_text()))
    model = serving.LoadedModel(directory, "ab" * 32, "v1", spec, load_predictor(directory))
    store = serving.TokenStore(tmp / "tokens.json")
    secret = store.issue("schemathesis")
    return serving.create_app(model, store, rate_per_minute=10**9, max_batch=8, max_body_bytes=1 << 14), secret


def test_schemathesis_finds_no_server_error_or_contract_breach(tmp_path: Path) -> None:
    """Generated from /openapi.json (valid and invalid bodies, with and without the token): no 5xx,
    every status documented, every response matches its schema."""
    import schemathesis
    from hypothesis import given as st_given
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    app, secret = _schemathesis_app(tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    for operation in (schema["/v1/predict"]["POST"], schema["/healthz"]["GET"]):
        strategy = operation.as_strategy()

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @st_given(case=strategy)
        def run(case: Any) -> None:
            for headers in ({"Authorization": f"Bearer {secret}"}, {}):
                case.call_and_validate(headers=headers, checks=checks)

        run()
