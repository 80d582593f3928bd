"""Training core: preprocessing as JSON, determinism, bad inputs, devices, encrypted checkpoints, resume.

Touches: real torch training (in-process and in the isolated child process), the sample data with
the pipeline's own seeded stratified split (secure_ml.splitting), a real keyring and audit log in a
fresh SECURE_ML_HOME, real AES-GCM checkpoints, a real SIGKILL of the training process, and the
model server's generic loader (secure_ml.serving.FeatureSpec) reading our preprocessing.json.

Does not touch: Dagster (test_training_stage.py), a GPU (the CUDA test runs only where one exists;
here the GPU-absent behaviour is what is tested).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from secure_ml.data import splitting
from secure_ml.errors import BadInput, ConfigurationError
from secure_ml.settings import Settings
from secure_ml.training.sandbox import IsolationPolicy, SandboxError
from secure_ml.training.checkpoints import CheckpointStore
from secure_ml.training.config import TrainingConfig, resolve_device
from secure_ml.training.features import DataSpec, Preprocessing
from secure_ml.training.loop import fit_arrays
from secure_ml.training.predictor import load_model, load_predictor
from secure_ml.training.record import record_problems
from secure_ml.training.trainer import fit, train_model
from tests.conftest import SAMPLE_CSV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # slow: trains real models, kills and resumes them
SPEC = DataSpec("risk", ["job", "credit_amount", "duration", "age"],
                ["sex", "housing", "saving_accounts", "checking_account", "purpose"])
FAST = TrainingConfig(epochs=3, checkpoint_every=0)


@pytest.fixture(scope="module")
def split() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.read_csv(SAMPLE_CSV)
    return splitting.split(frame, "risk", test_fraction=0.2, seed=20261123)


def _arrays(train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    prep = Preprocessing.fit(train, SPEC)
    return prep.transform(train)[0], prep.labels(train)


def test_preprocessing_is_fitted_on_the_training_split_and_stored_as_json(split: Any, tmp_path: Path) -> None:
    train, test = split
    prep = Preprocessing.fit(train, SPEC)
    assert prep.numeric["credit_amount"][0] == pytest.approx(train["credit_amount"].mean())
    assert prep.numeric["credit_amount"][0] != pytest.approx(pd.concat([train, test])["credit_amount"].mean())
    text = json.dumps(prep.to_json(), sort_keys=True)  # key order scrambled, as on disk
    back = Preprocessing.from_json(json.loads(text))
    assert back == prep and back.features == [*SPEC.numeric, *SPEC.categorical]
    np.testing.assert_array_equal(back.transform(test)[0], prep.transform(test)[0])
    # The model server's generic reader understands it too.
    from secure_ml.release.serving import FeatureSpec

    served = FeatureSpec.from_preprocessing(json.loads(text))
    assert served.numeric["age"] == prep.numeric["age"] and served.categorical["sex"] == ("female", "male")
    with pytest.raises(Exception, match="not usable"):
        Preprocessing.from_json({**json.loads(text), "features": ["age"]})


def test_bad_training_data_is_refused_with_one_clear_line(split: Any) -> None:
    train, _ = split
    with pytest.raises(BadInput, match="training split is empty"):
        Preprocessing.fit(train.iloc[:0], SPEC)
    with pytest.raises(BadInput, match="one class only"):
        Preprocessing.fit(train[train["risk"] == 1], SPEC)
    for bad in (np.nan, np.inf, -np.inf):
        broken = train.astype({"duration": float})
        broken.loc[broken.index[7], "duration"] = bad
        with pytest.raises(BadInput, match="feature 'duration' has 1 NaN, infinite or non-numeric values"):
            Preprocessing.fit(broken, SPEC)
    with pytest.raises(BadInput, match="lacks column 'purpose'"):
        Preprocessing.fit(train.drop(columns=["purpose"]), SPEC)


def test_a_category_unseen_in_training_gets_the_unknown_code_and_is_reported(split: Any) -> None:
    train, test = split
    prep = Preprocessing.fit(train, SPEC)
    changed = test.copy()
    changed.loc[changed.index[:3], "purpose"] = "crypto"
    X, unknown = prep.transform(changed)
    assert unknown == {"purpose": {"count": 3, "values": ["crypto"]}}
    start = len(prep.numeric) + sum(len(prep.categorical[c]) for c in list(prep.categorical)[:-1])
    assert X[:3, start:].sum() == 0 and (X[3:, start:].sum(axis=1) == 1).all()


def test_same_data_code_and_config_give_bit_identical_weights(split: Any) -> None:
    X, y = _arrays(split[0])
    first, second = fit(X, y, FAST), fit(X, y, FAST)
    assert first.weights == second.weights and first.losses == second.losses
    other = fit(X, y, TrainingConfig(epochs=3, checkpoint_every=0, seed=7))
    assert other.weights_sha256 != first.weights_sha256


def test_a_gpu_that_is_not_there_fails_clearly_unless_fallback_is_configured(split: Any, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: see test_training_uses_cuda_when_present")
    with pytest.raises(ConfigurationError, match="device is 'cuda' but no CUDA GPU is available"):
        resolve_device(TrainingConfig(device="cuda"))
    with pytest.raises(ConfigurationError, match="no CUDA GPU"):
        train_model(split[0], SPEC, TrainingConfig(device="cuda"), tmp_path / "m", isolation=IsolationPolicy())
    assert not (tmp_path / "m").exists()  # refused before anything was trained or written
    assert resolve_device(TrainingConfig(device="cuda", cuda_fallback=True))[0] == "cpu"
    assert "fell back to the CPU" in resolve_device(TrainingConfig(device="cuda", cuda_fallback=True))[1]
    assert resolve_device(TrainingConfig(device="auto")) == ("cpu", "device auto: no CUDA GPU here, trained on the CPU")
    with pytest.raises(ConfigurationError, match="device must be one of"):
        TrainingConfig.from_mapping({"device": "tpu"})
    with pytest.raises(ConfigurationError, match="unknown setting 'epoch'"):
        TrainingConfig.from_mapping({"epoch": 3})


def test_training_uses_cuda_when_present(split: Any, tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    result = train_model(split[0], SPEC, TrainingConfig(epochs=2, device="cuda"), tmp_path / "m",
                         isolation=IsolationPolicy())
    assert result.device == "cuda" and result.record["hardware"]["gpu"]


def _checkpoints(split: Any, fingerprint: str = "f" * 64, epochs: int = 4) -> tuple[str, list[bytes]]:
    X, y = _arrays(split[0])
    frames: list[bytes] = []
    fit_arrays(X, y, TrainingConfig(epochs=epochs, checkpoint_every=1), device="cpu", fingerprint=fingerprint,
               resume=None, emit=lambda kind, payload: frames.append(payload) if kind == "C" else None)
    return fingerprint, frames


def test_checkpoints_are_encrypted_and_a_corrupted_one_is_never_resumed_from(split: Any, settings: Settings) -> None:
    fingerprint, frames = _checkpoints(split)
    store = CheckpointStore(settings.home / "checkpoints", settings.key_provider(), settings.audit_log(), keep=2)
    for epoch, data in enumerate(frames, start=1):
        store.save(fingerprint, epoch, data)
    files = store.files(fingerprint)
    assert [f.name[:12] for f in files] == ["epoch-000003", "epoch-000002"]  # only the newest two are kept
    sealed = files[0].read_bytes()
    assert sealed.startswith(b"SMLENC") and b"secure-ml-checkpoint" not in sealed and b"model." not in sealed
    assert files[0].stat().st_mode & 0o077 == 0
    assert store.latest(fingerprint) == (3, frames[2])

    body = bytearray(sealed)
    body[len(body) // 2] ^= 0x01  # one flipped bit in the ciphertext
    files[0].write_bytes(bytes(body))
    assert store.latest(fingerprint) == (2, frames[1])  # the tag caught it: the older one is used
    assert files[0].with_name(files[0].name + ".rejected").exists() and not files[0].exists()
    entries = [json.loads(line) for line in settings.audit_path.read_text().splitlines()]
    rejected = [e for e in entries if e["action"] == "training.checkpoint.reject"]
    assert rejected and "epoch-000003" in rejected[-1]["details"]["file"] and rejected[-1]["outcome"] == "fail"

    files[1].write_bytes(files[1].read_bytes()[:-20])  # truncated
    assert store.latest(fingerprint) is None  # nothing good left: training starts from scratch
    # A checkpoint of another run, moved in under this run's name, is refused too.
    store.save("e" * 64, 2, _checkpoints(split, "e" * 64, epochs=3)[1][1])
    moved = store.files("e" * 64)[0]
    target = settings.home / "checkpoints" / fingerprint / moved.name
    moved.rename(target)
    assert store.latest(fingerprint) is None and target.with_name(target.name + ".rejected").exists()


def test_a_killed_training_process_resumes_to_the_same_weights(split: Any, settings: Settings) -> None:
    train, _ = split
    config = TrainingConfig(epochs=10, checkpoint_every=1)
    provenance = {"train_sha256": "a" * 64, "test_sha256": "b" * 64, "dataset_sha256": "c" * 64, "actor": "tester"}
    store = CheckpointStore(settings.home / "checkpoints", settings.key_provider(), settings.audit_log(), keep=2)
    isolated = IsolationPolicy()

    uninterrupted = train_model(train, SPEC, config, settings.home / "a", isolation=isolated, provenance=provenance)

    child: dict[str, int] = {}

    def kill_at_epoch_three(event: dict[str, Any]) -> None:
        if event["epoch"] == 3:
            os.kill(child["pid"], signal.SIGKILL)

    with pytest.raises(SandboxError, match="killed by SIGKILL"):
        train_model(train, SPEC, config, settings.home / "b", isolation=isolated, checkpoints=store,
                    provenance=provenance, on_progress=kill_at_epoch_three,
                    on_start=lambda pid: child.update(pid=pid))
    assert not (settings.home / "b").exists()
    (run_dir,) = [p for p in (settings.home / "checkpoints").iterdir()]
    newest, older = store.files(run_dir.name)
    # 2, 3 or later: the child runs on until the SIGKILL lands, and checkpoints written meanwhile are kept
    newest_epoch = int(newest.name[6:12])
    assert 2 <= newest_epoch < config.epochs and int(older.name[6:12]) == newest_epoch - 1
    sealed = newest.read_bytes()
    newest.write_bytes(sealed[:-1] + bytes([sealed[-1] ^ 0x01]))  # corrupt the newest: its tag fails

    resumed = train_model(train, SPEC, config, settings.home / "b", isolation=isolated, checkpoints=store,
                          provenance=provenance)
    assert resumed.record["result"]["resumed_from_epoch"] == newest_epoch - 1  # the last *good* checkpoint
    assert resumed.weights_sha256 == uninterrupted.weights_sha256
    # The checkpoint carried the chain so far: the resumed run records the same chain of states.
    assert resumed.record["result"]["chain"] == uninterrupted.record["result"]["chain"]
    assert [e["epoch"] for e in resumed.record["result"]["chain"]] == list(range(config.epochs + 1))
    assert not run_dir.exists()  # checkpoints are removed once training finished

    # And isolated training gives the very weights in-process training gives.
    X, y = _arrays(train)
    assert fit(X, y, config).weights_sha256 == uninterrupted.weights_sha256

    record = resumed.record
    assert record_problems(record, resumed.weights_sha256) == []
    assert record["isolation"]["isolated"] and record["device"] == "cpu" and record["actor"] == "tester"
    assert record["environment"]["torch"] and record["environment"]["lock_sha256"]
    assert record["environment"]["packages"]["torch"]
    assert record["code"]["commit"] and record["code"]["dirty"] in (True, False)
    assert record["seeds"]["seed"] == config.seed and record["hyperparameters"]["epochs"] == 10
    assert sorted(p.name for p in (settings.home / "b").iterdir()) == sorted(
        ["MODEL_CARD.md", "config.json", "model.safetensors", "preprocessing.json", "training_record.json",
         "training_chain.safetensors"])
    assert "Intended use" in (settings.home / "b" / "MODEL_CARD.md").read_text()
    assert record_problems({**record, "isolation": {"isolated": False}}, resumed.weights_sha256) == [
        "the model was not trained in the isolated process"]
    assert "result.weights_sha256 does not match model.safetensors" in record_problems(record, "0" * 64)

    # The model server's loader hook predicts with it.
    predict = load_predictor(settings.home / "b")
    rows = train.drop(columns=["risk"]).head(3).to_dict("records")
    probabilities = predict(rows)
    assert len(probabilities) == 3 and all(0.0 <= p <= 1.0 for p in probabilities)
    loaded = load_model(settings.home / "b")
    assert loaded.threshold == 0.5


def test_a_model_directory_that_does_not_fit_its_config_is_refused(split: Any, tmp_path: Path) -> None:
    from secure_ml.errors import IntegrityError

    train_model(split[0], SPEC, FAST, tmp_path / "m", isolation=None)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden": [8]}))
    with pytest.raises(IntegrityError, match="does not fit config.json"):
        load_model(tmp_path / "m")


def test_a_resume_across_a_fingerprint_version_change_is_reported_and_starts_fresh(
        split: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from secure_ml.training import checkpoints as checkpoints_module

    X, y = _arrays(split[0])
    config = TrainingConfig(epochs=4, checkpoint_every=1)
    store = CheckpointStore(settings.home / "checkpoints", settings.key_provider(), settings.audit_log())

    def interrupted() -> str:
        def stop_at_epoch_three(event: dict[str, Any]) -> None:
            if event["epoch"] == 3:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            fit(X, y, config, checkpoints=store, on_progress=stop_at_epoch_three)
        (run_dir,) = [p for p in (settings.home / "checkpoints").iterdir()]
        assert json.loads((run_dir / "fingerprint.json").read_text())["fingerprint_version"] == \
            checkpoints_module.FINGERPRINT_VERSION
        return run_dir.name

    old = interrupted()
    uninterrupted = fit(X, y, config)
    before = checkpoints_module.FINGERPRINT_VERSION
    monkeypatch.setattr(checkpoints_module, "FINGERPRINT_VERSION", checkpoints_module.FINGERPRINT_VERSION + 1)
    fresh = fit(X, y, config, checkpoints=store)
    assert fresh.resumed_from_epoch is None  # not resumed from the old version's checkpoint
    assert fresh.weights_sha256 == uninterrupted.weights_sha256
    (stale,) = fresh.checkpoints_superseded  # ... and not silently ignored either
    assert stale["checkpoints"] == old and stale["files"] == 2
    assert stale["reason"].startswith(f"not resumed: fingerprint version {before}, this code makes version {before + 1}")
    assert fresh.fingerprint["fingerprint_version"] == before + 1 and fresh.fingerprint["digest"] != old
    entries = [json.loads(line) for line in settings.audit_path.read_text().splitlines()]
    assert [e["details"]["checkpoints"] for e in entries if e["action"] == "training.checkpoint.superseded"] == [old]
    assert not (settings.home / "checkpoints" / old).exists()  # reported once, then removed

    # Other training code (another code digest): reported in the record the same way.
    interrupted()
    monkeypatch.setattr(checkpoints_module, "code_digest", lambda: "0" * 64)
    result = train_model(split[0], SPEC, config, tmp_path / "m", isolation=None, checkpoints=store)
    (stale,) = result.record["result"]["checkpoints_superseded"]
    assert "other training code" in stale["reason"] and result.record["result"]["resumed_from_epoch"] is None


def test_the_code_digest_covers_every_module_of_the_training_package(tmp_path: Path) -> None:
    import shutil

    from secure_ml.training import checkpoints as checkpoints_module

    copy = tmp_path / "training"
    shutil.copytree(checkpoints_module.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert checkpoints_module.code_digest(copy) == checkpoints_module.code_digest()
    (copy / "zz_new_module.py").write_text("X = 1\n")  # a module nobody listed by name
    assert checkpoints_module.code_digest(copy) != checkpoints_module.code_digest()
    (copy / "zz_new_module.py").unlink()
    (copy / "features.py").rename(copy / "features_moved.py")  # moved code changes it too
    assert checkpoints_module.code_digest(copy) != checkpoints_module.code_digest()
