"""The training chain (Proof-of-Learning spot checks) and the fast loop: replay, tampering, detection, CLI.

Touches: real torch training of the sample's train split (4 epochs, a state every epoch: 4
segments), the chain file in a real model directory, segment replay both in-process and in the
real training sandbox (one start for all segments), a real store, registry, model-signing bundle
and DSSE attestation for ``secure-ml verify-training`` (run in-process through its main()), and
the pre-issue-17 loop kept in bench/baseline_loop.py.

Does not touch: Dagster (test_training_stage.py runs the check there), a GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from secure_ml.data import splitting
from secure_ml.errors import BadInput, IntegrityError
from secure_ml.training import chain as chain_
from secure_ml.training.config import TrainingConfig
from secure_ml.training.features import DataSpec, Preprocessing
from secure_ml.training.proof import verify_segments
from secure_ml.training.sandbox import IsolationPolicy
from secure_ml.training.trainer import fit, train_model
from tests.conftest import SAMPLE_CSV

pytestmark = [pytest.mark.timeout(180)]
SPEC = DataSpec("risk", ["job", "credit_amount", "duration", "age"],
                ["sex", "housing", "saving_accounts", "checking_account", "purpose"])
CONFIG = TrainingConfig(epochs=4, checkpoint_every=1)


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    return splitting.split(pd.read_csv(SAMPLE_CSV), "risk", test_fraction=0.2, seed=20261123)[0]


@pytest.fixture(scope="module")
def trained(train: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chain") / "model"
    train_model(train, SPEC, CONFIG, out, isolation=None, provenance={"train_sha256": "a" * 64})
    return out


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def _forge(model_dir: Path, epoch: int, change: Any) -> None:
    """A dishonest trainer: changes the state at ``epoch`` and records the new state's digest, consistently."""
    states, _ = chain_.unpack((model_dir / chain_.CHAIN_FILE).read_bytes())
    change(states[epoch])
    import torch

    as_torch = {e: {k: torch.from_numpy(v.copy()) for k, v in s.items()} for e, s in states.items()}
    (model_dir / chain_.CHAIN_FILE).write_bytes(chain_.pack(as_torch))
    record = json.loads((model_dir / "training_record.json").read_text())
    record["result"]["chain"] = chain_.TrainingChain(states).entries()
    (model_dir / "training_record.json").write_text(json.dumps(record))


@pytest.mark.slow  # starts the training sandbox (a torch import inside it)
def test_the_chain_records_every_state_and_every_segment_replays_to_it_in_one_sandbox(
        trained: Path, train: pd.DataFrame) -> None:
    record = json.loads((trained / "training_record.json").read_text())
    assert [e["epoch"] for e in record["result"]["chain"]] == [0, 1, 2, 3, 4]
    chain = chain_.TrainingChain.from_bytes((trained / chain_.CHAIN_FILE).read_bytes())
    assert chain.entries() == record["result"]["chain"] and chain.segments == [(0, 1), (1, 2), (2, 3), (3, 4)]
    report = verify_segments(trained, train, k=10, run_id="run-1", isolation=IsolationPolicy())
    assert report.passed and report.checked == chain.segments and report.mismatched == []
    assert report.isolation["isolated"] is True
    assert "re-executed 4 of 4 segments" in report.reason()
    assert report.metadata()["detection_probability"]["one_faked_segment_exact"] == 1.0


def test_a_faked_segment_is_caught_when_chosen_and_the_probability_is_stated(
        trained: Path, train: pd.DataFrame, tmp_path: Path) -> None:
    forged = _copy(trained, tmp_path)
    # Epoch 2's weights nudged (training skipped or altered), the chain re-signed by the trainer consistently.
    _forge(forged, 2, lambda state: state["model.layers.0.weight"].__iadd__(np.float32(1e-3)))
    honest = verify_segments(forged, train, k=1, run_id="r", isolation=None, segments=[0])
    assert honest.passed  # segment 0-1 was not faked
    caught = verify_segments(forged, train, k=1, run_id="r", isolation=None, segments=[1, 2])
    assert not caught.passed and caught.mismatched == [(1, 2), (2, 3)]
    assert "epochs 1-2, epochs 2-3 did not reach the state the chain records" in caught.reason()
    # Chosen from the run id hashed with the data digest: the same inputs pick the same segments, others differ.
    picks = {tuple(chain_.choose_segments(4, 2, run_id=f"run-{i}", data_sha256="a" * 64)) for i in range(40)}
    assert chain_.choose_segments(4, 2, run_id="x", data_sha256="a" * 64) == \
        chain_.choose_segments(4, 2, run_id="x", data_sha256="a" * 64)
    assert len(picks) == 6  # every pair of 4 segments comes up
    assert chain_.detection_probability(0.1, 3) == pytest.approx(0.271)
    assert chain_.exact_detection(4, 2, 2) == pytest.approx(1 - 1 / 6)
    # Across random run ids, a check of k = 2 catches 2 faked segments of 4 as often as stated (5/6).
    runs = [verify_segments(forged, train, k=2, run_id=f"check-{i}", isolation=None).passed for i in range(12)]
    assert 0 < runs.count(False) < 12


def test_a_tampered_chain_wrong_weights_or_other_data_are_refused_in_one_line(
        trained: Path, train: pd.DataFrame, tmp_path: Path) -> None:
    tampered = _copy(trained, tmp_path)
    states, _ = chain_.unpack((tampered / chain_.CHAIN_FILE).read_bytes())
    import torch

    states[3]["model.layers.0.bias"][0] += 1
    as_torch = {e: {k: torch.from_numpy(v.copy()) for k, v in s.items()} for e, s in states.items()}
    (tampered / chain_.CHAIN_FILE).write_bytes(chain_.pack(as_torch))
    with pytest.raises(IntegrityError, match=r"state at epoch 3 does not match the digest .* \(tampered chain\)"):
        verify_segments(tampered, train, k=1, run_id="r", isolation=None)

    wrong_final = _copy(trained, tmp_path / "w")
    _forge(wrong_final, 4, lambda state: state["model.layers.6.bias"].__iadd__(np.float32(1)))
    with pytest.raises(IntegrityError, match="final state is not the model's weights"):
        verify_segments(wrong_final, train, k=1, run_id="r", isolation=None)

    with pytest.raises(IntegrityError, match="does not encode to the inputs the training record names"):
        verify_segments(trained, train.iloc[1:], k=1, run_id="r", isolation=None)
    with pytest.raises(BadInput, match="segment 9 does not exist"):
        verify_segments(trained, train, k=1, run_id="r", isolation=None, segments=[9])
    (tampered / chain_.CHAIN_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(IntegrityError, match="training chain file is unreadable"):
        verify_segments(tampered, train, k=1, run_id="r", isolation=None)
    (tampered / chain_.CHAIN_FILE).unlink()
    with pytest.raises(IntegrityError, match="has no training_chain.safetensors"):
        verify_segments(tampered, train, k=1, run_id="r", isolation=None)


def test_the_model_scan_checks_every_recorded_state_against_the_config(trained: Path, tmp_path: Path) -> None:
    import torch

    from secure_ml.security.scan_safetensors import check_safetensors

    config = json.loads((trained / "config.json").read_text())
    chain = trained / chain_.CHAIN_FILE
    assert check_safetensors(chain, chain_.CHAIN_FILE, config=config) == []
    states, _ = chain_.unpack(chain.read_bytes())
    as_torch = {e: {k: torch.from_numpy(v.copy()) for k, v in s.items()} for e, s in states.items()}
    as_torch[2]["model.layers.0.weight"] = torch.zeros(3, 3)   # a state that is not this model's
    as_torch[3]["payload"] = torch.zeros(1000)                 # a tensor outside the chain's layout
    odd = tmp_path / chain_.CHAIN_FILE
    odd.write_bytes(chain_.pack(as_torch))
    found = [f.why for f in check_safetensors(odd, chain_.CHAIN_FILE, config=config)]
    assert "tensor '000002.model.layers.0.weight' has shape [3, 3] but config.json says [32, 26]" in found, found
    assert "tensor '000003.payload' is not in config.json" in found, found


def test_the_fast_loop_is_bit_identical_run_to_run_and_learns_what_the_old_loop_learned(train: pd.DataFrame) -> None:
    from bench.baseline_loop import train_baseline

    prep = Preprocessing.fit(train, SPEC)
    X, y = prep.transform(train)[0], prep.labels(train)
    config = TrainingConfig(epochs=3, checkpoint_every=0)
    first, second = fit(X, y, config), fit(X, y, config)
    assert first.weights == second.weights and first.chain == second.chain
    _, old_losses, _ = train_baseline(X, y, config)
    # Same initialisation, shuffles, dropout masks and arithmetic: the loss curve matches to float rounding.
    np.testing.assert_allclose(first.losses, old_losses, rtol=1e-4)


def test_a_run_resumed_between_chain_states_records_the_uninterrupted_chain(train: pd.DataFrame) -> None:
    from secure_ml.training.loop import fit_arrays

    prep = Preprocessing.fit(train, SPEC)
    X, y = prep.transform(train)[0], prep.labels(train)
    config = TrainingConfig(epochs=4, checkpoint_every=1, segment_epochs=2)
    frames: dict[str, list[bytes]] = {}
    fit_arrays(X, y, config, device="cpu", fingerprint="f" * 64, resume=None,
               emit=lambda kind, payload: frames.setdefault(kind, []).append(payload))
    resumed: dict[str, bytes] = {}
    fit_arrays(X, y, config, device="cpu", fingerprint="f" * 64, resume=frames["C"][2],  # epoch 3: not a chain state
               emit=lambda kind, payload: resumed.__setitem__(kind, payload))
    assert json.loads(resumed["R"])["resumed_from_epoch"] == 3
    assert resumed["K"] == frames["K"][0] and resumed["W"] == frames["W"][0]
    assert [e["epoch"] for e in json.loads(resumed["R"])["chain"]] == [0, 2, 4]


@pytest.mark.slow  # signs, registers and replays in the training sandbox twice
def test_verify_training_re_checks_a_registered_version_and_fails_in_one_line_when_tampered(
        settings: Any, train: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from secure_ml.cli import main
    from secure_ml.release.registry import Registry
    from tests._release_fixtures import make_keys, publish

    store = settings.artifact_store()
    train_sha = store.put_dataframe(train).sha256
    model_dir = tmp_path / "model"
    train_model(train, SPEC, CONFIG, model_dir, isolation=None, provenance={"train_sha256": train_sha})
    keys = make_keys(settings.home / "keys", "model-signing")
    published = publish(settings, model_dir, keys, tmp_path)
    version, _ = Registry.from_settings(settings).register(published.digest, published.evidence, actor="bob")

    assert main(["verify-training", version.version, "--segments", "2"]) == 0
    assert "re-executed 2 of 4 segments" in capsys.readouterr().out

    # A trainer who faked epoch 2 and signed the forged chain: the replayed segments do not reach it, exit 1.
    forged_dir = _copy(model_dir, tmp_path / "forged")
    _forge(forged_dir, 2, lambda state: state["model.layers.0.weight"].__iadd__(np.float32(1e-3)))
    forged = publish(settings, forged_dir, keys, tmp_path)
    faked, _ = Registry.from_settings(settings).register(forged.digest, forged.evidence, actor="bob")
    assert main(["verify-training", faked.version, "--segment", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "epochs 1-2 did not reach the state the chain records" in err and len(err.splitlines()) == 1, err

    # A chain changed after signing no longer matches the signature: refused before any replay, exit 1.
    _forge(forged_dir, 3, lambda state: state["model.layers.0.weight"].__iadd__(np.float32(1e-3)))
    tampered = publish(settings, forged_dir, keys, tmp_path, bundle=published.bundle, envelope=published.envelope)
    other, _ = Registry.from_settings(settings).register(tampered.digest, tampered.evidence, actor="bob")
    assert main(["verify-training", other.version, "--segments", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("secure-ml: ") and len(err.splitlines()) == 1, err
    assert main(["verify-training", version.version, "--segments", "0"]) == 2
    assert "--segments must be at least 1" in capsys.readouterr().err
