"""Simulated model-extraction attacks against the served model, with the detector off and on.

    victim = Victim.fit(tmp_dir)                    # the German-credit MLP the tests serve
    run = attack_run(victim, domain_sweep(victim, seed=1), queries=3200, ask=victim.ask())   # detector off
    run.curve                                         # [(queries, surrogate agreement on the test split)]
    run = attack_run(victim, domain_sweep(victim, seed=1), queries=3200,
                     ask=victim.ask(ExtractionDetector(victim.model.spec)))
    run.flagged_at, run.agreement_at_flag            # where the detector flagged the token
    python -m bench.extraction_attack                 # the README table: each attack's curve (detector off), where the detector flags, honest replays

The victim is a small MLP (16 hidden units) trained on data/sample/german_credit.csv in the training
stage's format and loaded by its loader; answers are what the server returns (probabilities rounded
to two decimals, release.yaml ``serving.output``). The attacker trains a surrogate of the same family
(an MLP with 16 hidden units, on the answers as soft labels, in the model's feature encoding: the
worst case for us) and we measure its agreement with the model's labels on the test split.

Attacks (each a stream of query rows): ``domain_sweep``, points drawn uniformly over the numeric
ranges and every category (the synthetic queries Papernot et al. and Tramèr et al. use when the
attacker has no data), and ``seed_perturbation``, ten real rows nudged over and over (the
in-distribution queries of a Jacobian-style augmentation; only PRADA sees those). Honest traffic is
the test split replayed in shuffled orders.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secure_ml.release import serving
from secure_ml.training.features import DataSpec, Preprocessing
from secure_ml.training.model import MODEL_FORMAT, build_model
from secure_ml.training.predictor import load_predictor

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "german_credit.csv"
SPEC = DataSpec("risk", ["credit_amount", "duration", "age", "job"],
                ["sex", "housing", "saving_accounts", "checking_account", "purpose"])
CHECKPOINTS = (25, 50, 100, 200, 400, 800, 1600, 3200)
Row = dict[str, Any]
# ask(client, rows) -> (the answers' probabilities, whether the token is flagged now)
Ask = Callable[[str, list[Row]], tuple[list[float], bool]]


@dataclass
class Victim:
    """The served model, its preprocessing, the split it was trained on and its labels on the test split."""

    model: serving.LoadedModel
    prep: Preprocessing
    train: Any
    test_rows: list[Row]
    X_test: np.ndarray
    truth: np.ndarray
    directory: Path

    @classmethod
    def fit(cls, directory: Path) -> Victim:
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
        save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
                  str(directory / "model.safetensors"), metadata={"format": MODEL_FORMAT})
        (directory / "config.json").write_text(json.dumps({
            "format": MODEL_FORMAT, "architecture": "tabular-mlp", "inputs": prep.width, "hidden": [16],
            "dropout": 0.0, "outputs": 1, "threshold": 0.5}))
        (directory / "preprocessing.json").write_text(json.dumps(prep.to_json()))
        spec = serving.FeatureSpec.from_preprocessing(prep.to_json())
        model = serving.LoadedModel(directory, "cd" * 32, "v1", spec, load_predictor(directory))
        rows = test.drop(columns=[SPEC.label]).to_dict("records")
        truth = np.array(model.predict([spec.validate(r, i) for i, r in enumerate(rows)])) >= 0.5
        X_test, _ = prep.transform(test)
        return cls(model, prep, train, rows, X_test, truth, directory)

    def ask(self, detector: serving.ExtractionDetector | None = None,
            output: serving.OutputPolicy = serving.OutputPolicy(decimals=2)) -> Ask:
        """Answers as the server gives them (validated rows, rounded), through ``detector`` when given.
        Tests ask through the real app instead; this is the same parser, detector and output policy."""
        spec = self.model.spec

        def answer(client: str, rows: list[Row]) -> tuple[list[float], bool]:
            valid = [spec.validate(r, i) for i, r in enumerate(rows)]
            if detector is not None:
                detector.observe(client, valid)
            shown = [output.render(p, 0.5)["probability"] for p in self.model.predict(valid)]
            return shown, detector is not None and detector.flagged(client)
        return answer

    def agreement(self, queries: list[Row], answers: list[float], seed: int = 0) -> float:
        """Agreement with the model's labels on the test split of a same-family surrogate fitted to the answers."""
        import torch

        surrogate = fit_surrogate(self.prep, queries, answers, seed=seed)
        with torch.no_grad():
            guesses = (surrogate(torch.tensor(self.X_test)).squeeze(-1) >= 0).numpy()
        return float((guesses == self.truth).mean())


def fit_surrogate(prep: Preprocessing, queries: list[Row], answers: list[float], *, seed: int = 0,
                  hidden: int = 16, epochs: int = 300) -> Any:
    """An MLP like the victim's, trained on the answers as soft labels (binary cross-entropy)."""
    import pandas as pd
    import torch

    X, _ = prep.transform(pd.DataFrame(queries))
    torch.manual_seed(seed)
    surrogate = build_model(prep.width, [hidden], 0.0)
    optimiser = torch.optim.Adam(surrogate.parameters(), lr=0.01)
    inputs = torch.tensor(X)
    targets = torch.tensor(np.clip(np.asarray(answers, dtype=np.float32), 0.0, 1.0))
    for _ in range(epochs):
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(surrogate(inputs).squeeze(-1), targets).backward()
        optimiser.step()
    return surrogate


def domain_sweep(victim: Victim, *, seed: int) -> Iterator[Row]:
    """Uniform over the numeric features' ranges (whole numbers) and every category equally."""
    rng = np.random.default_rng(seed)
    numeric = victim.train[list(SPEC.numeric)]
    low, high = numeric.min(), numeric.max()
    while True:
        yield {**{c: float(round(rng.uniform(low[c], high[c]))) for c in SPEC.numeric},
               **{c: str(rng.choice(victim.prep.categorical[c])) for c in SPEC.categorical}}


def seed_perturbation(victim: Victim, *, seed: int, seeds: int = 10, nudge: float = 0.3) -> Iterator[Row]:
    """``seeds`` real training rows, each query one of them with its numbers nudged by ``nudge`` stds."""
    rng = np.random.default_rng(seed)
    rows = victim.train.drop(columns=[SPEC.label]).sample(seeds, random_state=1).to_dict("records")
    std = victim.train[list(SPEC.numeric)].std()
    n = 0
    while True:
        base = rows[n % len(rows)]
        n += 1
        yield {**base, **{c: float(base[c]) + float(rng.normal(0, nudge * std[c])) for c in SPEC.numeric}}


ATTACKS: dict[str, Callable[..., Iterator[Row]]] = {"domain sweep": domain_sweep, "seed perturbation": seed_perturbation}


@dataclass
class AttackRun:
    curve: list[tuple[int, float]] = field(default_factory=list)
    flagged_at: int | None = None            # queries answered when the token was first flagged
    agreement_at_flag: float | None = None

    def agreement(self, queries: int) -> float:
        return dict(self.curve)[queries]


def attack_run(victim: Victim, stream: Iterator[Row], *, queries: int, ask: Ask, client: str = "attacker",
               batch: int = 5, checkpoints: tuple[int, ...] = CHECKPOINTS, seed: int = 0) -> AttackRun:
    """Send ``queries`` rows from ``stream`` in requests of ``batch``; the surrogate's agreement at each
    checkpoint, and at the request that got the token flagged (the attack goes on: a flag throttles)."""
    run = AttackRun()
    sent: list[Row] = []
    answers: list[float] = []
    wanted = [c for c in checkpoints if c <= queries]
    while len(sent) < queries:
        rows = [next(stream) for _ in range(min(batch, queries - len(sent)))]
        shown, flagged = ask(client, rows)
        sent += rows
        answers += shown
        if flagged and run.flagged_at is None:
            run.flagged_at = len(sent)
            run.agreement_at_flag = victim.agreement(sent, answers, seed)
        while wanted and len(sent) >= wanted[0]:
            run.curve.append((wanted[0], victim.agreement(sent[:wanted[0]], answers[:wanted[0]], seed)))
            wanted.pop(0)
    return run


def honest_replays(victim: Victim, orders: int = 8, batch: int = 5) -> list[bool]:
    """The test split replayed by one token per order (shuffled); True where the detector flagged it."""
    flags = []
    for order in range(orders):
        detector = serving.ExtractionDetector(victim.model.spec)
        ask = victim.ask(detector)
        rows = [victim.test_rows[i] for i in np.random.default_rng(order).permutation(len(victim.test_rows))]
        for start in range(0, len(rows), batch):
            ask("honest", rows[start:start + batch])
        flags.append(detector.flagged("honest"))
    return flags


def main() -> int:
    import tempfile

    import torch

    torch.set_num_threads(1)    # small matrices: one thread is faster, and the machine is shared
    with tempfile.TemporaryDirectory(prefix="secure-ml-extraction-") as tmp:
        victim = Victim.fit(Path(tmp))
        print("| attack | " + " | ".join(f"{c} q" for c in CHECKPOINTS) + " | detector on: flagged at (agreement then) |")
        print("| --- | " + " | ".join("---:" for _ in CHECKPOINTS) + " | --- |")
        for name, attack in ATTACKS.items():
            # The same queries with the detector on: the answers are the same, so only where it flags differs.
            on = attack_run(victim, attack(victim, seed=1), queries=CHECKPOINTS[-1], checkpoints=(),
                            ask=victim.ask(serving.ExtractionDetector(victim.model.spec)))
            off = attack_run(victim, attack(victim, seed=1), queries=CHECKPOINTS[-1], ask=victim.ask(), batch=100)
            flag = "never" if on.flagged_at is None else f"{on.flagged_at} q ({on.agreement_at_flag:.3f})"
            print(f"| {name} | " + " | ".join(f"{a:.3f}" for _, a in off.curve) + f" | {flag} |", flush=True)
        flags = honest_replays(victim)
        print(f"honest: the test split ({len(victim.test_rows)} rows) replayed in {len(flags)} orders: "
              f"{sum(flags)} flagged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
