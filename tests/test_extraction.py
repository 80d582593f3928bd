"""Model extraction (issue 15): a simulated attack against the real app, and honest traffic replayed.

Touches: a small torch model trained here on data/sample/german_credit.csv in the training stage's
format (safetensors + preprocessing.json, loaded by the training stage's loader), served by the real
Starlette app in-process with the extraction detector, budget and throttle on (bench/extraction_attack.py
holds the victim and the attacks). The attacker queries uniformly over the feature ranges (every
category equally) and trains a surrogate of the model's own family (an MLP on the answers): with the
detector off it reaches 90% agreement with the model on the test split within 3,200 queries; through
the app the token is flagged and throttled at a query count where it is still under 90%. A second
attacker holds 10 real training rows and queries perturbations of them (the Jacobian-style
augmentation near-data extraction uses; every query in-distribution), which only the PRADA test (Shapiro-Wilk over the minimum distances between a token's queries) can see.
Honest traffic is the test split itself, replayed by another token (and in shuffled orders).
Does not touch: an attacker who spreads seed perturbations over many tokens (the budget per token and
the rounding are what remain; see README).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _asgi import call

from secure_ml.release import serving

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extraction_attack import Victim, attack_run, domain_sweep, seed_perturbation  # noqa: E402

pytestmark = pytest.mark.slow  # trains a surrogate against the server


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    victim = Victim.fit(tmp_path_factory.mktemp("model"))
    return {"victim": victim, "model": victim.model, "prep": victim.prep, "train": victim.train,
            "rows": victim.test_rows, "X_test": victim.X_test, "truth": victim.truth,
            "tokens": serving.TokenStore(victim.directory / "tokens.json")}


def app_for(trained: dict[str, Any], events: list[Any]) -> Any:
    model = trained["model"]
    return serving.create_app(model, trained["tokens"], rate_per_minute=600, max_batch=256,
                              output=serving.OutputPolicy(decimals=2),
                              detector=serving.ExtractionDetector(model.spec), on_event=lambda *e: events.append(e))


def app_ask(app: Any, secret: str) -> Any:
    """The attack's questions through the real app: the answers it gives, and whether the token is flagged."""
    def ask(client: str, rows: list[dict[str, Any]]) -> tuple[list[float], bool]:
        status, body, _ = call(app, "POST", "/v1/predict", body={"instances": rows}, token=secret)
        assert status == 200, body
        return [p["probability"] for p in body["predictions"]], app.state.guard.flagged(client)
    return ask


def test_a_domain_sweep_that_would_reach_90_percent_is_flagged_well_before(trained: dict[str, Any]) -> None:
    """Synthetic queries over the feature ranges and a surrogate of the model's own family: unstopped, it
    reaches 90% agreement on the test split; through the app the detector flags it at under 90%."""
    victim = trained["victim"]
    unstopped = attack_run(victim, domain_sweep(victim, seed=1), queries=3200, ask=victim.ask(), batch=100,
                           checkpoints=(3200,))
    assert unstopped.flagged_at is None and unstopped.agreement(3200) >= 0.9, unstopped.curve
    secret = trained["tokens"].issue("attacker")
    events: list[Any] = []
    app = app_for(trained, events)
    stopped = attack_run(victim, domain_sweep(victim, seed=1), queries=100, ask=app_ask(app, secret),
                         checkpoints=())
    flags = [e for e in events if e[1] == "serve.extraction"]
    assert len(flags) == 1 and flags[0][0] == "attacker" and flags[0][2] == "throttle"   # audited once
    assert flags[0][3]["queries"] <= 50 and stopped.flagged_at == flags[0][3]["queries"], flags[0][3]
    assert stopped.agreement_at_flag is not None and stopped.agreement_at_flag < 0.9
    # Throttled: a tenth of the rate (60 a minute), so a burst of 61 more requests hits 429.
    row = next(domain_sweep(victim, seed=1))
    codes = [call(app, "POST", "/v1/predict", body={"instances": [row]}, token=secret)[0] for _ in range(61)]
    assert 429 in codes and codes[0] == 200


def test_honest_traffic_from_the_test_split_is_not_flagged(trained: dict[str, Any]) -> None:
    secret = trained["tokens"].issue("honest")
    events: list[Any] = []
    app = app_for(trained, events)
    rows = trained["rows"]
    for start in range(0, len(rows), 5):
        status, body, _ = call(app, "POST", "/v1/predict", body={"instances": rows[start:start + 5]}, token=secret)
        assert status == 200, body
    assert not [e for e in events if e[1] == "serve.extraction"]
    assert not app.state.guard.detector.flagged("honest")


def test_the_detector_is_bounded_and_sticky(trained: dict[str, Any]) -> None:
    spec = trained["model"].spec
    detector = serving.ExtractionDetector(spec, window=10, min_queries=10, max_clients=2)
    far = {**spec.example(), "credit_amount": 1e9}
    assert detector.observe("a", [spec.validate(far, 0)] * 9) is None
    verdict = detector.observe("a", [spec.validate(far, 0)])
    assert verdict is not None and verdict.atypical_share == 1.0 and detector.flagged("a")
    assert detector.observe("a", [spec.validate(far, 0)] * 10) is None       # flagged once
    for client in ("b", "c", "d"):
        detector.observe(client, [spec.validate(spec.example(), 0)])
    assert len(detector._recent) <= 2


def test_prada_flags_a_seed_perturbation_attack_before_90_percent_agreement(trained: dict[str, Any]) -> None:
    victim = trained["victim"]
    secret = trained["tokens"].issue("near-data")
    events: list[Any] = []
    app = app_for(trained, events)
    # 200 queries, 5 a request, each one of 10 real training rows with its numbers nudged by 0.3 std
    run = attack_run(victim, seed_perturbation(victim, seed=2), queries=200, ask=app_ask(app, secret),
                     client="near-data", checkpoints=(200,))
    flags = [e for e in events if e[1] == "serve.extraction"]
    assert len(flags) == 1 and flags[0][0] == "near-data" and flags[0][3]["test"] == "prada", flags
    assert flags[0][3]["shapiro_w"] < 0.70 and flags[0][3]["queries"] <= 100, flags[0][3]
    assert run.agreement_at_flag is not None and run.agreement_at_flag < 0.9, run
    # The distribution test alone never sees it: the same traffic with PRADA off is not flagged.
    plain = serving.ExtractionDetector(victim.model.spec, prada=False)
    rows = list(zip(range(200), seed_perturbation(victim, seed=2)))
    assert plain.observe("near-data", [victim.model.spec.validate(q, i) for i, q in rows]) is None


@pytest.mark.parametrize("seed", range(8))
def test_honest_traffic_in_any_order_passes_prada(trained: dict[str, Any], seed: int) -> None:
    spec = trained["model"].spec
    rows = [spec.validate(r, i) for i, r in enumerate(trained["rows"])]
    order = np.random.default_rng(seed).permutation(len(rows))
    detector = serving.ExtractionDetector(spec)
    assert all(detector.observe("honest", [rows[i] for i in order[start:start + 5]]) is None
               for start in range(0, len(rows), 5))
    # A monitor repeating one row is not an extraction either (repeats are not counted).
    assert detector.observe("monitor", [rows[0]] * 150) is None and not detector.flagged("monitor")
