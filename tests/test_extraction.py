"""Model extraction (issue 15): a simulated attack against the real app, and honest traffic replayed.

Touches: a small torch model trained here on data/sample/german_credit.csv in the training stage's
format (safetensors + preprocessing.json, loaded by the training stage's loader), served by the real
Starlette app in-process with the extraction detector, budget and throttle on. The attacker queries
uniformly over the training ranges (every category equally) and trains a surrogate (scikit-learn
Ridge on the logits of the answers); after each request we measure the surrogate's agreement with the
model on the test split. A second attacker holds 10 real training rows and queries perturbations of
them (the Jacobian-style augmentation near-data extraction uses; every query in-distribution), which
only the PRADA test (Shapiro-Wilk over the minimum distances between a token's queries) can see.
Honest traffic is the test split itself, replayed by another token (and in shuffled orders).
Does not touch: an attacker who spreads seed perturbations over many tokens (the budget per token and
the rounding are what remain; see README).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _asgi import call

from secure_ml.release import serving
from secure_ml.training.features import DataSpec, Preprocessing
from secure_ml.training.model import MODEL_FORMAT, build_model
from secure_ml.training.predictor import load_predictor

pytestmark = pytest.mark.slow  # trains a surrogate against the server

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "german_credit.csv"
SPEC = DataSpec("risk", ["credit_amount", "duration", "age", "job"],
                         ["sex", "housing", "saving_accounts", "checking_account", "purpose"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    frame = pd.read_csv(SAMPLE)
    order = np.random.default_rng(0).permutation(len(frame))
    train, test = frame.iloc[order[:800]], frame.iloc[order[800:]]
    prep = Preprocessing.fit(train, SPEC)
    X, _ = prep.transform(train)
    torch.manual_seed(0)
    net = build_model(prep.width, [16], 0.0)
    optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
    inputs, labels = torch.tensor(X), torch.tensor(prep.labels(train))
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(inputs).squeeze(-1), labels).backward()
        optimiser.step()
    directory = tmp_path_factory.mktemp("model")
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
              str(directory / "model.safetensors"), metadata={"format": MODEL_FORMAT})
    (directory / "config.json").write_text(json.dumps({
        "format": MODEL_FORMAT, "architecture": "tabular-mlp", "inputs": prep.width, "hidden": [16],
        "dropout": 0.0, "outputs": 1, "threshold": 0.5}))
    (directory / "preprocessing.json").write_text(json.dumps(prep.to_json()))
    spec = serving.FeatureSpec.from_preprocessing(prep.to_json())
    model = serving.LoadedModel(directory, "cd" * 32, "v1", spec, load_predictor(directory))
    rows = test.drop(columns=[SPEC.label]).to_dict("records")
    labels_on_test = np.array(model.predict([spec.validate(r, i) for i, r in enumerate(rows)])) >= 0.5
    X_test, _ = prep.transform(test)
    return {"model": model, "prep": prep, "train": train, "rows": rows, "X_test": X_test, "truth": labels_on_test,
            "tokens": serving.TokenStore(directory / "tokens.json")}


def app_for(trained: dict[str, Any], events: list[Any]) -> Any:
    model = trained["model"]
    return serving.create_app(model, trained["tokens"], rate_per_minute=600, max_batch=256,
                              detector=serving.ExtractionDetector(model.spec), on_event=lambda *e: events.append(e))


def test_the_detector_throttles_a_surrogate_attack_before_90_percent_agreement(trained: dict[str, Any]) -> None:
    from sklearn.linear_model import Ridge

    prep, train = trained["prep"], trained["train"]
    secret = trained["tokens"].issue("attacker")
    events: list[Any] = []
    app = app_for(trained, events)
    rng = np.random.default_rng(1)
    low, high = train[list(SPEC.numeric)].min(), train[list(SPEC.numeric)].max()
    queries: list[dict[str, Any]] = []
    answers: list[float] = []
    agreement_at_flag, history = None, []
    for _ in range(60):       # 300 queries, 5 a request
        batch = [{**{c: float(rng.uniform(low[c], high[c])) for c in SPEC.numeric},
                  **{c: str(rng.choice(prep.categorical[c])) for c in SPEC.categorical}} for _ in range(5)]
        status, body, _ = call(app, "POST", "/v1/predict", body={"instances": batch}, token=secret)
        assert status == 200, body
        queries += batch
        answers += [p["probability"] for p in body["predictions"]]
        import pandas as pd

        X, _ = prep.transform(pd.DataFrame(queries))
        p = np.clip(np.array(answers), 1e-6, 1 - 1e-6)
        surrogate = Ridge(alpha=1e-3).fit(X, np.log(p / (1 - p)))
        agreement = float(((surrogate.predict(trained["X_test"]) >= 0) == trained["truth"]).mean())
        history.append(agreement)
        if agreement_at_flag is None and any(e[1] == "serve.extraction" for e in events):
            agreement_at_flag = agreement
    flags = [e for e in events if e[1] == "serve.extraction"]
    assert len(flags) == 1 and flags[0][0] == "attacker" and flags[0][2] == "throttle"   # audited once
    assert flags[0][3]["queries"] <= 50, flags[0][3]
    assert agreement_at_flag is not None and agreement_at_flag < 0.9, history
    # Throttled: a tenth of the rate (60 a minute), so a burst of 61 more requests hits 429.
    codes = [call(app, "POST", "/v1/predict", body={"instances": [queries[0]]}, token=secret)[0] for _ in range(61)]
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


def _surrogate_agreement(trained: dict[str, Any], queries: list[dict[str, Any]], answers: list[float]) -> float:
    import pandas as pd
    from sklearn.linear_model import Ridge

    X, _ = trained["prep"].transform(pd.DataFrame(queries))
    p = np.clip(np.array(answers), 1e-6, 1 - 1e-6)
    surrogate = Ridge(alpha=1e-3).fit(X, np.log(p / (1 - p)))
    return float(((surrogate.predict(trained["X_test"]) >= 0) == trained["truth"]).mean())


def test_prada_flags_a_seed_perturbation_attack_before_90_percent_agreement(trained: dict[str, Any]) -> None:
    train = trained["train"]
    secret = trained["tokens"].issue("near-data")
    events: list[Any] = []
    app = app_for(trained, events)
    rng = np.random.default_rng(2)
    seeds = train.drop(columns=[SPEC.label]).sample(10, random_state=1).to_dict("records")
    std = train[list(SPEC.numeric)].std()
    queries: list[dict[str, Any]] = []
    answers: list[float] = []
    agreement_at_flag, history = None, []
    for step in range(40):       # 200 queries, 5 a request, each a seed row with its numbers nudged
        batch = [{**seed, **{c: float(seed[c]) + float(rng.normal(0, 0.3 * std[c])) for c in SPEC.numeric}}
                 for seed in (seeds[(5 * step + i) % len(seeds)] for i in range(5))]
        status, body, _ = call(app, "POST", "/v1/predict", body={"instances": batch}, token=secret)
        assert status == 200, body
        queries += batch
        answers += [p["probability"] for p in body["predictions"]]
        history.append(_surrogate_agreement(trained, queries, answers))
        if agreement_at_flag is None and any(e[1] == "serve.extraction" for e in events):
            agreement_at_flag = history[-1]
    flags = [e for e in events if e[1] == "serve.extraction"]
    assert len(flags) == 1 and flags[0][0] == "near-data" and flags[0][3]["test"] == "prada", flags
    assert flags[0][3]["shapiro_w"] < 0.70 and flags[0][3]["queries"] <= 100, flags[0][3]
    assert agreement_at_flag is not None and agreement_at_flag < 0.9, history
    # The distribution test alone never sees it: the same traffic with PRADA off is not flagged.
    plain = serving.ExtractionDetector(trained["model"].spec, prada=False)
    assert plain.observe("near-data", [trained["model"].spec.validate(q, i) for i, q in enumerate(queries)]) is None


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
